//! Self-tests of the network lab: each router kind behaves as its name says, the link
//! emulator delays and drops as configured, miniupnpd maps ports, and a lab leaves nothing
//! behind — also when its test panics. They need root; without it they skip (fail under
//! CI=true).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use tests::upnp::{natpmp_external_address, natpmp_map, MapProtocol};
use tests::{lab_or_skip, stun, Lab, LinkParams, RouterSpec};

const STUN_PORT: u16 = 3478;
const TIMEOUT: Duration = Duration::from_secs(2);

fn any_port(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, 0))
}

/// Sends one datagram from `from` and waits up to `wait` for one on `to`; returns what
/// arrived and its source.
fn deliver(
    from: &UdpSocket,
    to: &UdpSocket,
    dest: SocketAddr,
    wait: Duration,
) -> Option<(Vec<u8>, SocketAddr)> {
    let payload = b"lab-probe";
    from.send_to(payload, dest).unwrap();
    to.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 1500];
    match tests::recv_from(to, &mut buf) {
        Ok((n, src)) => Some((buf[..n].to_vec(), src)),
        Err(_) => None,
    }
}

/// Median round-trip time of `samples` echoes of `socket` through `echo`.
fn median_rtt(socket: &UdpSocket, echo: SocketAddr, samples: usize) -> Duration {
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..samples {
        let msg = (i as u32).to_be_bytes();
        let start = Instant::now();
        socket.send_to(&msg, echo).unwrap();
        loop {
            let (n, _) = tests::recv_from(socket, &mut buf).expect("echo answer");
            if buf[..n] == msg {
                break;
            }
        }
        rtts.push(start.elapsed());
    }
    rtts.sort();
    rtts[rtts.len() / 2]
}

/// The link emulator's tests measure to the millisecond (and one fills both cores): each
/// runs alone, while the other tests of this file, which build and tear down namespaces
/// (work the kernel does on the same cores, delaying packets by milliseconds), share.
static TURNS: RwLock<()> = RwLock::new(());

/// For a timing test: the whole file's turn.
fn timing() -> RwLockWriteGuard<'static, ()> {
    TURNS.write().unwrap_or_else(|e| e.into_inner())
}

/// For every other test: a shared turn.
fn shared() -> RwLockReadGuard<'static, ()> {
    TURNS.read().unwrap_or_else(|e| e.into_inner())
}

/// Asserts the median RTT through `echo` is `expected` ± `tolerance`. A shared machine
/// (or the kernel still tearing down an earlier test's namespaces) can delay every packet
/// for a while, so a measurement that is off is taken again, up to three times, a
/// second apart; an emulator that is really off fails all three.
fn assert_rtt(socket: &UdpSocket, echo: SocketAddr, expected: Duration, tolerance: Duration) {
    let mut seen = Vec::new();
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let rtt = median_rtt(socket, echo, 10);
        if rtt.abs_diff(expected) <= tolerance {
            return;
        }
        seen.push(rtt);
    }
    panic!("median RTTs {seen:?}, expected {expected:?} ± {tolerance:?}");
}

#[test]
fn easy_nat_maps_a_socket_to_the_same_public_port_for_every_server() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let s1 = lab.add_server("stun1").unwrap();
    let s2 = lab.add_server("stun2").unwrap();
    let stun1 = lab.start_stun(&s1, (s1.ip, STUN_PORT)).unwrap();
    let stun2 = lab.start_stun(&s2, (s2.ip, STUN_PORT)).unwrap();
    let router = lab.add_router("home", RouterSpec::easy()).unwrap();
    let host = lab.add_lan_host("alice", &router).unwrap();
    assert!(host.ip.is_private());
    assert!(!router.wan_ip.is_private());

    let socket = lab.udp_bind(&host, any_port(host.ip)).unwrap();
    let local_port = socket.local_addr().unwrap().port();
    let via1 = stun::query(&socket, stun1, TIMEOUT).unwrap();
    let via2 = stun::query(&socket, stun2, TIMEOUT).unwrap();
    assert_eq!(via1, via2, "endpoint-independent mapping");
    assert_eq!(via1.ip(), router.wan_ip);
    assert_eq!(via1.port(), local_port, "masquerade preserves the port");
}

