//! controld with real clients over loopback sockets.

#![allow(clippy::unwrap_used)] // test code

use std::sync::Arc;
use std::time::{Duration, Instant};

use control::client::{ControlClient, MapStream};
use control::dial::{fetch_control_key, ControlUrl};
use control::server::store::{SqliteStore, Store};
use control::server::{ControlConfig, ControlServer, RunningControl};
use proto::netmap::NetMap;
use proto::tailcfg::{Hostinfo, MapRequest, NetInfo, RegisterAuth, RegisterRequest};
use proto::{DiscoPrivate, MachinePrivate, NodePrivate, RelayMap};

const CAPVER: u16 = 113;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn relay_map() -> RelayMap {
    RelayMap::from_json(r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"loc","Nodes":[{"Name":"900a","RegionID":900,"HostName":"localhost"}]}}}"#).unwrap()
}

struct Env {
    server: RunningControl,
    store: Arc<SqliteStore>,
    url: ControlUrl,
    auth_key: String,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    env_with_policy(None).await
}

/// controld with the policy file `policy` (written to `policy.hujson`), if any.
async fn env_with_policy(policy: Option<&str>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("controld.db")).unwrap());
    let user = store.create_user("alice", now()).unwrap();
    let (auth_key, _) = store
        .create_preauth_key(user.id, true, false, &[], now() + 3600, now())
        .unwrap();
    let mut cfg = ControlConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        MachinePrivate::generate(),
        relay_map(),
    );
    if let Some(text) = policy {
        let path = dir.path().join("policy.hujson");
        std::fs::write(&path, text).unwrap();
        cfg.policy = Some(path);
    }
    let server = ControlServer::start(cfg, store.clone()).await.unwrap();
    let url = format!("http://{}", server.addr()).parse().unwrap();
    Env {
        server,
        store,
        url,
        auth_key,
        _dir: dir,
    }
}

struct Device {
    node: NodePrivate,
    client: ControlClient,
    req: MapRequest,
}

