//! The reconnecting client against real relays, and the relayd binary's lifecycle.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use proto::NodePrivate;
use relay::client::liveness::LivenessConfig;
use relay::client::{DisconnectReason, RelayClient, RelayClientConfig, RelayEvent};
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

/// Liveness deadlines short enough for a test: dead after 600 ms of silence.
fn quick_liveness() -> LivenessConfig {
    LivenessConfig {
        ping_after: Duration::from_millis(300),
        pong_timeout: Duration::from_millis(300),
    }
}

async fn connected(rx: &mut mpsc::Receiver<RelayEvent>) -> std::net::SocketAddr {
    loop {
        if let RelayEvent::Connected { remote, .. } = next_event(rx).await {
            return remote;
        }
    }
}

#[tokio::test]
async fn an_idle_connection_is_pinged_while_silent_and_stays_up() {
    // The server's keepalive (60 s) says nothing within the test: only our pings do.
    let srv = start(config()).await;
    let mut cc = RelayClientConfig::new(plain(srv.http_addr()), NodePrivate::generate());
    cc.liveness = quick_liveness();
    let (client, mut events) = RelayClient::spawn(cc);
    connected(&mut events).await;
    let r = tokio::time::timeout(Duration::from_secs(3), events.recv()).await;
    assert!(r.is_err(), "a healthy idle connection was dropped: {r:?}");
    let pings = client.stats().pings_sent.load(Ordering::Relaxed);
    let pongs = client.stats().pongs_received.load(Ordering::Relaxed);
    // One ping per 300 ms of silence (plus a round trip): about ten in 3 s, not more.
    assert!((5..=11).contains(&pings), "{pings} pings in 3 s");
    assert!(pongs + 1 >= pings, "{pongs} pongs for {pings} pings");
}

#[tokio::test]
async fn a_blackholed_node_is_declared_dead_and_the_regions_next_node_takes_over() {
    let a = start(config()).await;
    let b = start(config()).await;
    let proxy = stall_proxy(a.http_addr()).await;
    let mut cc = RelayClientConfig::new(plain(proxy.addr), NodePrivate::generate());
    cc.alternates = vec![plain(b.http_addr())];
    cc.liveness = quick_liveness();
    let (rc, mut events) = RelayClient::spawn(cc);
    assert_eq!(connected(&mut events).await, proxy.addr);

    // Node a's packets are dropped from now on, both ways; its sockets stay open.
    proxy.set(Flow::Blackhole);
    let t0 = Instant::now();
    let (reason, error) = loop {
        if let RelayEvent::Disconnected { reason, error, .. } = next_event(&mut events).await {
            break (reason, error);
        }
    };
    let dead_after = t0.elapsed();
    assert_eq!(reason, DisconnectReason::DeadSilent, "{error}");
    assert!(
        dead_after >= Duration::from_millis(300) && dead_after < Duration::from_millis(1500),
        "declared dead after {dead_after:?}"
    );
    // Straight to the next node: not back to the silent one (whose dial would hang).
    assert_eq!(connected(&mut events).await, b.http_addr());
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    assert!(rc.stats().pings_sent.load(Ordering::Relaxed) >= 1);

    // And it carries traffic there.
    let (kb, mut peer) = client(&plain(b.http_addr())).await;
    rc.send(kb.public(), Bytes::from_static(b"on b"))
        .await
        .unwrap();
    assert_eq!(recv_packet(&mut peer).await.1, Bytes::from_static(b"on b"));
}

#[tokio::test]
async fn a_write_that_cannot_complete_is_declared_dead() {
    let srv = start(config()).await;
    let proxy = stall_proxy(srv.http_addr()).await;
    let mut cc = RelayClientConfig::new(plain(proxy.addr), NodePrivate::generate());
    // Silence alone would take a minute here: only the write deadline can fire.
    cc.liveness = LivenessConfig {
        ping_after: Duration::from_secs(60),
        pong_timeout: Duration::from_secs(60),
    };
    cc.write_timeout = Duration::from_millis(500);
    let (client, mut events) = RelayClient::spawn(cc);
    connected(&mut events).await;

    // The server side stops reading: the socket buffers fill and the writes block.
    proxy.set(Flow::StopReading);
    let dst = NodePrivate::generate().public();
    let sender = {
        let client = client.clone();
        tokio::spawn(async move {
            let big = Bytes::from(vec![0u8; 60_000]);
            loop {
                if client.send(dst, big.clone()).await.is_err() {
                    return;
                }
            }
        })
    };
    let t0 = Instant::now();
    let reason = loop {
        if let RelayEvent::Disconnected { reason, .. } = next_event(&mut events).await {
            break reason;
        }
    };
    sender.abort();
    assert_eq!(reason, DisconnectReason::DeadWriteStalled);
    assert!(t0.elapsed() < WAIT, "took {:?}", t0.elapsed());
}

#[tokio::test]
async fn keepalives_keep_a_quiet_connection_alive_without_pings() {
    let mut cfg = config();
    cfg.keepalive = Duration::from_millis(100);
    let srv = start(cfg).await;
    let mut cc = RelayClientConfig::new(plain(srv.http_addr()), NodePrivate::generate());
    // Keepalive interval is 100 ms + up to 5 s of jitter, always under 5.5 s of silence.
    cc.liveness = LivenessConfig {
        ping_after: Duration::from_millis(5_500),
        pong_timeout: Duration::from_secs(1),
    };
    let (client, mut events) = RelayClient::spawn(cc);
    assert!(matches!(
        next_event(&mut events).await,
        RelayEvent::Connected { .. }
    ));
    let r = tokio::time::timeout(Duration::from_secs(8), events.recv()).await;
    assert!(r.is_err(), "connection dropped despite keepalives: {r:?}");
    assert_eq!(client.stats().pings_sent.load(Ordering::Relaxed), 0);
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