#[test]
fn hard_nat_maps_each_server_to_a_different_public_port() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let s1 = lab.add_server("stun1").unwrap();
    let s2 = lab.add_server("stun2").unwrap();
    let stun1 = lab.start_stun(&s1, (s1.ip, STUN_PORT)).unwrap();
    let stun2 = lab.start_stun(&s2, (s2.ip, STUN_PORT)).unwrap();
    let router = lab.add_router("home", RouterSpec::hard()).unwrap();
    let host = lab.add_lan_host("alice", &router).unwrap();

    let socket = lab.udp_bind(&host, any_port(host.ip)).unwrap();
    let via1 = stun::query(&socket, stun1, TIMEOUT).unwrap();
    let via2 = stun::query(&socket, stun2, TIMEOUT).unwrap();
    let via1_again = stun::query(&socket, stun1, TIMEOUT).unwrap();
    assert_eq!(via1.ip(), router.wan_ip);
    assert_eq!(via2.ip(), router.wan_ip);
    assert_ne!(via1.port(), via2.port(), "endpoint-dependent mapping");
    assert_eq!(via1, via1_again, "a mapping is stable for its destination");
}

#[test]
fn port_restricted_filtering_drops_unsolicited_udp_but_passes_replies() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let server = lab.add_server("server").unwrap();
    let stranger = lab.add_server("stranger").unwrap();
    let stun_addr = lab.start_stun(&server, (server.ip, STUN_PORT)).unwrap();
    let stranger_socket = lab.udp_bind(&stranger, any_port(stranger.ip)).unwrap();

    // Same NAT, two filterings: the stranger gets through only the open (full-cone) one.
    for (name, spec, stranger_gets_in) in [
        ("restricted", RouterSpec::easy(), false),
        ("fullcone", RouterSpec::full_cone(), true),
    ] {
        let router = lab.add_router(name, spec).unwrap();
        let host = lab.add_lan_host(&format!("{name}-host"), &router).unwrap();
        let socket = lab.udp_bind(&host, any_port(host.ip)).unwrap();
        // The reply to the host's own request passes (that is how STUN answers arrive).
        let mapped = stun::query(&socket, stun_addr, TIMEOUT)
            .unwrap_or_else(|e| panic!("{name}: reply did not pass: {e}"));
        let got = deliver(
            &stranger_socket,
            &socket,
            mapped,
            Duration::from_millis(500),
        );
        if stranger_gets_in {
            let (_, from) = got.unwrap_or_else(|| panic!("{name}: stranger was dropped"));
            assert_eq!(from, stranger_socket.local_addr().unwrap());
        } else {
            assert!(got.is_none(), "{name}: unsolicited packet passed: {got:?}");
        }
    }
}

#[test]
fn routed_lan_is_reachable_from_the_internet_unless_firewalled() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let server = lab.add_server("server").unwrap();
    let server_socket = lab.udp_bind(&server, any_port(server.ip)).unwrap();
    for (name, spec, inbound_passes) in [
        ("routed", RouterSpec::no_nat(), true),
        ("firewalled", RouterSpec::firewall(), false),
    ] {
        let router = lab.add_router(name, spec).unwrap();
        let host = lab.add_lan_host(&format!("{name}-host"), &router).unwrap();
        let socket = lab.udp_bind(&host, any_port(host.ip)).unwrap();
        let host_addr = socket.local_addr().unwrap();
        // Outbound is not translated: the server sees the LAN address itself.
        let (_, seen) = deliver(
            &socket,
            &server_socket,
            server_socket.local_addr().unwrap(),
            TIMEOUT,
        )
        .unwrap_or_else(|| panic!("{name}: outbound UDP lost"));
        assert_eq!(seen, host_addr, "{name}: no NAT");
        // A reply passes either way.
        assert!(
            deliver(&server_socket, &socket, host_addr, TIMEOUT).is_some(),
            "{name}: reply"
        );
        // A new flow from the internet passes only without the firewall.
        let other = lab.udp_bind(&server, any_port(server.ip)).unwrap();
        let got = deliver(&other, &socket, host_addr, Duration::from_millis(300));
        assert_eq!(got.is_some(), inbound_passes, "{name}: unsolicited inbound");
    }
}

