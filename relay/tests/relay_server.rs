//! relayd behaviour over real loopback sockets: forwarding over every transport, mesh,
//! client verification, bad input, slow receivers, STUN and the HTTP endpoints.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use proto::{MeshKey, NodePrivate};
use relay::client::connect;
use relay::frame::{Frame, PeerGoneReason};
use relay::handshake::ClientInfo;
use relay::server::{RateLimit, VerifyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn two_clients_exchange_packets_over_every_transport() {
    let cert = test_cert();
    let plain_srv = start(config()).await;
    let mut tls_cfg = config();
    tls_cfg.tls = Some(tls_config(&cert));
    let tls_srv = start(tls_cfg).await;
    for (name, t) in [
        ("http upgrade", target(plain_srv.http_addr(), None, false)),
        ("websocket", target(plain_srv.http_addr(), None, true)),
        (
            "tls http upgrade",
            target(tls_srv.http_addr(), Some(&cert), false),
        ),
        (
            "tls websocket",
            target(tls_srv.http_addr(), Some(&cert), true),
        ),
    ] {
        let (ka, mut a) = client(&t).await;
        let (kb, mut b) = client(&t).await;
        a.writer
            .send_packet(&kb.public(), b"hello b")
            .await
            .unwrap();
        let (src, payload) = recv_packet(&mut b).await;
        assert_eq!(
            (src, &payload[..]),
            (ka.public(), &b"hello b"[..]),
            "{name}"
        );
        // A large packet (the 64 KiB maximum) crosses too.
        let big = vec![7u8; 65536];
        b.writer.send_packet(&ka.public(), &big).await.unwrap();
        let (src, payload) = recv_packet(&mut a).await;
        assert_eq!(src, kb.public(), "{name}");
        assert_eq!(payload.len(), 65536, "{name}");
        // Server pings are answered by the client code; the server answers ours.
        a.writer
            .send(&Frame::Ping { data: *b"pingpong" })
            .await
            .unwrap();
        let pong = recv_matching(&mut a, |f| matches!(f, Frame::Pong { .. })).await;
        assert_eq!(pong, Frame::Pong { data: *b"pingpong" }, "{name}");
    }
    assert!(
        tls_srv
            .metrics()
            .packets_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
}

#[tokio::test]
async fn tls_client_refuses_a_certificate_it_does_not_trust_and_accepts_a_pin() {
    let cert = test_cert();
    let other = test_cert();
    let mut cfg = config();
    cfg.tls = Some(tls_config(&cert));
    let srv = start(cfg).await;
    let key = NodePrivate::generate();
    let wrong = target(srv.http_addr(), Some(&other), false);
    let err = connect(&wrong, &key, &ClientInfo::regular())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    let mut pinned = target(srv.http_addr(), None, false);
    pinned.tls = Some(relay::client::tls::TlsSettings {
        server_name: "localhost".into(),
        verify: relay::client::tls::TlsVerify::PinnedSha256(relay::client::tls::cert_sha256(
            &cert.der,
        )),
    });
    connect(&pinned, &key, &ClientInfo::regular())
        .await
        .expect("pinned certificate accepted");
}

#[tokio::test]
async fn unknown_destination_gets_peer_gone_not_here_for_disco_only() {
    let srv = start(config()).await;
    let t = plain(srv.http_addr());
    let (_, mut a) = client(&t).await;
    let nobody = NodePrivate::generate().public();
    a.writer.send_packet(&nobody, b"not disco").await.unwrap();
    a.writer
        .send_packet(&nobody, &disco_payload(1))
        .await
        .unwrap();
    let f = recv_matching(&mut a, |f| matches!(f, Frame::PeerGone { .. })).await;
    assert_eq!(
        f,
        Frame::PeerGone {
            peer: nobody,
            reason: PeerGoneReason::NotHere
        }
    );
    assert_eq!(
        metric(
            srv.http_addr(),
            "relayd_peer_gone_sent_total{reason=\"not_here\"}"
        )
        .await,
        1
    );
    assert!(
        metric(
            srv.http_addr(),
            "relayd_packets_dropped_total{reason=\"unknown_dest\"}"
        )
        .await
            >= 2
    );
}

#[tokio::test]
async fn peer_gone_disconnected_reaches_those_who_received_from_the_leaver() {
    let srv = start(config()).await;
    let t = plain(srv.http_addr());
    let (ka, mut a) = client(&t).await;
    let (kb, mut b) = client(&t).await;
    b.writer.send_packet(&ka.public(), b"from b").await.unwrap();
    recv_packet(&mut a).await;
    drop(b);
    let f = recv_matching(&mut a, |f| matches!(f, Frame::PeerGone { .. })).await;
    assert_eq!(
        f,
        Frame::PeerGone {
            peer: kb.public(),
            reason: PeerGoneReason::Disconnected
        }
    );
}

#[tokio::test]
async fn newest_duplicate_connection_receives_and_old_one_stays_open() {
    let srv = start(config()).await;
    let t = plain(srv.http_addr());
    let key = NodePrivate::generate();
    let mut old = client_with_key(&t, &key).await;
    let mut new = client_with_key(&t, &key).await;
    let (ks, mut s) = client(&t).await;
    s.writer.send_packet(&key.public(), b"1").await.unwrap();
    assert_eq!(&recv_packet(&mut new).await.1[..], b"1");
    // The old connection writes: it becomes the active one.
    old.writer.send_packet(&ks.public(), b"hi").await.unwrap();
    recv_packet(&mut s).await;
    s.writer.send_packet(&key.public(), b"2").await.unwrap();
    assert_eq!(&recv_packet(&mut old).await.1[..], b"2");
    // Closing one duplicate does not tell anyone the key is gone.
    drop(new);
    s.writer.send_packet(&key.public(), b"3").await.unwrap();
    assert_eq!(&recv_packet(&mut old).await.1[..], b"3");
    assert_eq!(srv.connection_count(), 2);
}

fn mesh_pair_configs(
    retry: Duration,
) -> (relay::server::ServerConfig, relay::server::ServerConfig) {
    let psk: MeshKey = "5a".repeat(32).parse().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let mut a = config();
    a.listen = format!("127.0.0.1:{pa}").parse().unwrap();
    let mut b = config();
    b.listen = format!("127.0.0.1:{pb}").parse().unwrap();
    for (cfg, other) in [(&mut a, pb), (&mut b, pa)] {
        cfg.mesh_key = Some(psk.clone());
        cfg.mesh_with = vec![plain(format!("127.0.0.1:{other}").parse().unwrap())];
        cfg.mesh_retry = retry;
    }
    (a, b)
}

/// Sends from `from` to `to_key` until `to` receives it (mesh routes take a moment).
async fn send_until_received(
    from: &mut relay::client::RelayConn,
    to: &mut relay::client::RelayConn,
    to_key: &proto::NodePublic,
    payload: &[u8],
) {
    let deadline = Instant::now() + WAIT;
    loop {
        from.writer.send_packet(to_key, payload).await.unwrap();
        if let Ok(Ok(f)) = tokio::time::timeout(Duration::from_millis(200), to.reader.recv()).await
        {
            if matches!(&f, Frame::RecvPacket { payload: p, .. } if &p[..] == payload) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "packet never crossed the mesh");
    }
}

#[tokio::test]
async fn meshed_relays_deliver_across_nodes_and_report_peer_gone() {
    let (ca, cb) = mesh_pair_configs(Duration::from_millis(200));
    let a = start(ca).await;
    let b = start(cb).await;
    let (kx, mut x) = client(&plain(a.http_addr())).await;
    let (ky, mut y) = client(&plain(b.http_addr())).await;
    send_until_received(&mut x, &mut y, &ky.public(), b"x to y").await;
    send_until_received(&mut y, &mut x, &kx.public(), b"y to x").await;
    // One hop: the packet left A over the mesh and entered B from the mesh.
    assert!(metric(a.http_addr(), "relayd_packets_forwarded_out_total").await >= 1);
    assert!(metric(b.http_addr(), "relayd_packets_forwarded_in_total").await >= 1);
    // Y leaves the region: X, which received from Y, is told.
    drop(y);
    let f = recv_matching(&mut x, |f| matches!(f, Frame::PeerGone { .. })).await;
    assert_eq!(
        f,
        Frame::PeerGone {
            peer: ky.public(),
            reason: PeerGoneReason::Disconnected
        }
    );
    // And a disco packet to Y now gets NotHere.
    x.writer
        .send_packet(&ky.public(), &disco_payload(2))
        .await
        .unwrap();
    let f = recv_matching(&mut x, |f| matches!(f, Frame::PeerGone { .. })).await;
    assert_eq!(
        f,
        Frame::PeerGone {
            peer: ky.public(),
            reason: PeerGoneReason::NotHere
        }
    );
}

#[tokio::test]
async fn a_mesh_peer_that_goes_silent_loses_its_link_and_routes() {
    let (mut ca, cb) = mesh_pair_configs(Duration::from_millis(200));
    let b = start(cb).await;
    // A reaches B through a proxy that can drop everything (B's own link to A is direct).
    let proxy = stall_proxy(b.http_addr()).await;
    ca.mesh_with = vec![plain(proxy.addr)];
    let a = start(ca).await;
    let (_kx, mut x) = client(&plain(a.http_addr())).await;
    let (ky, mut y) = client(&plain(b.http_addr())).await;
    send_until_received(&mut x, &mut y, &ky.public(), b"before").await;
    assert_eq!(metric(a.http_addr(), "relayd_mesh_links_up").await, 1);

    proxy.set(Flow::Blackhole);
    let t0 = Instant::now();
    while metric(a.http_addr(), "relayd_mesh_links_up").await != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "A still trusts the silent mesh link"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("silent mesh link dropped after {:?}", t0.elapsed());
    // Its routes went with it: a disco packet for Y is now answered NotHere.
    x.writer
        .send_packet(&ky.public(), &disco_payload(3))
        .await
        .unwrap();
    let f = recv_matching(&mut x, |f| matches!(f, Frame::PeerGone { .. })).await;
    assert_eq!(
        f,
        Frame::PeerGone {
            peer: ky.public(),
            reason: PeerGoneReason::NotHere
        }
    );
}

#[tokio::test]
async fn broken_mesh_link_is_redialled() {
    let (ca, cb) = mesh_pair_configs(Duration::from_millis(200));
    let b_listen = cb.listen;
    let cb_again = cb.clone();
    let a = start(ca).await;
    let b = start(cb).await;
    let (kx, mut x) = client(&plain(a.http_addr())).await;
    let ky = NodePrivate::generate();
    let mut y = client_with_key(&plain(b_listen), &ky).await;
    send_until_received(&mut x, &mut y, &ky.public(), b"before").await;
    b.shutdown().await;
    drop(y);
    // A notices the broken link; B comes back on the same address.
    let b = start(cb_again).await;
    let mut y = client_with_key(&plain(b.http_addr()), &ky).await;
    send_until_received(&mut x, &mut y, &ky.public(), b"after").await;
    send_until_received(&mut y, &mut x, &kx.public(), b"and back").await;
    assert!(metric(a.http_addr(), "relayd_mesh_links_up").await == 1);
}

#[tokio::test]
async fn mesh_only_frames_and_wrong_mesh_key_are_refused() {
    let mut cfg = config();
    cfg.mesh_key = Some("11".repeat(32).parse().unwrap());
    let srv = start(cfg).await;
    let t = plain(srv.http_addr());
    let (_, mut a) = client(&t).await;
    a.writer.send(&Frame::WatchConns).await.unwrap();
    assert_closed(&mut a).await;
    let bad = ClientInfo {
        mesh_key: "22".repeat(32),
        ..ClientInfo::regular()
    };
    assert!(connect(&t, &NodePrivate::generate(), &bad).await.is_err());
    let good = ClientInfo {
        mesh_key: "11".repeat(32),
        ..ClientInfo::regular()
    };
    let mut m = connect(&t, &NodePrivate::generate(), &good).await.unwrap();
    // A mesh client may watch: it is told about the clients already connected.
    let (kc, _c) = client(&t).await;
    m.writer.send(&Frame::WatchConns).await.unwrap();
    let f = recv_matching(
        &mut m,
        |f| matches!(f, Frame::PeerPresent { peer, .. } if *peer == kc.public()),
    )
    .await;
    assert!(
        matches!(
            f,
            Frame::PeerPresent {
                addr: Some(_),
                flags: 1,
                ..
            }
        ),
        "{f:?}"
    );
    assert_eq!(
        metric(
            srv.http_addr(),
            "relayd_connections_closed_total{reason=\"mesh_only_frame\"}"
        )
        .await,
        1
    );
    assert_eq!(
        metric(
            srv.http_addr(),
            "relayd_connections_closed_total{reason=\"bad_mesh_key\"}"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn verify_url_refuses_unknown_clients_and_cuts_off_revoked_ones() {
    let v = verify_server().await;
    let allowed = NodePrivate::generate();
    v.allowed
        .lock()
        .unwrap()
        .insert(allowed.public().to_string());
    let mut cfg = config();
    cfg.verify = Some(VerifyConfig {
        url: v.url.clone(),
        fail_open: false,
        interval: Duration::from_millis(300),
        timeout: Duration::from_secs(2),
    });
    let srv = start(cfg).await;
    let t = plain(srv.http_addr());
    let stranger = NodePrivate::generate();
    let err = connect(&t, &stranger, &ClientInfo::regular())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("handshake"), "{err}");
    let mut conn = client_with_key(&t, &allowed).await;
    assert!(v
        .requests
        .lock()
        .unwrap()
        .contains(&stranger.public().to_string()));
    // Revoke: the next re-verification disconnects the client, no restart needed.
    v.allowed.lock().unwrap().clear();
    let t0 = Instant::now();
    assert_closed(&mut conn).await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(
        metric(
            srv.http_addr(),
            "relayd_connections_closed_total{reason=\"verify_revoked\"}"
        )
        .await,
        1
    );
    assert_eq!(
        metric(
            srv.http_addr(),
            "relayd_connections_closed_total{reason=\"verify_refused\"}"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn unreachable_verify_url_admits_when_fail_open_and_refuses_when_fail_closed() {
    let dead = format!("http://127.0.0.1:{}/verify", free_port());
    for fail_open in [true, false] {
        let mut cfg = config();
        cfg.verify = Some(VerifyConfig {
            url: dead.clone(),
            fail_open,
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
        });
        let srv = start(cfg).await;
        let r = connect(
            &plain(srv.http_addr()),
            &NodePrivate::generate(),
            &ClientInfo::regular(),
        )
        .await;
        assert_eq!(r.is_ok(), fail_open, "fail_open={fail_open}");
    }
}

/// Bad input on one connection closes only that connection, with a counted reason.
#[tokio::test]
async fn each_bad_input_closes_only_its_own_connection() {
    let srv = start(config()).await;
    let addr = srv.http_addr();
    let t = plain(addr);
    let (ka, mut a) = client(&t).await;
    let (kb, mut b) = client(&t).await;

    // Frames sent after a good handshake.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("oversize_frame", vec![0x04, 0x00, 0x02, 0x00, 0x00]),
        ("bad_frame", vec![0x07, 0x00, 0x00, 0x00, 0x02, 0x01, 0x01]),
        ("bad_frame", vec![0x04, 0x00, 0x00, 0x00, 0x03, 1, 2, 3]),
        (
            "out_of_order_frame",
            Frame::ClientInfo {
                key: ka.public(),
                sealed: Bytes::from(vec![0; 40]),
            }
            .to_bytes()
            .to_vec(),
        ),
        (
            "out_of_order_frame",
            Frame::ServerKey { key: ka.public() }.to_bytes().to_vec(),
        ),
        (
            "mesh_only_frame",
            Frame::ClosePeer { peer: kb.public() }.to_bytes().to_vec(),
        ),
    ];
    for (reason, bytes) in &cases {
        let before = metric(
            addr,
            &format!("relayd_connections_closed_total{{reason=\"{reason}\"}}"),
        )
        .await;
        let (_, mut bad) = client(&t).await;
        bad.writer.send_raw(bytes).await.unwrap();
        assert_closed(&mut bad).await;
        let after = metric(
            addr,
            &format!("relayd_connections_closed_total{{reason=\"{reason}\"}}"),
        )
        .await;
        assert_eq!(after, before + 1, "{reason}");
        a.writer
            .send_packet(&kb.public(), reason.as_bytes())
            .await
            .unwrap();
        assert_eq!(
            &recv_packet(&mut b).await.1[..],
            reason.as_bytes(),
            "others unaffected after {reason}"
        );
    }

    // Broken handshakes, written on raw sockets.
    async fn raw_upgrade(addr: std::net::SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
        )
        .await
        .unwrap();
        s
    }
    async fn closed_by_server(mut s: TcpStream) {
        let mut sink = Vec::new();
        let r = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "server did not close the raw connection");
    }
    // A ClientInfo whose box does not open.
    let mut s = raw_upgrade(addr).await;
    let mut junk = Frame::ClientInfo {
        key: ka.public(),
        sealed: Bytes::from(vec![9u8; 80]),
    }
    .to_bytes()
    .to_vec();
    s.write_all(&junk).await.unwrap();
    closed_by_server(s).await;
    // A SendPacket before any ClientInfo.
    let mut s = raw_upgrade(addr).await;
    s.write_all(
        &Frame::SendPacket {
            dst: kb.public(),
            payload: Bytes::from_static(b"x"),
        }
        .to_bytes(),
    )
    .await
    .unwrap();
    closed_by_server(s).await;
    // A ClientInfo over the 256 KiB limit.
    let mut s = raw_upgrade(addr).await;
    s.write_all(&[0x02, 0x00, 0x10, 0x00, 0x00]).await.unwrap();
    closed_by_server(s).await;
    // Garbage instead of HTTP.
    let mut s = TcpStream::connect(addr).await.unwrap();
    junk.extend_from_slice(b"\r\n\r\n");
    s.write_all(&junk).await.unwrap();
    closed_by_server(s).await;

    assert_eq!(
        metric(
            addr,
            "relayd_connections_closed_total{reason=\"bad_client_info\"}"
        )
        .await,
        1
    );
    assert!(
        metric(
            addr,
            "relayd_connections_closed_total{reason=\"out_of_order_frame\"}"
        )
        .await
            >= 3
    );
    a.writer
        .send_packet(&kb.public(), b"still fine")
        .await
        .unwrap();
    assert_eq!(&recv_packet(&mut b).await.1[..], b"still fine");
}

#[tokio::test]
async fn receiver_that_stops_reading_does_not_slow_other_pairs() {
    let srv = start(config()).await;
    let addr = srv.http_addr();
    let t = plain(addr);
    // The stuck receiver connects and never reads again.
    let (kstuck, stuck) = client(&t).await;
    let (_, mut flooder) = client(&t).await;
    let (ka, mut a) = client(&t).await;
    let (kb, mut b) = client(&t).await;
    let flood = tokio::spawn(async move {
        let payload = vec![0xEE; 1200];
        for _ in 0..20_000 {
            flooder
                .writer
                .queue_packet(&kstuck.public(), &payload)
                .unwrap();
            if flooder.writer.queued_len() > 64 << 10 && flooder.writer.flush().await.is_err() {
                break;
            }
        }
        let _ = flooder.writer.flush().await;
        flooder
    });
    // Meanwhile a and b keep a ping-pong going; every round trip stays fast.
    let mut worst = Duration::ZERO;
    for i in 0..200u32 {
        let t0 = Instant::now();
        a.writer
            .send_packet(&kb.public(), &i.to_be_bytes())
            .await
            .unwrap();
        recv_packet(&mut b).await;
        b.writer
            .send_packet(&ka.public(), &i.to_be_bytes())
            .await
            .unwrap();
        recv_packet(&mut a).await;
        worst = worst.max(t0.elapsed());
    }
    let _flooder = flood.await.unwrap();
    assert!(
        worst < Duration::from_secs(1),
        "a round trip took {worst:?} while another receiver was stuck"
    );
    let dropped = metric(addr, "relayd_packets_dropped_total{reason=\"queue_head\"}").await
        + metric(addr, "relayd_packets_dropped_total{reason=\"write_error\"}").await
        + metric(addr, "relayd_packets_dropped_total{reason=\"gone\"}").await;
    assert!(dropped > 0, "the stuck receiver's drops show in /metrics");
    drop(stuck);
}

#[tokio::test]
async fn client_receive_rate_limit_slows_the_sender_and_accept_limit_refuses() {
    let mut cfg = config();
    cfg.client_rate = Some(RateLimit {
        per_second: 200_000.0,
        burst: 70_000.0,
    });
    cfg.accept_rate = Some(RateLimit {
        per_second: 0.5,
        burst: 4.0,
    });
    let srv = start(cfg).await;
    let t = plain(srv.http_addr());
    let (_, mut a) = client(&t).await;
    let (kb, mut b) = client(&t).await;
    let t0 = Instant::now();
    // The last packet differs; a full queue drops its oldest packets, never the newest.
    let recv = tokio::spawn(async move { while recv_packet(&mut b).await.1[0] != 2 {} });
    for i in 0..500 {
        a.writer
            .queue_packet(&kb.public(), &[if i == 499 { 2 } else { 1 }; 1000])
            .unwrap();
    }
    a.writer.flush().await.unwrap();
    recv.await.unwrap();
    // (500 KB − 70 KB burst) at 200 KB/s is over two seconds; allow generous slack.
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        srv.metrics()
            .rate_limited_waits
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // Two clients used two of the four accepts; the fifth and sixth are refused.
    let key = NodePrivate::generate();
    let mut refused = 0;
    for _ in 0..4 {
        if connect(&t, &key, &ClientInfo::regular()).await.is_err() {
            refused += 1;
        }
    }
    assert!(refused >= 1);
    assert!(
        srv.metrics()
            .accepts_rate_limited
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn stun_answers_tailscale_and_plain_binding_requests() {
    let srv = start(config()).await;
    let stun = srv.stun_addr().unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    // Tailscale's 40-byte request: SOFTWARE "tailnode" + FINGERPRINT, built with stun-rs.
    use stun_rs::attributes::stun::{Fingerprint, Software, XorMappedAddress};
    use stun_rs::{
        MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder,
        TransactionId,
    };
    let ts = StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::default())
        .with_attribute(Software::new("tailnode").unwrap())
        .with_attribute(Fingerprint::default())
        .build();
    let mut ts_bytes = [0u8; 64];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut ts_bytes, &ts)
        .unwrap();
    assert_eq!(n, 40);
    let mut plain_req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    plain_req.extend_from_slice(&[3u8; 12]);
    for req in [&ts_bytes[..n], &plain_req[..]] {
        sock.send_to(req, stun).await.unwrap();
        let mut buf = [0u8; 256];
        let (len, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let (msg, _) = MessageDecoderBuilder::default()
            .build()
            .decode(&buf[..len])
            .unwrap();
        assert_eq!(msg.class(), MessageClass::SuccessResponse);
        assert_eq!(&buf[8..20], &req[8..20], "transaction id echoed");
        let xma = msg
            .get::<XorMappedAddress>()
            .unwrap()
            .as_xor_mapped_address()
            .unwrap();
        assert_eq!(*xma.socket_address(), me);
    }
    assert_eq!(
        metric(srv.http_addr(), "relayd_stun_requests_total").await,
        2
    );
}

#[tokio::test]
async fn http_endpoints_behave_like_derper() {
    let srv = start(config()).await;
    let addr = srv.http_addr();
    let (status, head, _) = http_get(
        addr,
        "/generate_204",
        &[("X-Tailscale-Challenge", "ts_abc-1.2")],
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        head.contains("X-Tailscale-Response: response ts_abc-1.2"),
        "{head}"
    );
    assert!(head
        .contains("Cache-Control: no-cache, no-store, must-revalidate, no-transform, max-age=0"));
    let (status, head, _) = http_get(
        addr,
        "/generate_204",
        &[("X-Tailscale-Challenge", "bad challenge!")],
    )
    .await;
    assert_eq!(status, 204);
    assert!(!head.contains("X-Tailscale-Response"));
    for p in ["/derp/probe", "/derp/latency-check"] {
        let (status, head, _) = http_get(addr, p, &[]).await;
        assert_eq!(status, 200, "{p}");
        assert!(head.contains("Access-Control-Allow-Origin: *"));
    }
    let (status, _, _) = http_get(addr, "/derp", &[]).await;
    assert_eq!(status, 426, "/derp without Upgrade");
    let (status, _, body) = http_get(addr, "/", &[]).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains(&srv.public_key().to_string()));
    let (status, _, body) = http_get(addr, "/robots.txt", &[]).await;
    assert_eq!(
        (status, &body[..]),
        (200, &b"User-agent: *\nDisallow: /\n"[..])
    );
    let (status, _, body) = http_get(addr, "/metrics", &[]).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    for name in [
        "relayd_clients",
        "relayd_bytes_received_total",
        "relayd_packets_sent_total",
        "relayd_packets_forwarded_out_total",
        "relayd_stun_requests_total",
        "relayd_packets_dropped_total{reason=",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let (status, _, _) = http_get(addr, "/nope", &[]).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn fast_start_client_gets_no_http_response_but_still_a_server_key() {
    let srv = start(config()).await;
    let mut s = TcpStream::connect(srv.http_addr()).await.unwrap();
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n").await.unwrap();
    let mut first = [0u8; 5];
    tokio::time::timeout(WAIT, s.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        [0x01, 0, 0, 0, 40],
        "stream starts with the ServerKey frame, no HTTP"
    );
}
