//! The reconnecting client against real relays, and the relayd binary's lifecycle.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use proto::NodePrivate;
use relay::client::{RelayClient, RelayClientConfig, RelayEvent};
use tokio::sync::mpsc;

async fn next_event(rx: &mut mpsc::Receiver<RelayEvent>) -> RelayEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("event in time")
        .expect("client alive")
}

#[tokio::test]
async fn client_reconnects_with_capped_backoff_and_renotes_preferred() {
    let srv = start(config()).await;
    let addr = srv.http_addr();
    let key = NodePrivate::generate();
    let mut cc = RelayClientConfig::new(plain(addr), key.clone());
    cc.preferred = true;
    cc.backoff_min = Duration::from_millis(50);
    cc.backoff_max = Duration::from_millis(400);
    let (rc, mut events) = RelayClient::spawn(cc);
    assert!(matches!(
        next_event(&mut events).await,
        RelayEvent::Connected { .. }
    ));
    // The server saw NotePreferred(true).
    let deadline = Instant::now() + WAIT;
    while srv
        .metrics()
        .current_home_clients
        .load(std::sync::atomic::Ordering::Relaxed)
        != 1
    {
        assert!(Instant::now() < deadline, "NotePreferred never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut restart_cfg = config();
    restart_cfg.listen = srv.http_addr();
    restart_cfg.private_key = NodePrivate::generate();
    srv.shutdown().await;

    // While the relay is down: delays grow and stop growing at the cap.
    let mut delays = Vec::new();
    while delays.len() < 6 {
        if let RelayEvent::Disconnected { retry_in, .. } = next_event(&mut events).await {
            delays.push(retry_in);
        }
    }
    assert!(
        delays.iter().all(|d| *d <= Duration::from_millis(400)),
        "{delays:?}"
    );
    assert!(
        delays[4] >= Duration::from_millis(200),
        "backoff grew to the cap: {delays:?}"
    );
    // Sends while disconnected are dropped and counted, never buffered.
    let _ = rc.try_send(NodePrivate::generate().public(), Bytes::from_static(b"x"));

    // The relay comes back: the client reconnects by itself and re-sends NotePreferred.
    let srv = start(restart_cfg).await;
    loop {
        if let RelayEvent::Connected { server_key, remote } = next_event(&mut events).await {
            assert_eq!(server_key, srv.public_key());
            assert_eq!(remote, srv.http_addr());
            break;
        }
    }
    let deadline = Instant::now() + WAIT;
    while srv
        .metrics()
        .current_home_clients
        .load(std::sync::atomic::Ordering::Relaxed)
        != 1
    {
        assert!(
            Instant::now() < deadline,
            "NotePreferred not re-sent after reconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And it carries traffic again.
    let (kb, mut b) = client(&plain(srv.http_addr())).await;
    rc.send(kb.public(), Bytes::from_static(b"back"))
        .await
        .unwrap();
    assert_eq!(
        recv_packet(&mut b).await,
        (key.public(), Bytes::from_static(b"back"))
    );
    b.writer.send_packet(&key.public(), b"reply").await.unwrap();
    loop {
        if let RelayEvent::Packet { src, payload } = next_event(&mut events).await {
            assert_eq!((src, &payload[..]), (kb.public(), &b"reply"[..]));
            break;
        }
    }
}

#[tokio::test]
async fn a_dead_node_is_skipped_for_the_regions_next_one_and_the_event_says_which() {
    // The first node refuses connections; the region's second one answers.
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let b = start(config()).await;
    let mut cc = RelayClientConfig::new(plain(dead), NodePrivate::generate());
    cc.alternates = vec![plain(b.http_addr())];
    cc.backoff_min = Duration::from_millis(20);
    cc.backoff_max = Duration::from_millis(50);
    let (_rc, mut events) = RelayClient::spawn(cc);
    let remote = loop {
        if let RelayEvent::Connected { remote, .. } = next_event(&mut events).await {
            break remote;
        }
    };
    assert_eq!(remote, b.http_addr());

    // The second node goes away and the first comes up at its address: back to the first.
    let mut a_cfg = config();
    a_cfg.listen = dead;
    let a = start(a_cfg).await;
    b.shutdown().await;
    let remote = loop {
        if let RelayEvent::Connected { remote, .. } = next_event(&mut events).await {
            break remote;
        }
    };
    assert_eq!(remote, a.http_addr());
}

#[tokio::test]
async fn silent_connection_is_declared_dead_and_replaced() {
    // The server's keepalive (60 s) is far beyond the client's silence limit here.
    let srv = start(config()).await;
    let mut cc = RelayClientConfig::new(plain(srv.http_addr()), NodePrivate::generate());
    cc.silence_timeout = Duration::from_millis(500);
    let (_client, mut events) = RelayClient::spawn(cc);
    assert!(matches!(
        next_event(&mut events).await,
        RelayEvent::Connected { .. }
    ));
    match next_event(&mut events).await {
        RelayEvent::Disconnected { error, .. } => assert!(error.contains("no frame"), "{error}"),
        other => panic!("expected a disconnect, got {other:?}"),
    }
    assert!(matches!(
        next_event(&mut events).await,
        RelayEvent::Connected { .. }
    ));
}

#[tokio::test]
async fn keepalives_keep_a_quiet_connection_alive() {
    let mut cfg = config();
    cfg.keepalive = Duration::from_millis(100);
    let srv = start(cfg).await;
    let mut cc = RelayClientConfig::new(plain(srv.http_addr()), NodePrivate::generate());
    cc.silence_timeout = Duration::from_millis(5_500);
    let (_client, mut events) = RelayClient::spawn(cc);
    assert!(matches!(
        next_event(&mut events).await,
        RelayEvent::Connected { .. }
    ));
    // Keepalive interval is 100 ms + up to 5 s of jitter, always under the 5.5 s limit.
    let r = tokio::time::timeout(Duration::from_secs(8), events.recv()).await;
    assert!(r.is_err(), "connection dropped despite keepalives: {r:?}");
}

#[tokio::test]
async fn relayd_binary_serves_and_drains_on_sigterm() {
    let args = [
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--stun-listen",
        "127.0.0.1:0",
        "--log-level",
        "info",
    ];
    let RelaydProcess {
        mut child,
        addr,
        logs,
    } = spawn_relayd(&args.map(String::from));
    let (ka, mut a) = client(&plain(addr)).await;
    let (kb, mut b) = client(&plain(addr)).await;
    a.writer
        .send_packet(&kb.public(), b"via binary")
        .await
        .unwrap();
    assert_eq!(
        recv_packet(&mut b).await,
        (ka.public(), Bytes::from_static(b"via binary"))
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let t0 = Instant::now();
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < WAIT, "relayd did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "relayd exited with {exit}");
    assert_closed(&mut a).await;
    let logs: Vec<String> = logs.try_iter().collect();
    assert!(logs.iter().any(|l| l.contains("relay stopped")), "{logs:?}");
}

#[test]
fn relayd_help_lists_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_relayd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--listen",
        "--dev",
        "--tls-cert",
        "--tls-key",
        "--key-file",
        "--stun",
        "--stun-listen",
        "--mesh-with",
        "--mesh-psk-file",
        "--mesh-ca-cert",
        "--mesh-retry",
        "--verify-client-url",
        "--verify-client-url-fail-open",
        "--verify-interval",
        "--client-rate-limit",
        "--client-rate-burst",
        "--accept-connection-limit",
        "--accept-connection-burst",
        "--tcp-write-timeout",
        "--max-clients",
        "--log-level",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_relayd")).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--dev"),
        "a bare start explains what is missing"
    );
}
