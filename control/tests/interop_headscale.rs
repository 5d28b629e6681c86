//! The ts2021 transport against Headscale (pinned v0.29.0, built by `.ci/run` into a
//! cache outside the repository). Skipped on a developer machine without it; fails under
//! `CI=true`.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use control::dial::{dial, fetch_control_key, ControlUrl, DialError};
use proto::MachinePrivate;

fn headscale_bin() -> Option<PathBuf> {
    testkit::interop::tool("headscale")
}

use testkit::free_port;

/// Headscale on loopback ports, stopped on drop.
struct Headscale {
    _child: testkit::KillOnDrop,
    url: ControlUrl,
    _dir: tempfile::TempDir,
}

async fn start_headscale(bin: &PathBuf) -> Headscale {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = testkit::interop::HeadscaleConfig {
        dir: dir.path(),
        ip: std::net::IpAddr::from([127, 0, 0, 1]),
        port,
        metrics_port: free_port(),
        grpc_port: free_port(),
        region: (900, "localhost", std::net::Ipv4Addr::LOCALHOST),
        policy: None,
    }
    .write()
    .unwrap();
    let child = Command::new(bin)
        .args(["serve", "-c", cfg.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Headscale {
        _child: testkit::KillOnDrop(child),
        url: format!("http://127.0.0.1:{port}").parse().unwrap(),
        _dir: dir,
    }
}

#[tokio::test]
async fn noise_handshake_and_early_payload_with_headscale() {
    let Some(bin) = headscale_bin() else { return };
    let hs = start_headscale(&bin).await;
    // Headscale takes a moment to open its listener.
    let t0 = Instant::now();
    let control_key = loop {
        match fetch_control_key(&hs.url, 113).await {
            Ok(k) => break k,
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "headscale never answered /key: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let machine = MachinePrivate::generate();
    let conn = dial(&hs.url, &machine, &control_key, 113).await.unwrap();
    let early = conn
        .early_payload
        .expect("headscale sends an early payload");
    let v: serde_json::Value = serde_json::from_slice(&early).unwrap();
    assert!(
        v["nodeKeyChallenge"]
            .as_str()
            .unwrap()
            .starts_with("chalpub:"),
        "{v}"
    );

    // A client below Headscale's minimum capability version is turned away.
    let old = dial(&hs.url, &machine, &control_key, 100).await;
    assert!(old.is_err(), "capability version 100 was accepted");

    // The wrong control key cannot complete the handshake.
    let wrong = MachinePrivate::generate().public();
    match dial(&hs.url, &machine, &wrong, 113).await {
        Err(DialError::Noise(_)) | Err(DialError::Http { .. }) | Err(DialError::Io(_)) => {}
        other => panic!("handshake with the wrong control key: {other:?}"),
    }
}

fn headscale_cli(bin: &PathBuf, hs: &Headscale, args: &[&str]) -> serde_json::Value {
    let cfg = hs._dir.path().join("config.yaml");
    let out = Command::new(bin)
        .args(["-c", cfg.to_str().unwrap(), "-o", "json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "headscale {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "headscale {args:?} printed non-JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn wait_for_key(hs: &Headscale) -> proto::MachinePublic {
    let t0 = Instant::now();
    loop {
        match fetch_control_key(&hs.url, 113).await {
            Ok(k) => return k,
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "headscale never answered /key: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn register_with_a_headscale_pre_auth_key() {
    let Some(bin) = headscale_bin() else { return };
    let hs = start_headscale(&bin).await;
    let control_key = wait_for_key(&hs).await;
    let user = headscale_cli(&bin, &hs, &["users", "create", "alice"]);
    let user_id = user["id"].as_u64().unwrap().to_string();
    let key = headscale_cli(
        &bin,
        &hs,
        &[
            "preauthkeys",
            "create",
            "--user",
            &user_id,
            "--reusable",
            "--expiration",
            "1h",
        ],
    );
    let auth_key = key["key"].as_str().unwrap().to_string();

    let machine = MachinePrivate::generate();
    let node = proto::NodePrivate::generate();
    let client = control::client::ControlClient::connect(&hs.url, &machine, &control_key, 113)
        .await
        .unwrap();
    let req = proto::tailcfg::RegisterRequest {
        version: 113,
        node_key: node.public(),
        auth: Some(proto::tailcfg::RegisterAuth { auth_key }),
        hostinfo: Some(proto::tailcfg::Hostinfo {
            hostname: "agentd-test".into(),
            os: "linux".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp = client.register(&req).await.unwrap();
    assert!(resp.machine_authorized, "{resp:?}");
    assert!(resp.error.is_empty(), "{resp:?}");
    assert!(resp.auth_url.is_empty());

    // A made-up key is refused with a clear error, not a hang.
    let other = proto::NodePrivate::generate();
    let bad = proto::tailcfg::RegisterRequest {
        node_key: other.public(),
        auth: Some(proto::tailcfg::RegisterAuth {
            auth_key: "hskey-auth-nonsense".into(),
        }),
        ..req.clone()
    };
    let machine2 = MachinePrivate::generate();
    let client2 = control::client::ControlClient::connect(&hs.url, &machine2, &control_key, 113)
        .await
        .unwrap();
    // Headscale answers 200 with the reason in `Error`.
    let r = client2.register(&bad).await.unwrap();
    assert!(!r.machine_authorized, "{r:?}");
    assert!(r.error.contains("auth-key"), "{r:?}");
    // The node shows up in headscale's own list.
    let nodes = headscale_cli(&bin, &hs, &["nodes", "list"]);
    let list = nodes.as_array().unwrap();
    assert_eq!(list.len(), 1, "{nodes}");
    assert_eq!(
        list[0]["node_key"].as_str().unwrap(),
        node.public().to_string()
    );
}

struct TestNode {
    node: proto::NodePrivate,
    disco: proto::DiscoPrivate,
    client: control::client::ControlClient,
    req: proto::tailcfg::MapRequest,
}

async fn join(
    hs: &Headscale,
    control_key: &proto::MachinePublic,
    auth_key: &str,
    endpoint: &str,
) -> TestNode {
    let machine = MachinePrivate::generate();
    let node = proto::NodePrivate::generate();
    let disco = proto::DiscoPrivate::generate();
    let client = control::client::ControlClient::connect(&hs.url, &machine, control_key, 113)
        .await
        .unwrap();
    let hostinfo = proto::tailcfg::Hostinfo {
        hostname: format!("n-{}", &node.public().untyped_hex()[..6]),
        os: "linux".into(),
        net_info: Some(proto::tailcfg::NetInfo {
            preferred_derp: 900,
        }),
        ..Default::default()
    };
    let resp = client
        .register(&proto::tailcfg::RegisterRequest {
            version: 113,
            node_key: node.public(),
            auth: Some(proto::tailcfg::RegisterAuth {
                auth_key: auth_key.into(),
            }),
            hostinfo: Some(hostinfo.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(resp.machine_authorized, "{resp:?}");
    let req = proto::tailcfg::MapRequest {
        version: 113,
        compress: "zstd".into(),
        keep_alive: true,
        node_key: node.public(),
        disco_key: disco.public(),
        stream: true,
        hostinfo: Some(hostinfo),
        endpoints: vec![endpoint.into()],
        endpoint_types: vec![2],
        omit_peers: false,
    };
    TestNode {
        node,
        disco,
        client,
        req,
    }
}

/// Applies map messages until `pred` holds for the netmap.
async fn until(
    stream: &mut control::client::MapStream,
    nm: &mut proto::netmap::NetMap,
    pred: impl Fn(&proto::netmap::NetMap) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !pred(nm) {
            let msg = stream
                .next()
                .await
                .expect("stream open")
                .expect("valid map message");
            nm.apply(msg);
        }
    })
    .await
    .expect("netmap reached the expected state in time");
}

#[tokio::test]
async fn two_nodes_stream_each_other_and_endpoint_changes_through_headscale() {
    let Some(bin) = headscale_bin() else { return };
    let hs = start_headscale(&bin).await;
    let control_key = wait_for_key(&hs).await;
    let user = headscale_cli(&bin, &hs, &["users", "create", "bob"]);
    let user_id = user["id"].as_u64().unwrap().to_string();
    let key = headscale_cli(
        &bin,
        &hs,
        &["preauthkeys", "create", "--user", &user_id, "--reusable"],
    );
    let auth_key = key["key"].as_str().unwrap().to_string();

    let a = join(&hs, &control_key, &auth_key, "192.0.2.1:41641").await;
    let b = join(&hs, &control_key, &auth_key, "192.0.2.2:41641").await;
    let mut sa = a.client.map_stream(&a.req).await.unwrap();
    let mut sb = b.client.map_stream(&b.req).await.unwrap();
    let (mut na, mut nb) = (
        proto::netmap::NetMap::default(),
        proto::netmap::NetMap::default(),
    );
    let (ka, kb) = (a.node.public(), b.node.public());
    until(&mut sa, &mut na, |nm| {
        nm.self_node.is_some() && nm.peer_by_key(&kb).is_some()
    })
    .await;
    until(&mut sb, &mut nb, |nm| {
        nm.peer_by_key(&ka).is_some_and(|p| !p.endpoints.is_empty())
    })
    .await;

    let self_a = na.self_node.as_ref().unwrap();
    assert!(
        self_a
            .addresses
            .iter()
            .any(|a| a.to_string().starts_with("100.64.")),
        "{self_a:?}"
    );
    assert!(na
        .relay_map
        .as_ref()
        .is_some_and(|m| m.regions.contains_key(&900)));
    let peer_a = nb.peer_by_key(&ka).unwrap();
    assert_eq!(peer_a.addresses, self_a.addresses);
    assert_eq!(peer_a.endpoints, vec!["192.0.2.1:41641".to_string()]);
    assert_eq!(peer_a.disco_key, Some(a.disco.public()));
    assert_eq!(peer_a.home_region().map(proto::RegionId::get), Some(900));
    assert_eq!(peer_a.routes(), &peer_a.addresses[..]);

    // A lite request with a new endpoint reaches the other node's stream.
    let mut moved = a.req.clone();
    moved.endpoints = vec!["198.51.100.7:1234".into()];
    let t0 = Instant::now();
    a.client.lite_update(&moved).await.unwrap();
    until(&mut sb, &mut nb, |nm| {
        nm.peer_by_key(&ka)
            .is_some_and(|p| p.endpoints == vec!["198.51.100.7:1234".to_string()])
    })
    .await;
    eprintln!("endpoint change reached the peer in {:?}", t0.elapsed());
    drop(b);
}

#[tokio::test]
async fn interactive_login_with_headscale_followup() {
    use control::session::{ControlSession, SessionConfig, SessionState};
    let Some(bin) = headscale_bin() else { return };
    let hs = start_headscale(&bin).await;
    wait_for_key(&hs).await;
    headscale_cli(&bin, &hs, &["users", "create", "carol"]);
    let mut s = ControlSession::spawn(SessionConfig {
        url: hs.url.clone(),
        machine: MachinePrivate::generate(),
        node: proto::NodePrivate::generate(),
        disco: proto::DiscoPrivate::generate().public(),
        hostinfo: proto::tailcfg::Hostinfo {
            hostname: "interactive".into(),
            ..Default::default()
        },
        endpoints: vec![],
        auth_key: None,
        version: 113,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
    });
    // The session asks for a login and shows the URL.
    let url = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let SessionState::NeedsLogin { url } = &*s.state.borrow_and_update() {
                return url.clone();
            }
            s.state.changed().await.unwrap();
        }
    })
    .await
    .expect("session asked for an interactive login");
    let auth_id = url.rsplit('/').next().unwrap().to_string();
    // An administrator approves it; the held Followup completes and the session streams.
    let cfg = hs._dir.path().join("config.yaml");
    let out = Command::new(&bin)
        .args([
            "-c",
            cfg.to_str().unwrap(),
            "auth",
            "register",
            "--auth-id",
            &auth_id,
            "--user",
            "carol",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while *s.state.borrow_and_update() != SessionState::Connected {
            s.state.changed().await.unwrap();
        }
    })
    .await
    .expect("session connected after the login");
    assert!(s.netmap.borrow().as_ref().unwrap().self_node.is_some());
}