#[test]
fn low_level_links_connect_bare_nodes() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let a = lab.add_node("a").unwrap();
    let b = lab.add_node("b").unwrap();
    let c = lab.add_node("c").unwrap();
    lab.link(&a, &b, "10.99.0.1/24", "10.99.0.2/24").unwrap();
    let b_ip = Ipv4Addr::new(10, 98, 0, 2);
    let c_ip = Ipv4Addr::new(10, 98, 0, 3);
    let link = lab
        .link_emulated(&b, b_ip, &c, c_ip, LinkParams::delay_ms(5))
        .unwrap();
    // a reaches c through b.
    lab.add_route(&a, "10.98.0.0/24", Ipv4Addr::new(10, 99, 0, 2))
        .unwrap();
    lab.add_route(&c, "10.99.0.0/24", b_ip).unwrap();
    lab.enable_forwarding(&b).unwrap();

    let echo = lab.start_udp_echo(&c, (c_ip, 7)).unwrap();
    let socket = lab.udp_bind(&a, (Ipv4Addr::new(10, 99, 0, 1), 0)).unwrap();
    // Five echoes; the link counts each way (the delay itself is checked, with retries,
    // by the emulator's own tests).
    let rtt = median_rtt(&socket, echo, 5);
    assert!(
        rtt >= Duration::from_millis(10),
        "RTT {rtt:?} through a 5 ms link"
    );
    // The emulator counts a packet just after writing it, so the last echo can be here
    // a moment before its count is: wait for the counts (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let stats = loop {
        let stats = link.stats().unwrap();
        let done = stats.a_to_b.forwarded >= 5 && stats.b_to_a.forwarded >= 5;
        if done || std::time::Instant::now() >= deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(stats.a_to_b.forwarded, 5);
    assert_eq!(stats.b_to_a.forwarded, 5);
}

#[test]
fn udp_blocked_router_passes_tcp_but_not_udp() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let server = lab.add_server("server").unwrap();
    let echo = lab.start_udp_echo(&server, (server.ip, 7)).unwrap();
    let listener = lab.tcp_listen(&server, (server.ip, 443)).unwrap();
    let router = lab.add_router("office", RouterSpec::udp_blocked()).unwrap();
    let host = lab.add_lan_host("bob", &router).unwrap();

    let accept = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, from) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
        from
    });
    let mut tcp = lab
        .tcp_connect(&host, (server.ip, 443), TIMEOUT)
        .expect("TCP passes");
    {
        use std::io::{Read, Write};
        tcp.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        tcp.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    }
    let seen_from = accept.join().unwrap();
    assert_eq!(seen_from.ip(), router.wan_ip, "TCP is NATed");

    let socket = lab.udp_bind(&host, any_port(host.ip)).unwrap();
    let got = deliver(&socket, &socket, echo, Duration::from_millis(500));
    assert!(got.is_none(), "UDP passed a UDP-blocked router: {got:?}");
}

#[test]
fn double_nat_reaches_the_internet_through_both_routers() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let server = lab.add_server("stun").unwrap();
    let stun_addr = lab.start_stun(&server, (server.ip, STUN_PORT)).unwrap();
    let carrier = lab.add_router("carrier", RouterSpec::easy()).unwrap();
    let home = lab
        .add_router_behind("home", &carrier, RouterSpec::easy())
        .unwrap();
    let host = lab.add_lan_host("carol", &home).unwrap();
    assert!(
        home.wan_ip.is_private(),
        "home router's WAN is on the carrier LAN"
    );
    assert_ne!(home.lan_net, carrier.lan_net);

    let socket = lab.udp_bind(&host, any_port(host.ip)).unwrap();
    let mapped = stun::query(&socket, stun_addr, TIMEOUT).unwrap();
    assert_eq!(
        mapped.ip(),
        carrier.wan_ip,
        "the outer NAT is what the internet sees"
    );
    // The host can also reach the carrier's own LAN address (the inner NAT's upstream).
    lab.exec_ok(&host, "ping", ["-c1", "-W2", &carrier.lan_ip.to_string()])
        .unwrap();
}