async fn device(e: &Env, key: &str, endpoint: &str) -> Result<Device, String> {
    let control_key = fetch_control_key(&e.url, CAPVER).await.unwrap();
    let machine = MachinePrivate::generate();
    let node = NodePrivate::generate();
    let disco = DiscoPrivate::generate();
    let client = ControlClient::connect(&e.url, &machine, &control_key, CAPVER)
        .await
        .unwrap();
    let hostinfo = Hostinfo {
        hostname: format!("dev-{}", &node.public().untyped_hex()[..4]),
        os: "linux".into(),
        net_info: Some(NetInfo {
            preferred_derp: 900,
        }),
        ..Default::default()
    };
    let resp = client
        .register(&RegisterRequest {
            version: CAPVER as u32,
            node_key: node.public(),
            auth: Some(RegisterAuth {
                auth_key: key.into(),
            }),
            hostinfo: Some(hostinfo.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    if !resp.machine_authorized {
        return Err(resp.error);
    }
    let req = MapRequest {
        version: CAPVER as u32,
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
    Ok(Device { node, client, req })
}

async fn until(
    s: &mut MapStream,
    nm: &mut NetMap,
    within: Duration,
    pred: impl Fn(&NetMap) -> bool,
) {
    tokio::time::timeout(within, async {
        while !pred(nm) {
            nm.apply(s.next().await.expect("stream open").expect("valid message"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("netmap did not reach the expected state within {within:?}"));
}

async fn verify(e: &Env, key: &proto::NodePublic) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = format!(r#"{{"NodePublic":"{key}","Source":"127.0.0.1"}}"#);
    let mut s = tokio::net::TcpStream::connect(e.server.addr())
        .await
        .unwrap();
    s.write_all(
        format!(
            "POST /verify HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.contains(r#""Allow":true"#)
}

#[tokio::test]
async fn an_edited_policy_file_is_picked_up_without_a_signal() {
    let policy = |port: u16| {
        format!(
            r#"{{"acls": [{{"action": "accept", "src": ["alice@"], "dst": ["bob@:{port}"]}}]}}"#
        )
    };
    let e = env_with_policy(Some(&policy(22))).await;
    let bob = e.store.create_user("bob", now()).unwrap();
    let (bob_key, _) = e
        .store
        .create_preauth_key(bob.id, true, false, &[], now() + 3600, now())
        .unwrap();
    let a = device(&e, &e.auth_key, "192.0.2.1:41641").await.unwrap();
    let b = device(&e, &bob_key, "192.0.2.2:41641").await.unwrap();
    let mut sb = b.client.map_stream(&b.req).await.unwrap();
    let mut nb = NetMap::default();
    let ka = a.node.public();
    let ports = |nm: &NetMap| serde_json::to_string(&nm.packet_filter).unwrap();
    until(&mut sb, &mut nb, Duration::from_secs(5), |nm| {
        nm.peer_by_key(&ka).is_some() && ports(nm).contains(r#""First":22,"Last":22"#)
    })
    .await;
    // Replaced as editors do; nobody calls reload or sends SIGHUP.
    let path = e._dir.path().join("policy.hujson");
    let tmp = e._dir.path().join("policy.tmp");
    std::fs::write(&tmp, policy(2222)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let t0 = Instant::now();
    until(&mut sb, &mut nb, Duration::from_secs(3), |nm| {
        ports(nm).contains(r#""First":2222,"Last":2222"#)
    })
    .await;
    eprintln!("edited policy in bob's filter after {:?}", t0.elapsed());
    // An invalid edit is refused: the next valid one still takes effect.
    std::fs::write(&tmp, "{\"acls\": [{\"action\": \"deny\"}]}").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(e
        .server
        .reload_policy()
        .await
        .unwrap_err()
        .contains("line 1"));
    std::fs::write(&tmp, policy(23)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    until(&mut sb, &mut nb, Duration::from_secs(3), |nm| {
        ports(nm).contains(r#""First":23,"Last":23"#)
    })
    .await;
}

#[tokio::test]
async fn nodes_see_each_other_and_changes_arrive_within_a_second() {
    let e = env().await;
    let a = device(&e, &e.auth_key, "192.0.2.1:41641").await.unwrap();
    let b = device(&e, &e.auth_key, "192.0.2.2:41641").await.unwrap();
    let mut sa = a.client.map_stream(&a.req).await.unwrap();
    let mut sb = b.client.map_stream(&b.req).await.unwrap();
    let (mut na, mut nb) = (NetMap::default(), NetMap::default());
    let (ka, kb) = (a.node.public(), b.node.public());
    until(&mut sa, &mut na, Duration::from_secs(5), |nm| {
        nm.peer_by_key(&kb).is_some()
    })
    .await;
    until(&mut sb, &mut nb, Duration::from_secs(5), |nm| {
        nm.peer_by_key(&ka).is_some()
    })
    .await;
    let pa = nb.peer_by_key(&ka).unwrap();
    assert_eq!(pa.addresses, na.self_node.as_ref().unwrap().addresses);
    assert!(
        pa.addresses[0].to_string().starts_with("100.64.0."),
        "{pa:?}"
    );
    assert_eq!(pa.endpoints, vec!["192.0.2.1:41641".to_string()]);
    assert_eq!(pa.home_region().map(proto::RegionId::get), Some(900));
    assert!(na.relay_map.as_ref().unwrap().regions.contains_key(&900));
    assert_eq!(
        na.packet_filter.as_ref().unwrap().as_array().unwrap().len(),
        1
    );

    // A third node appears in both streams within 1 s.
    let c = device(&e, &e.auth_key, "192.0.2.3:41641").await.unwrap();
    let kc = c.node.public();
    let t0 = Instant::now();
    let mut sc = c.client.map_stream(&c.req).await.unwrap();
    until(&mut sa, &mut na, Duration::from_secs(1), |nm| {
        nm.peer_by_key(&kc).is_some()
    })
    .await;
    until(&mut sb, &mut nb, Duration::from_secs(1), |nm| {
        nm.peer_by_key(&kc).is_some()
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(1));

    // An endpoint change pushed by a lite request reaches the others within 1 s.
    let mut moved = a.req.clone();
    moved.endpoints = vec!["198.51.100.7:1234".into()];
    a.client.lite_update(&moved).await.unwrap();
    until(&mut sb, &mut nb, Duration::from_secs(1), |nm| {
        nm.peer_by_key(&ka)
            .is_some_and(|p| p.endpoints == vec!["198.51.100.7:1234".to_string()])
    })
    .await;

    // Deleting a node removes it from the others and /verify refuses it.
    assert!(verify(&e, &kc).await);
    // As `controld nodes delete` would: another connection to the same database file.
    let admin = SqliteStore::open(&e._dir.path().join("controld.db")).unwrap();
    let id_c = admin.node_by_node_key(&kc).unwrap().unwrap().id;
    admin.delete_node(id_c).unwrap();
    until(&mut sa, &mut na, Duration::from_secs(2), |nm| {
        nm.peer_by_key(&kc).is_none()
    })
    .await;
    until(&mut sb, &mut nb, Duration::from_secs(2), |nm| {
        nm.peer_by_key(&kc).is_none()
    })
    .await;
    assert!(!verify(&e, &kc).await);
    // The deleted node's own stream ends.
    let end = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = sc.next().await {}
    })
    .await;
    assert!(end.is_ok(), "deleted node's stream did not end");
}

#[tokio::test]
async fn expired_or_unknown_keys_cannot_register_and_change_nothing() {
    let e = env().await;
    let user = e.store.users().unwrap()[0].clone();
    let (expired, _) = e
        .store
        .create_preauth_key(user.id, true, false, &[], now() - 1, now() - 10)
        .unwrap();
    let err = device(&e, &expired, "192.0.2.9:1").await.err().unwrap();
    assert!(err.contains("expired"), "{err}");
    let err = device(&e, "agentd-auth-0000", "192.0.2.9:1")
        .await
        .err()
        .unwrap();
    assert!(err.contains("unknown"), "{err}");
    assert!(e.store.nodes().unwrap().is_empty());
    assert!(!verify(&e, &NodePrivate::generate().public()).await);
}

/// POSTs /ts2021 by hand; returns the socket after the 101 and the handshake response.
async fn raw_ts2021(e: &Env) -> tokio::net::TcpStream {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let control_key = fetch_control_key(&e.url, CAPVER).await.unwrap();
    let (_hs, init) =
        control::noise::ClientHandshake::start(&MachinePrivate::generate(), &control_key, CAPVER)
            .unwrap();
    let mut s = tokio::net::TcpStream::connect(e.server.addr())
        .await
        .unwrap();
    let req = format!(
        "POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {}\r\n\r\n",
        base64::engine::general_purpose::STANDARD.encode(init)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let mut resp = [0u8; 51];
    s.read_exact(&mut resp).await.unwrap();
    s
}

async fn closed_soon(s: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut sink = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    assert!(r.is_ok(), "server kept a broken ts2021 connection open");
}

#[tokio::test]
async fn bad_input_gets_an_error_or_a_closed_connection_and_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = env().await;
    // A bad handshake: 400 with the reason.
    for header in ["X-Tailscale-Handshake: bm90IGEgaGFuZHNoYWtl\r\n", ""] {
        let mut s = tokio::net::TcpStream::connect(e.server.addr())
            .await
            .unwrap();
        let req = format!("POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\n{header}\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    }
    // A record over 4096 bytes, and a record that does not decrypt: connection closed.
    let mut s = raw_ts2021(&e).await;
    s.write_all(&[0x04, 0xFF, 0xFF]).await.unwrap();
    closed_soon(&mut s).await;
    let mut s = raw_ts2021(&e).await;
    s.write_all(&[0x04, 0x00, 0x20]).await.unwrap();
    s.write_all(&[0u8; 32]).await.unwrap();
    closed_soon(&mut s).await;
    assert_eq!(
        e.server
            .metrics()
            .noise_handshakes
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // A malformed JSON body: 400.
    let control_key = fetch_control_key(&e.url, CAPVER).await.unwrap();
    let client = ControlClient::connect(&e.url, &MachinePrivate::generate(), &control_key, CAPVER)
        .await
        .unwrap();
    let err = client
        .post(
            "/machine/register",
            &serde_json::json!("not an object"),
            None,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");

    // A node key already registered to another machine is refused.
    let a = device(&e, &e.auth_key, "192.0.2.1:1").await.unwrap();
    let thief = ControlClient::connect(&e.url, &MachinePrivate::generate(), &control_key, CAPVER)
        .await
        .unwrap();
    let resp = thief
        .register(&RegisterRequest {
            version: CAPVER as u32,
            node_key: a.node.public(),
            auth: Some(RegisterAuth {
                auth_key: e.auth_key.clone(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!resp.machine_authorized);
    assert!(resp.error.contains("another machine"), "{resp:?}");
    assert_eq!(
        e.store.nodes().unwrap().len(),
        1,
        "nothing was written for refused input"
    );

    // And the server still serves well-behaved clients.
    let b = device(&e, &e.auth_key, "192.0.2.2:1").await.unwrap();
    let mut sb = b.client.map_stream(&b.req).await.unwrap();
    let mut nb = NetMap::default();
    until(&mut sb, &mut nb, Duration::from_secs(5), |nm| {
        nm.peer_by_key(&a.node.public()).is_some()
    })
    .await;
}
