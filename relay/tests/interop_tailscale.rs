//! Interoperability with Tailscale's own programs (pinned v1.102.3, installed by `.ci/run`
//! with `go install` into a cache outside the repository):
//! - Tailscale's `derpprobe` (Go DERP client and STUN client) against relayd;
//! - our DERP client against Tailscale's `derper`.
//!
//! The binaries are looked up in `$AGENTD_TAILSCALE_BIN`, else `~/.cache/agentd-interop/bin`.
//! Without them the tests are skipped on a developer machine and fail under `CI=true`.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;

fn tailscale_bin(name: &str) -> Option<PathBuf> {
    testkit::interop::tool(name)
}

#[tokio::test]
async fn tailscale_derpprobe_passes_packet_and_stun_probes_against_relayd() {
    let Some(derpprobe) = tailscale_bin("derpprobe") else {
        return;
    };
    let cert = test_cert();
    let mut cfg = config();
    cfg.tls = Some(tls_config(&cert));
    let srv = start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("derpmap.json");
    std::fs::write(
        &map,
        format!(
            r#"{{"Regions":{{"900":{{"RegionID":900,"RegionCode":"loc","RegionName":"Local","Nodes":[{{"Name":"900a","RegionID":900,"HostName":"localhost","IPv4":"127.0.0.1","IPv6":"none","STUNPort":{},"DERPPort":{},"InsecureForTests":true}}]}}}}}}"#,
            srv.stun_addr().unwrap().port(),
            srv.http_addr().port()
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(derpprobe)
            .args([
                "--derp-map",
                &format!("file://{}", map.display()),
                "--once",
                "--tls-interval=0",
                "--spread=false",
            ])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // Two Go DERP clients exchanged packets through relayd (the "mesh" probe of one node).
    assert!(log.contains("good: derp/loc/900a/900a/mesh"), "{log}");
    // Tailscale's STUN client got its address from relayd's STUN server.
    assert!(log.contains("good: derp/loc/900a/udp:"), "{log}");
    assert!(
        srv.metrics()
            .packets_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn our_client_exchanges_packets_through_tailscale_derper() {
    let Some(derper) = tailscale_bin("derper") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert();
    // derper --certmode=manual reads <certdir>/<hostname>.crt and .key.
    write_cert_files(&cert, dir.path(), "localhost");
    let (plain_port, tls_port) = (free_port(), free_port());
    let spawn = |args: Vec<String>| {
        KillOnDrop(
            Command::new(&derper)
                .args(args)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let common_args = |port: u16, name: &str| -> Vec<String> {
        vec![
            "-a".into(),
            format!("127.0.0.1:{port}"),
            "-c".into(),
            dir.path().join(format!("{name}.key")).display().to_string(),
            "--http-port=-1".into(),
            "--stun=false".into(),
            "--mesh-psk-file=".into(),
        ]
    };
    let _plain = spawn(common_args(plain_port, "plain"));
    let mut tls_args = common_args(tls_port, "tls");
    tls_args.extend([
        "--certmode=manual".into(),
        format!("--certdir={}", dir.path().display()),
        "--hostname=localhost".into(),
    ]);
    let _tls = spawn(tls_args);

    let plain_addr = format!("127.0.0.1:{plain_port}").parse().unwrap();
    let tls_addr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    for (name, t) in [
        ("http upgrade", target(plain_addr, None, false)),
        ("websocket", target(plain_addr, None, true)),
        ("tls", target(tls_addr, Some(&cert), false)),
    ] {
        // derper takes a moment to start listening.
        let mut tries = 0;
        let (ka, mut a) = loop {
            let key = proto::NodePrivate::generate();
            match relay::client::connect(&t, &key, &relay::handshake::ClientInfo::regular()).await {
                Ok(c) => break (key, c),
                Err(e) => {
                    tries += 1;
                    assert!(tries < 100, "{name}: cannot connect to derper: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let (kb, mut b) = client(&t).await;
        a.writer
            .send_packet(&kb.public(), b"hello derper")
            .await
            .unwrap();
        assert_eq!(
            recv_packet(&mut b).await,
            (ka.public(), Bytes::from_static(b"hello derper")),
            "{name}"
        );
        // And back, the largest packet a frame may carry: over WebSocket it must go out
        // in messages Go's library accepts (it refuses those over 32 KiB).
        let big = Bytes::from(vec![0x5A; relay::frame::MAX_PACKET_SIZE]);
        b.writer.send_packet(&ka.public(), &big).await.unwrap();
        assert_eq!(recv_packet(&mut a).await, (kb.public(), big), "{name}");
        b.writer
            .send(&relay::frame::Frame::Ping { data: *b"12345678" })
            .await
            .unwrap();
        let pong = recv_matching(&mut b, |f| matches!(f, relay::frame::Frame::Pong { .. })).await;
        assert_eq!(
            pong,
            relay::frame::Frame::Pong { data: *b"12345678" },
            "{name}"
        );
        // derper's PeerGone after the sender leaves, as our relay does.
        drop(a);
        let gone = recv_matching(&mut b, |f| {
            matches!(f, relay::frame::Frame::PeerGone { .. })
        })
        .await;
        assert_eq!(
            gone,
            relay::frame::Frame::PeerGone {
                peer: ka.public(),
                reason: relay::frame::PeerGoneReason::Disconnected
            },
            "{name}"
        );
    }

    // Our reconnecting client's liveness pings, answered by derper: an idle connection
    // stays up on its Pongs alone (derper's keepalive comes only every minute).
    let mut cc = relay::client::RelayClientConfig::new(
        target(plain_addr, None, false),
        proto::NodePrivate::generate(),
    );
    cc.liveness = relay::client::liveness::LivenessConfig {
        ping_after: Duration::from_millis(200),
        pong_timeout: Duration::from_millis(500),
    };
    let (rc, mut events) = relay::client::RelayClient::spawn(cc);
    let first = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
    assert!(
        matches!(first, Some(relay::client::RelayEvent::Connected { .. })),
        "{first:?}"
    );
    let r = tokio::time::timeout(Duration::from_secs(3), events.recv()).await;
    assert!(r.is_err(), "derper's answers did not keep it up: {r:?}");
    let pongs = rc
        .stats()
        .pongs_received
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(pongs >= 5, "{pongs} pongs from derper in 3 s");
}