#[test]
fn emulated_link_adds_the_configured_one_way_delay() {
    let _turn = timing();
    let lab = lab_or_skip!();
    let server = lab
        .add_server_with_link("far", LinkParams::delay_ms(20))
        .unwrap();
    let near = lab.add_server("near").unwrap();
    let client = lab.add_public_host("client").unwrap();
    let far_echo = lab.start_udp_echo(&server, (server.ip, 7)).unwrap();
    let near_echo = lab.start_udp_echo(&near, (near.ip, 7)).unwrap();
    let socket = lab.udp_bind(&client, any_port(client.ip)).unwrap();

    let baseline = median_rtt(&socket, near_echo, 20);
    assert!(baseline < Duration::from_millis(2), "veth RTT {baseline:?}");
    assert_rtt(
        &socket,
        far_echo,
        Duration::from_millis(40),
        Duration::from_millis(3),
    );
}

#[test]
fn changing_link_delay_at_runtime_takes_effect() {
    let _turn = timing();
    let lab = lab_or_skip!();
    let server = lab
        .add_server_with_link("region", LinkParams::delay_ms(20))
        .unwrap();
    let client = lab.add_public_host("client").unwrap();
    let echo = lab.start_udp_echo(&server, (server.ip, 7)).unwrap();
    let socket = lab.udp_bind(&client, any_port(client.ip)).unwrap();
    let link = server.uplink.as_ref().expect("emulated uplink");

    assert_rtt(
        &socket,
        echo,
        Duration::from_millis(40),
        Duration::from_millis(3),
    );
    link.set(LinkParams::delay_ms(25)).unwrap();
    assert_rtt(
        &socket,
        echo,
        Duration::from_millis(50),
        Duration::from_millis(3),
    );

    // One direction only.
    link.set_one_way(tests::Way::AtoB, LinkParams::delay_ms(5))
        .unwrap();
    assert_rtt(
        &socket,
        echo,
        Duration::from_millis(30),
        Duration::from_millis(3),
    );
}

