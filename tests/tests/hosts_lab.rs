//! agentd on hosts that differ from the lab's defaults, with the real binaries: IPv6
//! switched off, the TUN device deleted under a running agentd, a login server that
//! accepts and never answers, and the pre-auth key kept off every command line. Needs
//! root; skips without it (fails under CI=true).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::print_stderr)] // measured figures go to the test's output

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tests::scenario::{self, Control, Device};
use tests::{lab_or_skip, ChildGuard, Host, Lab, Router, RouterSpec};

/// One relay region and controld: all these scenarios need.
fn world(lab: &Lab) -> (scenario::Region, Control) {
    scenario::one_region_and_control(lab).unwrap()
}

/// alice and bob, each behind an easy NAT of their own: (ra, rb, alice, bob).
fn two_easy_nats(lab: &Lab) -> (Router, Router, Host, Host) {
    let ra = lab.add_router("ra", RouterSpec::easy()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    let ha = lab.add_lan_host("alice", &ra).unwrap();
    let hb = lab.add_lan_host("bob", &rb).unwrap();
    (ra, rb, ha, hb)
}

/// Switches IPv6 off in `host`'s namespace, for every interface there and every one
/// made later (the TUN device), as `sysctl net.ipv6.conf.all.disable_ipv6=1` does on a
/// server.
fn disable_ipv6(lab: &Lab, host: &Host) {
    for key in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        lab.exec_ok(host, "sysctl", ["-q", "-w", key]).unwrap();
    }
}

/// A steady ping at 20 per second, running in the background.
fn start_steady_ping(lab: &Lab, from: &Host, to: Ipv4Addr) -> ChildGuard {
    lab.spawn(
        from,
        "ping",
        ["-n", "-D", "-i", "0.05", "-W", "1", &to.to_string()],
    )
    .unwrap()
}

/// The replies of a `ping -D` output: (timestamp in seconds, icmp_seq).
fn replies(out: &str) -> Vec<(f64, u32)> {
    out.lines()
        .filter_map(|l| {
            let ts = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l.split("icmp_seq=").nth(1)?.split_whitespace().next()?;
            Some((ts, seq.parse().ok()?))
        })
        .collect()
}

