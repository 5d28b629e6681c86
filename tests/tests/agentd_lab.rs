//! agentd end to end in the lab: the real controld, two relayd regions at different
//! emulated latencies (10 ms and 40 ms each way), and agentd devices behind NAT routers.
//! Shows that traffic between the devices' 100.x addresses flows at once (through a
//! relay), then directly once disco finds a path, for each kind of network the issue
//! names. Needs root; skips without it (fails under CI=true).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::print_stderr)] // measured figures go to the test's output

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tests::scenario::{self, ping_once, Control, Device, Region};
use tests::{lab_or_skip, Host, Lab, Router, RouterSpec};

/// The relay regions and control server every scenario shares.
struct World {
    near: Region,
    /// Kept running: the far region must be measured and not chosen.
    _far: Region,
    control: Control,
}

fn world(lab: &Lab) -> World {
    let near = scenario::start_region(lab, 901, 10).unwrap();
    let far = scenario::start_region(lab, 902, 40).unwrap();
    let map = scenario::write_relay_map(lab, &[&near, &far], &[]).unwrap();
    let control = scenario::start_control(lab, &map).unwrap();
    World {
        near,
        _far: far,
        control,
    }
}

/// Pings until the first answer; prints and returns how long that took.
fn first_ping(lab: &Lab, from: &Host, to: Ipv4Addr, within: Duration) -> Duration {
    let t = scenario::wait_for_ping(lab, from, to, within).unwrap();
    eprintln!("{}: first ping to {to} after {t:?}", from.node.name());
    t
}

/// `n` pings in a row, each answered.
fn all_pings_answer(lab: &Lab, from: &Host, to: Ipv4Addr, n: usize) {
    for i in 0..n {
        assert!(
            ping_once(lab, from, to, Duration::from_secs(1)).is_some(),
            "{}: ping {i} of {n} to {to} went unanswered",
            from.node.name()
        );
    }
}

/// Waits for agentd to log a direct path; returns how long that took from `since`, and
/// the log line (it names the address).
fn wait_direct(dev: &mut Device, since: Instant, within: Duration) -> (Duration, String) {
    let log = dev
        .agentd
        .wait_for_output("path=direct", within)
        .unwrap_or_else(|e| panic!("{} found no direct path: {e}", dev.name));
    let line = log
        .lines()
        .find(|l| l.contains("path=direct"))
        .unwrap_or_default();
    (since.elapsed(), line.to_string())
}

fn devices(lab: &Lab, control: &Control, a: &Router, b: &Router) -> (Host, Host, Device, Device) {
    let ha = lab.add_lan_host("alice", a).unwrap();
    let hb = lab.add_lan_host("bob", b).unwrap();
    let da = scenario::start_agentd(lab, &ha, "alice", control).unwrap();
    let db = scenario::start_agentd(lab, &hb, "bob", control).unwrap();
    (ha, hb, da, db)
}

/// Counts relayed traffic: TCP packets from `router`'s public address to `region`'s relay.
fn relayed_from(lab: &Lab, router: &Router, region: &Region) -> tests::PacketCounter {
    lab.count_packets(
        lab.internet(),
        &format!(
            "ip saddr {} ip daddr {} tcp dport 443",
            router.wan_ip, region.host.ip
        ),
    )
    .unwrap()
}