#[test]
fn emulated_link_drops_about_the_configured_share() {
    let _turn = timing();
    let lab = lab_or_skip!();
    let server = lab
        .add_server_with_link("lossy", LinkParams::delay_ms(1).with_loss(0.2))
        .unwrap();
    let client = lab.add_public_host("client").unwrap();
    let sink = lab.udp_bind(&server, (server.ip, 9)).unwrap();
    let socket = lab.udp_bind(&client, any_port(client.ip)).unwrap();
    let sent = 2000u32;

    let receiver = std::thread::spawn(move || {
        sink.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        let mut got = 0u32;
        while tests::recv_from(&sink, &mut buf).is_ok() {
            got += 1;
        }
        got
    });
    for i in 0..sent {
        socket.send_to(&i.to_be_bytes(), (server.ip, 9)).unwrap();
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let got = receiver.join().unwrap();
    let loss = 1.0 - f64::from(got) / f64::from(sent);
    let stats = server.uplink.as_ref().unwrap().stats().unwrap();
    eprintln!(
        "configured 20 % loss: measured {:.1} %; {stats:?}",
        loss * 100.0
    );
    assert!((loss - 0.2).abs() < 0.04, "measured loss {loss}");
    // The internet is side A of the uplink: client → server is A to B.
    assert_eq!(
        stats.a_to_b.lost + stats.a_to_b.forwarded,
        stats.a_to_b.received
    );
    assert_eq!(stats.a_to_b.received, u64::from(sent));
    assert_eq!(stats.a_to_b.forwarded, u64::from(got));
}

#[test]
fn emulated_link_sustains_tens_of_thousands_of_packets_per_second() {
    let _turn = timing();
    let lab = lab_or_skip!();
    let server = lab
        .add_server_with_link("busy", LinkParams::delay_ms(5))
        .unwrap();
    let client = lab.add_public_host("client").unwrap();
    // Counted where they arrive (before any socket buffer can drop them); the sink is bound
    // so that no port-unreachable errors flow back.
    let arrived = lab.count_udp(&server, client.ip, server.ip).unwrap();
    let _sink = lab.udp_bind(&server, (server.ip, 9)).unwrap();
    let socket = lab.udp_bind(&client, any_port(client.ip)).unwrap();
    let sent = 100_000u32;
    let rate = 50_000.0; // packets per second offered

    let payload = [0u8; 100];
    let start = Instant::now();
    for i in 0..sent {
        // Paced in bursts of 50 packets (1 ms at the offered rate).
        if i % 50 == 0 {
            let due = start + Duration::from_secs_f64(f64::from(i) / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        socket.send_to(&payload, (server.ip, 9)).unwrap();
    }
    let sending = start.elapsed();
    // Wait for the queue to drain (5 ms delay) and the count to settle.
    let mut got = arrived.packets().unwrap();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = arrived.packets().unwrap();
        if now == got {
            break;
        }
        got = now;
    }
    let pps = got as f64 / sending.as_secs_f64();
    let stats = server.uplink.as_ref().unwrap().stats().unwrap();
    eprintln!(
        "offered {rate} pps for {sending:?}: {got}/{sent} arrived, {pps:.0} pps; {:?}",
        stats.a_to_b
    );
    // The link keeps up with everything offered: nothing lost, nothing overflowed.
    assert!(got as f64 >= f64::from(sent) * 0.99, "arrived {got}/{sent}");
    assert_eq!(stats.a_to_b.overflow, 0);
    // The rate is the sender's (50 kpps when the CPU is free); the link kept up with it.
    if pps < 30_000.0 {
        eprintln!("note: the sender managed only {pps:.0} packets/s (busy CPU)");
    }
}

#[test]
fn miniupnpd_answers_natpmp_and_its_mapping_forwards_udp() {
    let _turn = shared();
    let lab = lab_or_skip!(requires: ["miniupnpd"]);
    let router = lab.add_router("igd", RouterSpec::upnp()).unwrap();
    let host = lab.add_lan_host("dave", &router).unwrap();
    let outsider = lab.add_server("outsider").unwrap();

    let socket = lab.udp_bind(&host, (host.ip, 40_000)).unwrap();
    let external = natpmp_external_address(&socket, router.lan_ip, TIMEOUT).unwrap();
    assert_eq!(external, router.wan_ip);
    let mapping = natpmp_map(
        &socket,
        router.lan_ip,
        MapProtocol::Udp,
        40_000,
        40_000,
        600,
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(mapping.internal_port, 40_000);
    assert!(mapping.lifetime > 0);

    // Unsolicited: the outsider never heard from the host, yet the mapping lets it in.
    let outsider_socket = lab.udp_bind(&outsider, any_port(outsider.ip)).unwrap();
    let dest = SocketAddr::from(SocketAddrV4::new(router.wan_ip, mapping.external_port));
    let (payload, from) = deliver(&outsider_socket, &socket, dest, TIMEOUT)
        .expect("the NAT-PMP mapping forwards to the LAN host");
    assert_eq!(payload, b"lab-probe");
    assert_eq!(from, outsider_socket.local_addr().unwrap());

    // Without a mapping the same router drops it.
    let unmapped = lab.udp_bind(&host, (host.ip, 40_001)).unwrap();
    let dest = SocketAddr::from(SocketAddrV4::new(router.wan_ip, 40_001));
    assert!(deliver(
        &outsider_socket,
        &unmapped,
        dest,
        Duration::from_millis(300)
    )
    .is_none());
}

#[test]
fn miniupnpd_answers_upnp_igd_requests_from_upnpc() {
    let _turn = shared();
    let lab = lab_or_skip!(requires: ["miniupnpd", "upnpc"]);
    let router = lab.add_router("igd", RouterSpec::upnp()).unwrap();
    let host = lab.add_lan_host("erin", &router).unwrap();
    let outsider = lab.add_server("outsider").unwrap();

    let socket = lab.udp_bind(&host, (host.ip, 41_000)).unwrap();
    let out = lab
        .exec_ok(
            &host,
            "upnpc",
            ["-i", "-a", &host.ip.to_string(), "41000", "41000", "UDP"],
        )
        .unwrap();
    assert!(
        out.contains("is redirected to internal"),
        "upnpc said: {out}"
    );
    let outsider_socket = lab.udp_bind(&outsider, any_port(outsider.ip)).unwrap();
    let dest = SocketAddr::from(SocketAddrV4::new(router.wan_ip, 41_000));
    assert!(deliver(&outsider_socket, &socket, dest, TIMEOUT).is_some());
}

#[test]
fn blackhole_drops_udp_between_two_addresses_until_removed() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let a = lab.add_public_host("a").unwrap();
    let b = lab.add_public_host("b").unwrap();
    let echo = lab.start_udp_echo(&b, (b.ip, 7)).unwrap();
    let listener = lab.tcp_listen(&b, (b.ip, 80)).unwrap();
    let socket = lab.udp_bind(&a, any_port(a.ip)).unwrap();
    let inet = lab.internet().clone();
    let counter = lab.count_udp(&inet, a.ip, b.ip).unwrap();

    let wait = Duration::from_millis(300);
    assert!(deliver(&socket, &socket, echo, wait).is_some());
    assert_eq!(counter.packets().unwrap(), 1);

    lab.block_udp(&inet, a.ip, b.ip).unwrap();
    assert!(
        deliver(&socket, &socket, echo, wait).is_none(),
        "UDP blackholed"
    );
    assert_eq!(
        counter.packets().unwrap(),
        1,
        "dropped packets are not counted"
    );
    lab.tcp_connect(&a, (b.ip, 80), TIMEOUT)
        .expect("TCP still passes");
    drop(listener);

    lab.unblock_udp(&inet, a.ip, b.ip).unwrap();
    assert!(deliver(&socket, &socket, echo, wait).is_some());
    assert_eq!(counter.take().unwrap(), 2);
    assert_eq!(counter.packets().unwrap(), 0);
}

#[test]
fn labs_in_parallel_threads_do_not_collide() {
    let _turn = shared();
    let probe = lab_or_skip!();
    drop(probe);
    let handles: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(|| {
                let lab = Lab::new().unwrap();
                let router = lab.add_router("home", RouterSpec::easy()).unwrap();
                let host = lab.add_lan_host("alice", &router).unwrap();
                let server = lab.add_server("server").unwrap();
                let stun_addr = lab.start_stun(&server, (server.ip, STUN_PORT)).unwrap();
                let socket = lab.udp_bind(&host, any_port(host.ip)).unwrap();
                let mapped = stun::query(&socket, stun_addr, TIMEOUT).unwrap();
                assert_eq!(mapped.ip(), router.wan_ip);
                lab.prefix().to_string()
            })
        })
        .collect();
    let mut prefixes: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    prefixes.sort();
    prefixes.dedup();
    assert_eq!(prefixes.len(), 3);
}