/// Seconds since the Unix epoch (the clock `ping -D` prints).
fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// How long after `since` (epoch seconds) replies came again: the first reply after the
/// longest silence that starts at or after `since`. Waits up to `within` for it.
fn resumed_after(ping: &ChildGuard, since: f64, within: Duration) -> Option<Duration> {
    let deadline = Instant::now() + within;
    loop {
        let rs = replies(&ping.stdout());
        // The first reply that follows a gap of more than 3 intervals after `since`; if
        // no gap was seen at all, the first reply after `since`.
        let after: Vec<f64> = rs.iter().map(|r| r.0).filter(|t| *t >= since).collect();
        let mut prev = since;
        let mut found = None;
        for t in &after {
            if t - prev > 0.15 {
                found = Some(*t);
            }
            prev = *t;
        }
        // Only judged once replies flow again for a while after the gap.
        if let Some(t) = found.or(after.first().copied()) {
            if after.last().is_some_and(|last| last - t >= 1.0) {
                return Some(Duration::from_secs_f64((t - since).max(0.0)));
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every process's command line on this machine, joined.
fn all_command_lines() -> String {
    testkit::procfs::all_command_lines()
        .into_iter()
        .map(|(_, line)| line + "\n")
        .collect()
}

#[test]
fn ipv6_disabled_hosts_go_direct_and_say_ipv6_is_off() {
    let lab = lab_or_skip!();
    let (_region, control) = world(&lab);
    let (ra, rb, ha, hb) = two_easy_nats(&lab);
    disable_ipv6(&lab, &ha);
    disable_ipv6(&lab, &hb);
    let direct = lab.count_udp(lab.internet(), ra.wan_ip, rb.wan_ip).unwrap();
    let a = scenario::start_agentd(&lab, &ha, "alice", &control).unwrap();
    let b = scenario::start_agentd(&lab, &hb, "bob", &control).unwrap();

    // The key went in through a file: no process shows it.
    assert!(
        !all_command_lines().contains(&control.auth_key),
        "the pre-auth key is in a /proc/*/cmdline"
    );

    scenario::wait_for_ping(&lab, &ha, b.ip, Duration::from_secs(15)).unwrap();
    a.wait_peer(&lab, "bob", Duration::from_secs(10), |p| {
        p["path"] == "direct"
    })
    .unwrap();
    let d0 = direct.packets().unwrap();
    for _ in 0..5 {
        assert!(scenario::ping_once(&lab, &ha, b.ip, Duration::from_secs(1)).is_some());
    }
    let dd = direct.packets().unwrap() - d0;
    eprintln!("IPv6 off on both hosts: 5 pings, {dd} direct UDP packets between the NATs");
    assert!(dd >= 5, "pings did not go directly ({dd} direct packets)");

    for d in [&a, &b] {
        let s = d.status(&lab).unwrap();
        let off = s["self"]["ipv6_off"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(off.contains("switched off"), "{}: {s:#}", d.name);
        let (ok, text, _) = d.agentctl(&lab, &["status"]).unwrap();
        assert!(ok && text.contains("IPv6: off on this host"), "{text}");
        // No IPv6 address on the TUN device, and agentd said why once.
        let addrs = lab
            .exec_ok(&d.host, "ip", ["-6", "addr", "show", "dev", "agentd0"])
            .unwrap();
        assert!(!addrs.contains("fd7a"), "{addrs}");
        let log = d.agentd.stderr();
        assert_eq!(log.matches("IPv6 off on this host").count(), 1, "{log}");
    }

    // IPv6 switched on again on alice's host: agentd takes it up without a restart.
    for key in [
        "net.ipv6.conf.all.disable_ipv6=0",
        "net.ipv6.conf.default.disable_ipv6=0",
    ] {
        lab.exec_ok(&ha, "sysctl", ["-q", "-w", key]).unwrap();
    }
    let t0 = Instant::now();
    loop {
        let s = a.status(&lab).unwrap();
        let addrs = lab
            .exec_ok(&ha, "ip", ["-6", "addr", "show", "dev", "agentd0"])
            .unwrap();
        if s["self"]["ipv6_off"].is_null() && addrs.contains("fd7a:115c:a1e0") {
            eprintln!(
                "IPv6 switched on: agentd took it up after {:?}",
                t0.elapsed()
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "IPv6 not taken up after 10 s: {addrs}\n{s:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn deleted_tun_device_is_made_again_and_the_ping_resumes() {
    let lab = lab_or_skip!();
    let (_region, control) = world(&lab);
    let (_ra, _rb, ha, hb) = two_easy_nats(&lab);
    let mut a = scenario::start_agentd(&lab, &ha, "alice", &control).unwrap();
    let b = scenario::start_agentd(&lab, &hb, "bob", &control).unwrap();
    scenario::wait_for_ping(&lab, &ha, b.ip, Duration::from_secs(15)).unwrap();

    let ping = start_steady_ping(&lab, &ha, b.ip);
    std::thread::sleep(Duration::from_secs(2));
    let deleted = epoch_now();
    lab.exec_ok(&ha, "ip", ["link", "del", "agentd0"]).unwrap();
    let resumed = resumed_after(&ping, deleted, Duration::from_secs(15));
    eprintln!("TUN device deleted: the 20/s ping resumed after {resumed:?}");
    let resumed = resumed.expect("the ping never resumed");
    assert!(
        resumed <= Duration::from_secs(3),
        "resumed after {resumed:?}"
    );

    a.agentd
        .wait_for_output("TUN device disappeared", Duration::from_secs(1))
        .unwrap();
    let s = a.status(&lab).unwrap();
    assert_eq!(s["counters"]["tun_recreated"], 1, "{s:#}");
    assert!(a.agentd.try_wait().unwrap().is_none(), "agentd exited");
}

#[test]
fn a_login_server_that_never_answers_shows_retrying() {
    let lab = lab_or_skip!();
    let server = lab.add_public_host("silent").unwrap();
    let addr = SocketAddr::from((server.ip, 8080));
    let listener = lab.tcp_listen(&server, addr).unwrap();
    // Accepts every connection and holds it open without writing a byte.
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = std::sync::Arc::clone(&held);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                held.lock().unwrap().push(conn);
            }
        });
    }
    let host = lab.add_public_host("dev").unwrap();
    let dev = Device::start_unregistered(&lab, &host, "dev", &format!("http://{addr}")).unwrap();
    let t0 = Instant::now();
    let s = loop {
        let s = dev.status(&lab).unwrap();
        if s["control_state"] == "retrying" {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not retrying after 30 s: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "silent login server: retrying after {:?} ({})",
        t0.elapsed(),
        s["control_error"]
    );
    assert!(!held.lock().unwrap().is_empty(), "agentd never connected");
    let (ok, text, _) = dev.agentctl(&lab, &["status"]).unwrap();
    assert!(ok && text.contains("control: retrying"), "{text}");
}

/// The public port the rebinding moves alice's NAT to (a one-port range keeps the NAT
/// endpoint-independent: every flow from alice's socket gets it).
const REBOUND_PORT: u16 = 40000;

#[test]
fn nat_rebinding_is_direct_again_within_3_s() {
    let lab = lab_or_skip!(requires: ["conntrack"]);
    let (region, control) = world(&lab);
    let (ra, rb, ha, hb) = two_easy_nats(&lab);
    let a = scenario::start_agentd(&lab, &ha, "alice", &control).unwrap();
    let b = scenario::start_agentd(&lab, &hb, "bob", &control).unwrap();
    scenario::wait_for_ping(&lab, &ha, b.ip, Duration::from_secs(15)).unwrap();
    let ping = start_steady_ping(&lab, &ha, b.ip);
    for (d, peer) in [(&a, "bob"), (&b, "alice")] {
        d.wait_peer(&lab, peer, Duration::from_secs(10), |p| {
            p["path"] == "direct"
        })
        .unwrap();
    }

    // On the wire between the NATs: bob's packets to alice's new public port (direct
    // traffic after the rebinding), alice's from it, and alice's relayed traffic.
    let count = |filter: String| lab.count_packets(lab.internet(), &filter).unwrap();
    let to_new = count(format!(
        "ip saddr {} ip daddr {} udp dport {REBOUND_PORT}",
        rb.wan_ip, ra.wan_ip
    ));
    let from_new = count(format!(
        "ip saddr {} ip daddr {} udp sport {REBOUND_PORT}",
        ra.wan_ip, rb.wan_ip
    ));
    let relayed = count(format!(
        "ip saddr {} ip daddr {} tcp dport 443",
        ra.wan_ip, region.host.ip
    ));
    let old_port = a.status(&lab).unwrap()["self"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str()?.parse::<SocketAddr>().ok())
        .find(|e| e.ip() == std::net::IpAddr::V4(ra.wan_ip))
        .map(|e| e.port())
        .expect("alice advertises no public endpoint");
    assert_ne!(old_port, REBOUND_PORT);

    // The rebinding: the NAT maps to another port from now on, and forgets every
    // mapping it had.
    lab.exec_ok(&ra, "nft", ["flush", "chain", "ip", "lab", "postrouting"])
        .unwrap();
    // UDP to the new port, the rest (TCP to the relay) as before.
    for rule in [
        format!("add rule ip lab postrouting oifname \"wan\" meta l4proto udp fib saddr type != local masquerade to :{REBOUND_PORT} persistent"),
        "add rule ip lab postrouting oifname \"wan\" fib saddr type != local masquerade persistent".to_string(),
    ] {
        lab.exec_ok(&ra, "nft", [rule.as_str()]).unwrap();
    }
    let rebound = epoch_now();
    let t0 = Instant::now();
    lab.exec_ok(&ra, "conntrack", ["-F"]).unwrap();

    // Sampled every 100 ms for 10 s: (time since the flush, to_new, from_new, relayed).
    let mut samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(10) {
        samples.push((
            t0.elapsed(),
            to_new.packets().unwrap(),
            from_new.packets().unwrap(),
            relayed.packets().unwrap(),
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Direct again: the first sample from which, for half a second, the 20/s ping
    // crosses directly both ways on the new port (≥ 8 of its 10 packets each way) and
    // next to nothing goes through the relay.
    let direct_at = samples.iter().enumerate().find_map(|(i, s)| {
        let later = samples[i..]
            .iter()
            .find(|l| l.0 >= s.0 + Duration::from_millis(500))?;
        (later.1 - s.1 >= 8 && later.2 - s.2 >= 8 && later.3 - s.3 <= 2).then_some(s.0)
    });
    let resumed = resumed_after(&ping, rebound, Duration::from_secs(1));
    eprintln!(
        "NAT rebinding (public port {old_port} -> {REBOUND_PORT}): direct again after {direct_at:?} \
         (on the wire), ping replies resumed after {resumed:?}"
    );
    let direct_at = direct_at.unwrap_or_else(|| panic!("never direct again: {samples:?}"));
    assert!(
        direct_at <= Duration::from_secs(3),
        "direct again only after {direct_at:?}: {samples:?}"
    );
    // alice now advertises the new port.
    let s = a.status(&lab).unwrap();
    assert!(
        s["self"]["endpoints"]
            .to_string()
            .contains(&format!("{}:{REBOUND_PORT}", ra.wan_ip)),
        "{s:#}"
    );
}