#[test]
fn two_easy_nats_ping_at_once_then_go_direct() {
    let lab = lab_or_skip!();
    let w = world(&lab);
    let ra = lab.add_router("ra", RouterSpec::easy()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    // UDP between the two routers' public addresses is direct traffic; TCP from alice's
    // router to the near relay is relayed traffic.
    let direct = lab.count_udp(lab.internet(), ra.wan_ip, rb.wan_ip).unwrap();
    let relayed = relayed_from(&lab, &ra, &w.near);
    let (ha, _hb, mut a, mut b) = devices(&lab, &w.control, &ra, &rb);
    let up = Instant::now();

    // The first ping gets through in the first second.
    let first = first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    assert!(first < Duration::from_secs(1), "first ping took {first:?}");

    // The path becomes direct within a second.
    let (t, _) = wait_direct(&mut a, up, Duration::from_secs(5));
    eprintln!("alice: direct after {t:?}");
    assert!(
        t < Duration::from_secs(1) + first,
        "direct only after {t:?}"
    );
    wait_direct(&mut b, up, Duration::from_secs(5));

    // Data now goes directly, not through the relay.
    let d0 = direct.packets().unwrap();
    let r0 = relayed.packets().unwrap();
    all_pings_answer(&lab, &ha, b.ip, 5);
    let (dd, dr) = (
        direct.packets().unwrap() - d0,
        relayed.packets().unwrap() - r0,
    );
    eprintln!("5 pings: {dd} direct UDP packets, {dr} relay TCP packets from alice's router");
    assert!(dd >= 5, "pings did not go directly ({dd} direct packets)");
    assert!(dr <= 2, "pings still went through the relay ({dr} packets)");

    // The IPv6 tunnel addresses work too.
    let v6 = b.status(&lab).unwrap()["self"]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .find(|a| a.contains(':'))
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let out = lab
        .exec(&ha, "ping", ["-6", "-c", "2", "-W", "2", "-n", &v6])
        .unwrap();
    assert!(
        out.status.success(),
        "ping6 {v6}: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Both picked the nearer region as home.
    for d in [&mut a, &mut b] {
        d.agentd
            .wait_for_output("home relay region region=901", Duration::from_secs(5))
            .unwrap();
        assert!(!d.agentd.stderr().contains("home relay region region=902"));
    }
}

/// The sequence numbers `ping` printed replies for, sorted, each once.
fn answered(ping_output: &str) -> Vec<u32> {
    let mut seqs: Vec<u32> = ping_output
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .filter_map(|s| s.parse().ok())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    seqs
}

/// Pings `count` times, `interval` apart; returns (sent, answered, longest run of
/// unanswered pings).
fn ping_series(
    lab: &Lab,
    from: &Host,
    to: Ipv4Addr,
    count: u32,
    interval: &str,
) -> (u32, u32, u32) {
    let out = lab
        .exec(
            from,
            "ping",
            [
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                interval,
                "-W",
                "1",
                &to.to_string(),
            ],
        )
        .unwrap();
    let seqs = answered(&String::from_utf8_lossy(&out.stdout));
    let mut gap = 0;
    let mut prev = 0;
    for s in seqs.iter().copied().chain(std::iter::once(count + 1)) {
        gap = gap.max(s.saturating_sub(prev + 1));
        prev = s;
    }
    (count, seqs.len() as u32, gap)
}

/// Relayed the whole time, no packet lost, no direct path: for NATs that direct paths
/// cannot cross without port mapping.
fn relay_only(spec_a: RouterSpec, spec_b: RouterSpec) {
    let lab = lab_or_skip!();
    let w = world(&lab);
    let ra = lab.add_router("ra", spec_a).unwrap();
    let rb = lab.add_router("rb", spec_b).unwrap();
    let (ha, _hb, a, b) = devices(&lab, &w.control, &ra, &rb);
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    let (sent, got, gap) = ping_series(&lab, &ha, b.ip, 20, "0.2");
    eprintln!("{got}/{sent} answered, longest gap {gap}");
    assert_eq!(got, sent, "pings were lost on the relay path");
    assert!(
        !a.agentd.stderr().contains("path=direct"),
        "unexpected direct path"
    );
}

#[test]
fn easy_and_hard_nat_flow_through_the_relay() {
    relay_only(RouterSpec::easy(), RouterSpec::hard());
}

#[test]
fn two_hard_nats_flow_through_the_relay() {
    relay_only(RouterSpec::hard(), RouterSpec::hard());
}

#[test]
fn hard_nat_and_port_mapping_router_go_direct_via_the_mapped_port() {
    let lab = lab_or_skip!(requires: ["miniupnpd"]);
    let w = world(&lab);
    let ra = lab.add_router("ra", RouterSpec::hard()).unwrap();
    // Bob's router is a hard NAT too, but it maps a port on request.
    let rb = lab
        .add_router("rb", RouterSpec::hard().with_upnp(true))
        .unwrap();
    let (ha, _hb, mut a, mut b) = devices(&lab, &w.control, &ra, &rb);
    let out = b
        .agentd
        .wait_for_output("router mapped a port for us", Duration::from_secs(10))
        .unwrap();
    let mapped = out
        .lines()
        .find(|l| l.contains("router mapped a port for us"))
        .and_then(|l| l.split("external=").nth(1))
        .map(|s| s.trim().to_string())
        .unwrap();
    eprintln!("bob's router mapped {mapped}");
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    let up = Instant::now();
    let (_, line) = wait_direct(&mut a, up, Duration::from_secs(10));
    assert!(
        line.contains(&mapped),
        "alice's direct path is not the mapped port: {line}"
    );
    all_pings_answer(&lab, &ha, b.ip, 3);
}

#[test]
fn double_nat_both_easy_goes_direct() {
    let lab = lab_or_skip!();
    let w = world(&lab);
    let ca = lab.add_router("ca", RouterSpec::easy()).unwrap();
    let cb = lab.add_router("cb", RouterSpec::easy()).unwrap();
    let ra = lab
        .add_router_behind("ra", &ca, RouterSpec::easy())
        .unwrap();
    let rb = lab
        .add_router_behind("rb", &cb, RouterSpec::easy())
        .unwrap();
    let direct = lab.count_udp(lab.internet(), ca.wan_ip, cb.wan_ip).unwrap();
    let (ha, _hb, mut a, b) = devices(&lab, &w.control, &ra, &rb);
    let up = Instant::now();
    let ip = b.ip;
    first_ping(&lab, &ha, ip, Duration::from_secs(10));
    let (t, _) = wait_direct(&mut a, up, Duration::from_secs(5));
    eprintln!("double NAT: direct after {t:?}");
    let d0 = direct.packets().unwrap();
    all_pings_answer(&lab, &ha, ip, 5);
    assert!(
        direct.packets().unwrap() - d0 >= 5,
        "pings did not go directly"
    );
}

#[test]
fn udp_blocked_on_one_side_works_through_the_relay_over_tcp() {
    let lab = lab_or_skip!();
    let w = world(&lab);
    let ra = lab.add_router("ra", RouterSpec::udp_blocked()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    let (ha, _hb, a, b) = devices(&lab, &w.control, &ra, &rb);
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    let (sent, got, _) = ping_series(&lab, &ha, b.ip, 10, "0.2");
    assert_eq!(got, sent, "pings were lost");
    assert!(!a.agentd.stderr().contains("path=direct"));
    // Its home region came from HTTPS latency checks, and is still the nearer one.
    assert!(a.agentd.stderr().contains("home relay region region=901"));
}

#[test]
fn both_behind_one_nat_go_direct_over_the_lan() {
    let lab = lab_or_skip!();
    let w = world(&lab);
    let r = lab.add_router("r", RouterSpec::easy()).unwrap();
    let (ha, hb, mut a, b) = devices(&lab, &w.control, &r, &r);
    let up = Instant::now();
    let ip = b.ip;
    first_ping(&lab, &ha, ip, Duration::from_secs(10));
    let (_, line) = wait_direct(&mut a, up, Duration::from_secs(5));
    assert!(
        line.contains(&format!("path=direct {}:", hb.ip)),
        "not the LAN address {}: {line}",
        hb.ip
    );
}

/// Alice and Bob each behind a hard NAT for IPv4 (relay only) whose network also routes
/// IPv6 behind a stateful firewall.
fn behind_hard_nats_with_ipv6(lab: &Lab, control: &Control) -> (Host, Host, Device, Device) {
    let spec = RouterSpec::hard().with_ipv6(true);
    let ra = lab.add_router("ra", spec.clone()).unwrap();
    let rb = lab.add_router("rb", spec).unwrap();
    devices(lab, control, &ra, &rb)
}

#[test]
fn two_hard_nats_with_ipv6_go_direct_over_ipv6() {
    let lab = lab_or_skip!();
    let w = world(&lab);
    // IPv4 behind symmetric NATs (relay only, as above), but both networks also route
    // IPv6 behind stateful firewalls, as many mobile and home networks do.
    let (ha, hb, mut a, b) = behind_hard_nats_with_ipv6(&lab, &w.control);
    let bob6 = hb.ip6.unwrap();
    let up = Instant::now();
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    let (t, line) = wait_direct(&mut a, up, Duration::from_secs(5));
    eprintln!("hard NATs with IPv6: direct after {t:?}: {line}");
    assert!(
        line.contains(&format!("path=direct [{bob6}]:")),
        "not bob's IPv6 address {bob6}: {line}"
    );
    let direct = lab
        .count_packets(
            lab.internet(),
            &format!("ip6 daddr {bob6} meta l4proto udp"),
        )
        .unwrap();
    all_pings_answer(&lab, &ha, b.ip, 5);
    assert!(direct.packets().unwrap() >= 5, "pings did not go over IPv6");
    let status = a.peer(&lab, "bob").unwrap().unwrap();
    assert_eq!(status["path"], "direct", "{status:#}");
    assert!(
        status["direct"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("[{bob6}]:")),
        "{status:#}"
    );
}

#[test]
fn ipv6_direct_path_blackholed_falls_back_to_the_relay_and_returns() {
    let lab = lab_or_skip!();
    let w = world(&lab);
    let (ha, hb, a, b) = behind_hard_nats_with_ipv6(&lab, &w.control);
    let (a6, b6) = (ha.ip6.unwrap(), hb.ip6.unwrap());
    let direct6 = |p: &serde_json::Value| {
        p["path"] == "direct"
            && p["direct"]
                .as_str()
                .is_some_and(|d| d.starts_with(&format!("[{b6}]:")))
    };
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    a.wait_peer(&lab, "bob", Duration::from_secs(5), direct6)
        .unwrap();

    // The IPv6 path dies (IPv4 was never direct: hard NATs): the relay takes over.
    lab.block_udp(lab.internet(), a6, b6).unwrap();
    let t0 = Instant::now();
    a.wait_peer(&lab, "bob", Duration::from_secs(15), |p| {
        p["path"] == "relay"
    })
    .unwrap();
    eprintln!("IPv6 path blackholed: relay after {:?}", t0.elapsed());
    all_pings_answer(&lab, &ha, b.ip, 3);

    // It comes back: direct over IPv6 again.
    lab.unblock_udp(lab.internet(), a6, b6).unwrap();
    let t0 = Instant::now();
    a.wait_peer(&lab, "bob", Duration::from_secs(15), direct6)
        .unwrap();
    eprintln!("IPv6 path back: direct after {:?}", t0.elapsed());
    all_pings_answer(&lab, &ha, b.ip, 3);
}

#[test]
fn relay_is_reached_over_ipv6_when_its_ipv4_is_blocked() {
    let lab = lab_or_skip!();
    let region = scenario::start_region_v6(&lab, 901).unwrap();
    let map = scenario::write_relay_map(&lab, &[&region], &[]).unwrap();
    let control = scenario::start_control(&lab, &map).unwrap();
    // Alice's network routes IPv6 but cannot reach the relay over IPv4 at all; Bob is
    // behind a hard NAT, so the two have no direct path and everything is relayed.
    let ra = lab
        .add_router("ra", RouterSpec::easy().with_ipv6(true))
        .unwrap();
    let rb = lab.add_router("rb", RouterSpec::hard()).unwrap();
    lab.block_all(lab.internet(), ra.wan_ip, region.host.ip)
        .unwrap();
    let relay6 = region.host.ip6.unwrap();
    let over_v6 = lab
        .count_packets(lab.internet(), &format!("ip6 daddr {relay6} tcp dport 443"))
        .unwrap();
    let (ha, _hb, a, b) = devices(&lab, &control, &ra, &rb);
    first_ping(&lab, &ha, b.ip, Duration::from_secs(15));
    all_pings_answer(&lab, &ha, b.ip, 5);
    assert!(
        over_v6.packets().unwrap() >= 5,
        "alice's relay traffic did not go over IPv6"
    );
    assert!(!a.agentd.stderr().contains("path=direct"));
}

/// Waits until `child` exits (up to `within`); returns whether it exited successfully.
fn wait_exit(child: &mut tests::ChildGuard, within: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if let Some(st) = child.try_wait().unwrap() {
            return st.success();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} still running after {within:?}", child.label());
}

#[test]
fn tcp_stream_survives_a_blackholed_direct_path_and_returns_to_direct() {
    let lab = lab_or_skip!(requires: ["iperf3"]);
    let w = world(&lab);
    let ra = lab.add_router("ra", RouterSpec::easy()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    // Relayed traffic: TCP from alice's router to the relay region both are homed in.
    let relayed = relayed_from(&lab, &ra, &w.near);
    let (ha, hb, mut a, b) = devices(&lab, &w.control, &ra, &rb);
    let up = Instant::now();
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    wait_direct(&mut a, up, Duration::from_secs(5));

    let mut server = lab
        .spawn(
            &hb,
            "iperf3",
            ["-s", "-1", "--forceflush", "-B", &b.ip.to_string()],
        )
        .unwrap();
    server
        .wait_for_output("Server listening", Duration::from_secs(10))
        .unwrap();
    let mut client = lab
        .spawn(
            &ha,
            "iperf3",
            [
                "-c",
                &b.ip.to_string(),
                "-t",
                "24",
                "-i",
                "1",
                "-J",
                "-b",
                "50M",
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));

    // Beside the stream (which backs off while its packets are lost), a steady 50 pings a
    // second: when agentd starts sending through the relay, they show at once.
    let mut pings = lab
        .spawn(
            &ha,
            "ping",
            ["-n", "-q", "-i", "0.02", "-c", "600", &b.ip.to_string()],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // Blackhole the direct path (UDP between the two routers) mid-transfer, and watch for
    // packets on the relay (without traffic its connection carries a keepalive or a disco
    // message now and then).
    let before = relayed.packets().unwrap();
    let blocked = Instant::now();
    lab.block_udp(lab.internet(), ra.wan_ip, rb.wan_ip).unwrap();
    let to_relay = loop {
        if relayed.packets().unwrap() - before >= 10 {
            break blocked.elapsed();
        }
        assert!(
            blocked.elapsed() < Duration::from_secs(15),
            "the stream never moved to the relay"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("direct path blackholed: packets on the relay after {to_relay:?}");
    // Within the trust window (the last pong came at the latest when the rule went in),
    // and in fact much sooner: the path went quiet while packets went out, so agentd
    // pinged it at once and stopped trusting it when the ping went unanswered.
    let quiet = disco::defaults::SILENCE_PROBE_AFTER + disco::defaults::SILENCE_PROBE_WAIT;
    assert!(
        to_relay < quiet + Duration::from_millis(750),
        "moved to the relay only after {to_relay:?}"
    );
    let counters = a.status(&lab).unwrap()["counters"].clone();
    assert!(
        counters["disco_silence_distrusted"].as_u64() >= Some(1),
        "{counters:#}"
    );
    a.agentd
        .wait_for_output("path=relay", Duration::from_secs(10))
        .unwrap();
    eprintln!("alice reports the relay path after {:?}", blocked.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    let _ = pings.kill();

    // Remove the rule: back to direct, and the stream leaves the relay.
    let unblocked = Instant::now();
    lab.unblock_udp(lab.internet(), ra.wan_ip, rb.wan_ip)
        .unwrap();
    let t0 = Instant::now();
    loop {
        if a.agentd.stderr().matches("path=direct").count() >= 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "did not return to direct"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("rule removed: direct again after {:?}", unblocked.elapsed());
    relayed.take().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let on_relay = relayed.take().unwrap();
    assert!(
        on_relay < 20,
        "{on_relay} packets still went through the relay in 2 s on the direct path"
    );

    assert!(
        wait_exit(&mut client, Duration::from_secs(40)),
        "iperf3 failed"
    );
    let report: serde_json::Value = serde_json::from_str(&client.stdout()).unwrap();
    let intervals = report["intervals"].as_array().unwrap();
    let bytes: Vec<u64> = intervals
        .iter()
        .map(|i| i["sum"]["bytes"].as_u64().unwrap_or(0))
        .collect();
    eprintln!("iperf3 bytes per second: {bytes:?}");
    assert!(bytes.len() >= 20, "the stream ended early: {bytes:?}");
    // The stream stalls until agentd sends through the relay too, plus TCP's back-off
    // (its retransmissions come about 3 s and 6 s into a loss), then carries on through
    // the relay and directly again: no stretch of near-silence longer than 8 s, and data
    // to the end.
    let mut sorted = bytes.clone();
    sorted.sort_unstable();
    let slow = sorted[sorted.len() / 2] / 10;
    let longest = bytes
        .split(|b| *b >= slow)
        .map(<[u64]>::len)
        .max()
        .unwrap_or(0);
    assert!(
        longest <= 8,
        "the stream stalled for {longest} s: {bytes:?}"
    );
    assert!(
        bytes.iter().rev().take(3).all(|b| *b >= slow),
        "the stream did not survive: {bytes:?}"
    );
}

#[test]
fn home_relay_node_killed_traffic_resumes_on_the_regions_other_node() {
    let lab = lab_or_skip!();
    let mut near = scenario::start_region(&lab, 901, 10).unwrap();
    let far = scenario::start_region(&lab, 902, 40).unwrap();
    // The near region's second node.
    let second = lab
        .add_server_with_link("relay901b", tests::LinkParams::delay_ms(10))
        .unwrap();
    let _second_relayd = scenario::start_relayd(&lab, &second, "relay901b").unwrap();
    let map = scenario::write_relay_map(&lab, &[&near, &far], &[(901, second.ip)]).unwrap();
    let control = scenario::start_control(&lab, &map).unwrap();
    // Hard NATs on both sides: all traffic goes through the relay.
    let ra = lab.add_router("ra", RouterSpec::hard()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::hard()).unwrap();
    let (ha, _hb, mut a, b) = devices(&lab, &control, &ra, &rb);
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    a.agentd
        .wait_for_output(
            &format!("relay connected region=901 addr={}:", near.host.ip),
            Duration::from_secs(5),
        )
        .unwrap();

    let mut pings = lab
        .spawn(
            &ha,
            "ping",
            ["-n", "-c", "60", "-i", "0.1", "-W", "1", &b.ip.to_string()],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    near.relayd.kill().unwrap();
    wait_exit(&mut pings, Duration::from_secs(30));
    let text = pings.stdout();
    let seqs = answered(&text);
    let gap = seqs.windows(2).map(|w| w[1] - w[0] - 1).max().unwrap_or(60);
    let outage = Duration::from_millis(100 * u64::from(gap));
    eprintln!(
        "home relay node killed: {} of 60 answered, outage {outage:?}",
        seqs.len()
    );
    assert!(seqs.last() == Some(&60), "traffic did not resume: {text}");
    assert!(
        outage <= Duration::from_secs(2),
        "traffic resumed only after {outage:?}"
    );
    // On the region's other node, not on the far region.
    a.agentd
        .wait_for_output(
            &format!("relay connected region=901 addr={}:", second.ip),
            Duration::from_secs(1),
        )
        .unwrap();
    assert!(
        !a.agentd.stderr().contains("relay connected region=902"),
        "alice connected to the far region"
    );
}

/// Replies of `ping -D` output: (receive time as Unix seconds, sequence number).
fn timed_replies(ping_output: &str) -> Vec<(f64, u32)> {
    ping_output
        .lines()
        .filter_map(|l| {
            let ts = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l.split("icmp_seq=").nth(1)?.split_whitespace().next()?;
            Some((ts, seq.parse().ok()?))
        })
        .collect()
}

#[test]
fn home_relay_node_blackholed_traffic_resumes_on_the_regions_other_node() {
    let lab = lab_or_skip!();
    // Region 901: two meshed nodes, each 10 ms from the internet; 902 is far.
    let ha = lab
        .add_server_with_link("relay901", tests::LinkParams::delay_ms(10))
        .unwrap();
    let hb = lab
        .add_server_with_link("relay901b", tests::LinkParams::delay_ms(10))
        .unwrap();
    let names = ["relay901".to_string(), "relay901b".to_string()];
    let (cert, key) = scenario::write_cert(&lab, "region901", &names).unwrap();
    let psk = lab.log_dir().join("mesh.key");
    std::fs::write(&psk, "cd".repeat(32)).unwrap();
    let mesh = |other: &str, ip: Ipv4Addr| scenario::mesh_flags(other, ip, &psk, &cert);
    let relay_a = scenario::start_relayd_with(
        &lab,
        &ha,
        "relay901",
        &cert,
        &key,
        &mesh("relay901b", hb.ip),
    )
    .unwrap();
    let mut relay_b = scenario::start_relayd_with(
        &lab,
        &hb,
        "relay901b",
        &cert,
        &key,
        &mesh("relay901", ha.ip),
    )
    .unwrap();
    let mut near = scenario::Region {
        id: 901,
        host: ha.clone(),
        relayd: relay_a,
    };
    for r in [&mut near.relayd, &mut relay_b] {
        r.wait_for_output("mesh link up", Duration::from_secs(15))
            .unwrap();
    }
    let far = scenario::start_region(&lab, 902, 40).unwrap();
    let map = scenario::write_relay_map(&lab, &[&near, &far], &[(901, hb.ip)]).unwrap();
    let control = scenario::start_control(&lab, &map).unwrap();
    // Hard NATs on both sides: all traffic goes through the relay.
    let ra = lab.add_router("ra", RouterSpec::hard()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::hard()).unwrap();
    let (h_alice, _h_bob, mut alice, mut bob) = devices(&lab, &control, &ra, &rb);
    first_ping(&lab, &h_alice, bob.ip, Duration::from_secs(10));
    for d in [&mut alice, &mut bob] {
        d.agentd
            .wait_for_output(
                &format!("relay connected region=901 addr={}:", ha.ip),
                Duration::from_secs(5),
            )
            .unwrap();
    }
    // Relayed traffic through the region's other node, as the internet sees it.
    let via_b = lab
        .count_packets(
            lab.internet(),
            &format!(
                "ip saddr {{ {}, {} }} ip daddr {} tcp dport 443",
                ra.wan_ip, rb.wan_ip, hb.ip
            ),
        )
        .unwrap();

    let mut pings = lab
        .spawn(
            &h_alice,
            "ping",
            [
                "-D",
                "-n",
                "-i",
                "0.05",
                "-w",
                "22",
                "-W",
                "1",
                &bob.ip.to_string(),
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // Node a's packets to and from both devices are dropped from now on (no RST, no
    // FIN); node b stays reachable, and the mesh between the two stays up.
    let via_b_before = via_b.packets().unwrap();
    let blackhole_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for wan in [ra.wan_ip, rb.wan_ip] {
        lab.block_all(lab.internet(), ha.ip, wan).unwrap();
    }
    assert!(
        wait_exit(&mut pings, Duration::from_secs(40)),
        "ping did not finish"
    );
    let text = pings.stdout();
    let replies = timed_replies(&text);
    assert!(
        replies.iter().any(|(t, _)| *t < blackhole_at),
        "no replies before the blackhole: {text}"
    );
    // The outage: the longest stretch without a reply; it must be the blackhole's.
    let (gap_start, gap_end) = replies
        .windows(2)
        .map(|w| (w[0].0, w[1].0))
        .max_by(|x, y| (x.1 - x.0).total_cmp(&(y.1 - y.0)))
        .unwrap();
    let resumed = gap_end - blackhole_at;
    let last = replies.last().map_or(0.0, |r| r.0);
    eprintln!(
        "relayed ping resumed {resumed:.1} s after the blackhole (no reply for {:.1} s; \
         {} replies, the last {:.1} s after the blackhole)",
        gap_end - gap_start,
        replies.len(),
        last - blackhole_at
    );
    assert!(
        (blackhole_at - 1.0..blackhole_at + 1.0).contains(&gap_start),
        "the longest gap ({gap_start:.1}..{gap_end:.1}) is not the blackhole's \
         ({blackhole_at:.1}): {text}"
    );
    assert!(
        resumed <= 12.0,
        "relayed ping resumed only {resumed:.1} s after the blackhole"
    );
    // It kept working to the end, through node b.
    assert!(last > blackhole_at + 15.0, "traffic stopped again: {text}");
    let via_b_after = via_b.packets().unwrap() - via_b_before;
    assert!(
        via_b_after > 100,
        "only {via_b_after} relayed packets went to node b"
    );
    // The devices say why they moved, and they stayed in the region.
    for d in [&alice, &bob] {
        let counters = d.status(&lab).unwrap()["counters"].clone();
        assert!(
            counters["relay_dead_silent"].as_u64() >= Some(1),
            "{}: {counters:#}",
            d.name
        );
        assert!(
            counters["relay_node_changes"].as_u64() >= Some(1),
            "{}: {counters:#}",
            d.name
        );
        assert!(
            !d.agentd.stderr().contains("relay connected region=902"),
            "{} connected to the far region",
            d.name
        );
    }
}

#[test]
fn tunnels_keep_working_while_control_is_down() {
    let lab = lab_or_skip!();
    let mut w = world(&lab);
    let ra = lab.add_router("ra", RouterSpec::easy()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::hard()).unwrap();
    let (ha, _hb, mut a, b) = devices(&lab, &w.control, &ra, &rb);
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    w.control.server.kill().unwrap();
    // Through the relay (bob is behind a hard NAT) on the last netmap.
    let (sent, got, _) = ping_series(&lab, &ha, b.ip, 20, "0.2");
    assert_eq!(got, sent, "pings were lost with control down");
    assert!(a.agentd.try_wait().unwrap().is_none(), "agentd exited");
    // A packet for an address no peer owns goes nowhere, counted (and nothing breaks).
    let no_route = |a: &scenario::Device| {
        a.status(&lab).unwrap()["counters"]["tun_no_route"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = no_route(&a);
    assert!(ping_once(
        &lab,
        &ha,
        Ipv4Addr::new(100, 64, 0, 99),
        Duration::from_secs(1)
    )
    .is_none());
    assert!(no_route(&a) > before, "the packet was not counted");
    all_pings_answer(&lab, &ha, b.ip, 2);
}

#[test]
fn garbage_and_a_removed_peer_leave_other_sessions_alone() {
    let lab = lab_or_skip!();
    let w = world(&lab);
    // Alice has a public address: anyone can send to her port.
    let ha = lab.add_public_host("alice").unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    let rc = lab.add_router("rc", RouterSpec::easy()).unwrap();
    let hb = lab.add_lan_host("bob", &rb).unwrap();
    let hc = lab.add_lan_host("carol", &rc).unwrap();
    let mut a = scenario::start_agentd(&lab, &ha, "alice", &w.control).unwrap();
    let b = scenario::start_agentd(&lab, &hb, "bob", &w.control).unwrap();
    let c = scenario::start_agentd(&lab, &hc, "carol", &w.control).unwrap();
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    first_ping(&lab, &ha, c.ip, Duration::from_secs(10));

    // A stranger sends things that look like WireGuard and disco to alice's port.
    let stranger = lab.add_public_host("stranger").unwrap();
    let sock = lab.udp_bind(&stranger, (stranger.ip, 0)).unwrap();
    let mut junk: Vec<Vec<u8>> = Vec::new();
    for ty in 1u8..=4 {
        let len = [0, 148, 92, 64, 80][usize::from(ty)];
        let mut p = vec![0x5a; len];
        p[..4].copy_from_slice(&[ty, 0, 0, 0]);
        junk.push(p);
    }
    let mut disco = b"TS\xf0\x9f\x92\xac".to_vec();
    disco.extend_from_slice(&[0x11; 80]);
    junk.push(disco);
    junk.push(vec![0xff; 3]);
    for _ in 0..200 {
        for j in &junk {
            let _ = sock.send_to(j, (ha.ip, 41641));
        }
    }
    let (sent, got, _) = ping_series(&lab, &ha, b.ip, 10, "0.1");
    assert_eq!(got, sent, "alice-bob suffered from the junk");
    // ...and every kind was counted by its reason.
    let counters = a.status(&lab).unwrap()["counters"].clone();
    for reason in [
        "wg_drop: bad mac1",    // forged initiations and responses
        "wg_unknown_peer",      // cookie replies and data for sessions we do not have
        "disco_unknown_sender", // disco from a key not in the netmap
        "udp_unknown",          // neither
    ] {
        let n = counters[reason].as_u64().unwrap_or(0);
        assert!(
            n >= 100,
            "{reason}: {n} (of 200 sent); counters: {counters:#}"
        );
    }

    // Carol is deleted while alice talks to her and to bob (20 pings a second to each).
    let spawn_pings = |to: Ipv4Addr| {
        lab.spawn(
            &ha,
            "ping",
            ["-n", "-i", "0.05", "-c", "80", "-W", "1", &to.to_string()],
        )
        .unwrap()
    };
    let mut to_bob = spawn_pings(b.ip);
    let mut to_carol = spawn_pings(c.ip);
    std::thread::sleep(Duration::from_secs(1));
    let id = w.control.node_id(&lab, "carol").unwrap();
    w.control.cli(&lab, &["nodes", "delete", &id]).unwrap();
    a.agentd
        .wait_for_output("peer removed", Duration::from_secs(5))
        .unwrap();
    assert!(
        wait_exit(&mut to_bob, Duration::from_secs(15)),
        "ping to bob failed"
    );
    wait_exit(&mut to_carol, Duration::from_secs(15));
    let bob_seqs = answered(&to_bob.stdout());
    assert_eq!(
        bob_seqs.len(),
        80,
        "alice-bob lost pings while carol was removed:\n{}",
        to_bob.stdout()
    );
    let carol_seqs = answered(&to_carol.stdout());
    assert!(
        !carol_seqs.is_empty() && carol_seqs.len() < 80,
        "carol answered {} of 80 pings: her removal did not cut her off",
        carol_seqs.len()
    );
    assert!(
        ping_once(&lab, &ha, c.ip, Duration::from_secs(1)).is_none(),
        "carol still reachable"
    );
    assert!(a.agentd.try_wait().unwrap().is_none(), "agentd exited");
}

#[test]
fn restarted_agentd_keeps_its_address_and_removes_what_it_set_up() {
    let lab = lab_or_skip!();
    let w = world(&lab);
    let ra = lab.add_router("ra", RouterSpec::easy()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    let (ha, hb, mut a, b) = devices(&lab, &w.control, &ra, &rb);
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));

    // SIGTERM: agentd exits cleanly and takes its TUN device and socket with it.
    let status = a.agentd.stop().unwrap();
    assert!(status.success(), "agentd exited with {status}");
    assert!(!lab
        .exec(&ha, "ip", ["link", "show", "agentd0"])
        .unwrap()
        .status
        .success());
    assert!(!a.socket.exists(), "the API socket was left behind");

    // Started again on the same state (and the same single-join settings): the same
    // device and address, and traffic flows both ways again.
    let a2 = scenario::start_agentd(&lab, &ha, "alice", &w.control).unwrap();
    assert_eq!(a2.ip, a.ip);
    first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    first_ping(&lab, &hb, a2.ip, Duration::from_secs(10));
    let list = w.control.cli(&lab, &["nodes", "list"]).unwrap();
    assert_eq!(list.matches("alice").count(), 1, "{list}");
}