/// What a lab made, noted before it is dropped.
#[derive(Default)]
struct Footprint {
    prefix: String,
    namespaces: Vec<String>,
    pids: Vec<u32>,
}

/// Builds a lab with a router, an emulated link and a spawned program, and notes it.
fn populate(lab: &Lab, note: &Mutex<Footprint>) -> tests::ChildGuard {
    let router = lab.add_router("home", RouterSpec::easy()).unwrap();
    lab.add_lan_host("alice", &router).unwrap();
    lab.add_server_with_link("relay", LinkParams::delay_ms(1))
        .unwrap();
    // Says something, so a failing test shows its log.
    let mut child = lab
        .spawn(
            &router,
            "sh",
            ["-c", "echo router program started; exec sleep 60"],
        )
        .unwrap();
    child
        .wait_for_output("started", Duration::from_secs(5))
        .unwrap();
    let mut note = note.lock().unwrap();
    note.prefix = lab.prefix().to_string();
    note.namespaces = lab.namespaces();
    note.pids = lab.own_pids();
    note.pids.push(child.pid());
    assert!(note.namespaces.len() >= 4);
    assert!(note.pids.len() >= 2);
    child
}

fn assert_gone(note: &Footprint) {
    let left: Vec<String> = tests::netns::list()
        .into_iter()
        .filter(|ns| ns.starts_with(&note.prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    for pid in &note.pids {
        assert!(!tests::netns::pid_alive(*pid), "process {pid} still runs");
    }
}

#[test]
fn dropping_the_lab_removes_its_namespaces_and_processes() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let note = Mutex::new(Footprint::default());
    let child = populate(&lab, &note);
    drop(child);
    drop(lab);
    assert_gone(&note.lock().unwrap());
}

#[test]
fn a_panicking_test_still_removes_its_lab() {
    let _turn = shared();
    let probe = lab_or_skip!();
    drop(probe);
    let note = Arc::new(Mutex::new(Footprint::default()));
    let inner = Arc::clone(&note);
    let result = std::panic::catch_unwind(move || {
        let lab = Lab::new().unwrap();
        let _child = populate(&lab, &inner);
        panic!("deliberate panic inside a lab test");
    });
    assert!(result.is_err());
    assert_gone(&note.lock().unwrap());
}

#[test]
fn namespaces_left_by_a_dead_process_are_removed_by_the_next_lab() {
    let _turn = shared();
    let probe = lab_or_skip!();
    drop(probe);
    // A pid that is certainly dead: a child we ran and reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let stale = format!("agl{dead_pid}-0-crashed");
    tests::netns::create(&stale).unwrap();
    assert!(tests::netns::list().contains(&stale));

    let lab = Lab::new().unwrap();
    assert!(
        !tests::netns::list().contains(&stale),
        "stale namespace {stale} survived Lab::new"
    );
    drop(lab);
}

#[test]
fn two_easy_nats_let_hole_punching_through_even_after_a_packet_was_refused() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let ra = lab.add_router("ra", RouterSpec::easy()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    let ha = lab.add_lan_host("alice", &ra).unwrap();
    let hb = lab.add_lan_host("bob", &rb).unwrap();
    let sa = lab.udp_bind(&ha, (ha.ip, 41_641)).unwrap();
    let sb = lab.udp_bind(&hb, (hb.ip, 41_641)).unwrap();
    let to_b = SocketAddr::from((rb.wan_ip, 41_641));
    let to_a = SocketAddr::from((ra.wan_ip, 41_641));
    // Alice's first packet dies at Bob's router (he never sent to her)…
    assert!(deliver(&sa, &sb, to_b, Duration::from_millis(300)).is_none());
    // …but it opened Alice's side: Bob's packet gets in, from the same public port.
    let (_, from) = deliver(&sb, &sa, to_a, TIMEOUT).expect("bob's packet reaches alice");
    assert_eq!(
        from, to_b,
        "bob's router kept his port (no collision with the refused packet)"
    );
    // And now both ways work.
    assert!(deliver(&sa, &sb, to_b, TIMEOUT).is_some());
}

#[test]
fn ipv6_lans_are_routed_untranslated_and_filtered_like_ipv4() {
    let _turn = shared();
    let lab = lab_or_skip!();
    let ra = lab
        .add_router("ra", RouterSpec::hard().with_ipv6(true))
        .unwrap();
    let rb = lab
        .add_router("rb", RouterSpec::hard().with_ipv6(true))
        .unwrap();
    let ha = lab.add_lan_host("alice", &ra).unwrap();
    let hb = lab.add_lan_host("bob", &rb).unwrap();
    let (a6, b6) = (
        ha.ip6.expect("alice has IPv6"),
        hb.ip6.expect("bob has IPv6"),
    );
    assert!(!a6.is_unique_local() && !a6.is_unicast_link_local());
    assert_ne!(ra.lan_net6, rb.lan_net6);
    let sa = lab.udp_bind(&ha, (a6, 41_641)).unwrap();
    let sb = lab.udp_bind(&hb, (b6, 41_641)).unwrap();
    let (to_a, to_b) = (
        SocketAddr::from((a6, 41_641)),
        SocketAddr::from((b6, 41_641)),
    );
    // Unsolicited: Bob's firewall drops it, but Alice's side is now open to Bob…
    assert!(deliver(&sa, &sb, to_b, Duration::from_millis(300)).is_none());
    // …so Bob's packet gets in, from his own address and port: nothing translates.
    let (_, from) = deliver(&sb, &sa, to_a, TIMEOUT).expect("bob's packet reaches alice");
    assert_eq!(from, to_b);
    assert!(deliver(&sa, &sb, to_b, TIMEOUT).is_some());
    // A stranger on another port is still filtered.
    let stranger = lab.udp_bind(&hb, (b6, 41_642)).unwrap();
    assert!(deliver(&stranger, &sa, to_a, Duration::from_millis(300)).is_none());
}
