//! The controld binary: admin commands on its database, serving real clients, and a
//! restart that clients ride out by themselves.

#![allow(clippy::unwrap_used)] // test code

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::session::{ControlSession, SessionConfig, SessionState};
use proto::netmap::NetMap;
use proto::tailcfg::{Hostinfo, NetInfo};
use proto::{DiscoPrivate, MachinePrivate, NodePrivate};

const BIN: &str = env!("CARGO_BIN_EXE_controld");

use testkit::KillOnDrop as Child;

fn cli(db: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "controld {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn serve(db: &Path, map: &Path, port: u16) -> Child {
    Child(
        Command::new(BIN)
            .arg("--db")
            .arg(db)
            .args([
                "serve",
                "--dev",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--relay-map",
            ])
            .arg(map)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn session(port: u16, key: &str) -> (NodePrivate, ControlSession) {
    let node = NodePrivate::generate();
    let cfg = SessionConfig {
        url: format!("http://127.0.0.1:{port}").parse().unwrap(),
        machine: MachinePrivate::generate(),
        node: node.clone(),
        disco: DiscoPrivate::generate().public(),
        hostinfo: Hostinfo {
            hostname: format!("d{}", &node.public().untyped_hex()[..4]),
            os: "linux".into(),
            net_info: Some(NetInfo {
                preferred_derp: 900,
            }),
            ..Default::default()
        },
        endpoints: vec!["192.0.2.1:41641".into()],
        auth_key: Some(key.into()),
        version: 113,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
    };
    (node, ControlSession::spawn(cfg))
}

async fn wait_netmap(
    s: &mut ControlSession,
    within: Duration,
    pred: impl Fn(&NetMap) -> bool,
) -> Arc<NetMap> {
    tokio::time::timeout(within, async {
        loop {
            if let Some(nm) = s.netmap.borrow_and_update().clone() {
                if pred(&nm) {
                    return nm;
                }
            }
            s.netmap.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "netmap not as expected within {within:?}; state {:?}",
            *s.state.borrow()
        )
    })
}

#[tokio::test]
async fn admin_commands_serve_restart_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("controld.db");
    let map = dir.path().join("relaymap.json");
    std::fs::write(&map, r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"loc","Nodes":[{"Name":"900a","RegionID":900,"HostName":"localhost"}]}}}"#).unwrap();
    assert!(cli(&db, &["users", "create", "alice"]).contains("alice"));
    let key = cli(
        &db,
        &[
            "keys",
            "create",
            "--user",
            "alice",
            "--reusable",
            "--expiration",
            "1h",
        ],
    )
    .trim()
    .to_string();
    assert!(key.starts_with("agentd-auth-"), "{key}");
    let listing = cli(&db, &["keys", "list"]);
    assert!(
        !listing.contains(&key),
        "keys list must not show the full key"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = serve(&db, &map, port);
    let (ka, mut a) = session(port, &key);
    let (kb, mut b) = session(port, &key);
    let (pa, pb) = (ka.public(), kb.public());
    let na = wait_netmap(&mut a, Duration::from_secs(15), |nm| {
        nm.peer_by_key(&pb).is_some()
    })
    .await;
    wait_netmap(&mut b, Duration::from_secs(5), |nm| {
        nm.peer_by_key(&pa).is_some()
    })
    .await;
    let addrs_a = na.self_node.as_ref().unwrap().addresses.clone();
    let nodes = cli(&db, &["nodes", "list"]);
    assert_eq!(nodes.lines().count(), 3, "{nodes}");

    // Restart: the sessions notice, reconnect by themselves, keep their addresses.
    drop(server);
    let t0 = Instant::now();
    while *a.state.borrow() == SessionState::Connected {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "session did not notice the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _server = serve(&db, &map, port);
    let t0 = Instant::now();
    while *a.state.borrow() != SessionState::Connected
        || *b.state.borrow() != SessionState::Connected
    {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "sessions did not reconnect: {:?}",
            *a.state.borrow()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let na = wait_netmap(&mut a, Duration::from_secs(5), |nm| {
        nm.peer_by_key(&pb).is_some()
    })
    .await;
    assert_eq!(
        na.self_node.as_ref().unwrap().addresses,
        addrs_a,
        "addresses changed across a restart"
    );

    // A third node appears in both streams within 1 s of coming up.
    let (kc, mut c) = session(port, &key);
    let pc = kc.public();
    let t0 = Instant::now();
    while *c.state.borrow() != SessionState::Connected {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "third node did not connect"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), c.state.changed()).await;
    }
    let t0 = Instant::now();
    wait_netmap(&mut a, Duration::from_secs(1), |nm| {
        nm.peer_by_key(&pc).is_some()
    })
    .await;
    wait_netmap(&mut b, Duration::from_secs(1), |nm| {
        nm.peer_by_key(&pc).is_some()
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(1));

    // An endpoint change (a lite map request) reaches the others within 1 s.
    a.set_endpoints(vec!["198.51.100.9:4242".into()]).await;
    wait_netmap(&mut b, Duration::from_secs(1), |nm| {
        nm.peer_by_key(&pa)
            .is_some_and(|p| p.endpoints == vec!["198.51.100.9:4242".to_string()])
    })
    .await;
    // So do a new home region and a new disco key.
    a.set_home_region(proto::RegionId::new(901).expect("positive"))
        .await;
    wait_netmap(&mut b, Duration::from_secs(1), |nm| {
        nm.peer_by_key(&pa)
            .is_some_and(|p| p.home_region().map(proto::RegionId::get) == Some(901))
    })
    .await;
    let new_disco = proto::DiscoPrivate::generate().public();
    a.set_disco_key(new_disco).await;
    wait_netmap(&mut b, Duration::from_secs(1), |nm| {
        nm.peer_by_key(&pa)
            .is_some_and(|p| p.disco_key == Some(new_disco))
    })
    .await;

    // Deleting b from the command line while the server runs removes it from a's map,
    // and the relay admission check refuses it from then on.
    assert!(verify(port, &pb).await, "registered node is allowed");
    let id_b = cli(&db, &["nodes", "list"])
        .lines()
        .find(|l| l.contains(&pb.short()))
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap();
    cli(&db, &["nodes", "delete", &id_b]);
    wait_netmap(&mut a, Duration::from_secs(2), |nm| {
        nm.peer_by_key(&pb).is_none()
    })
    .await;
    assert!(!verify(port, &pb).await, "deleted node is refused");

    // An expired key cannot register, and nothing is written.
    let short = cli(
        &db,
        &["keys", "create", "--user", "alice", "--expiration", "1s"],
    )
    .trim()
    .to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = cli(&db, &["nodes", "list"]).lines().count();
    let (_, mut late) = session(port, &short);
    let t0 = Instant::now();
    loop {
        if let SessionState::Refused { reason } = &*late.state.borrow_and_update() {
            assert!(reason.contains("expired"), "{reason}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "expired key was not refused"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), late.state.changed()).await;
    }
    assert_eq!(cli(&db, &["nodes", "list"]).lines().count(), before);
}

async fn verify(port: u16, key: &proto::NodePublic) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = format!(r#"{{"NodePublic":"{key}","Source":"127.0.0.1"}}"#);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "POST /verify HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.contains(r#""Allow":true"#)
}

#[test]
fn policy_check_refuses_with_the_line_and_serve_will_not_start_on_a_bad_policy() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let good = dir.path().join("good.hujson");
    std::fs::write(
        &good,
        "{\n  // comment\n  \"acls\": [{\"action\": \"accept\", \"src\": [\"alice@\"], \"dst\": [\"tag:server:22\"]},],\n  \"tagOwners\": {\"tag:server\": [\"alice@\"]},\n}\n",
    )
    .unwrap();
    let out = cli(&db, &["policy", "check", good.to_str().unwrap()]);
    assert!(out.contains("valid"), "{out}");
    let bad = dir.path().join("bad.hujson");
    std::fs::write(
        &bad,
        "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"group:nobody\"], \"dst\": [\"*:*\"]}\n  ]\n}\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("--db")
            .arg(&db)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["policy", "check", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.hujson") && err.contains("line 3") && err.contains("group:nobody"),
        "{err}"
    );
    // serve refuses to start on it rather than run without the policy.
    let map = dir.path().join("map.json");
    std::fs::write(&map, r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"loc","Nodes":[{"Name":"900a","RegionID":900,"HostName":"localhost"}]}}}"#).unwrap();
    let out = run(&[
        "serve",
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--relay-map",
        map.to_str().unwrap(),
        "--policy",
        bad.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("policy") && err.contains("line 3"), "{err}");
    // Tags on pre-auth keys: spelled right or refused.
    cli(&db, &["users", "create", "alice"]);
    cli(
        &db,
        &[
            "keys",
            "create",
            "--user",
            "alice",
            "--tags",
            "tag:server,tag:web",
        ],
    );
    assert!(cli(&db, &["keys", "list"]).contains("tag:server,tag:web"));
    let out = run(&["keys", "create", "--user", "alice", "--tags", "server"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tag:NAME"));
}
