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
    #[allow(dead_code)] // kept running: the far region must be measured and not chosen
    far: Region,
    control: Control,
}

fn world(lab: &Lab) -> World {
    let near = scenario::start_region(lab, 901, 10).unwrap();
    let far = scenario::start_region(lab, 902, 40).unwrap();
    let map = scenario::write_relay_map(lab, &[&near, &far], &[]).unwrap();
    let control = scenario::start_control(lab, &map).unwrap();
    World { near, far, control }
}

/// Pings until the first answer (each try waits up to a second); returns when it came.
fn first_ping(lab: &Lab, from: &Host, to: Ipv4Addr, within: Duration) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if let Some(rtt) = ping_once(lab, from, to, Duration::from_secs(1)) {
            eprintln!("{}: first ping to {to} after {:?} (rtt {rtt:?})", from.node.name(), t0.elapsed());
            return t0.elapsed();
        }
    }
    panic!("{} could not ping {to} within {within:?}", from.node.name());
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

/// Waits for agentd to log a direct path; returns how long that took from `since`.
fn wait_direct(dev: &mut Device, since: Instant, within: Duration) -> Duration {
    dev.agentd
        .wait_for_output("path=direct", within)
        .unwrap_or_else(|e| panic!("{} found no direct path: {e}", dev.name));
    since.elapsed()
}

fn devices(lab: &Lab, w: &World, a: &Router, b: &Router) -> (Host, Host, Device, Device) {
    let ha = lab.add_lan_host("alice", a).unwrap();
    let hb = lab.add_lan_host("bob", b).unwrap();
    let da = scenario::start_agentd(lab, &ha, "alice", &w.control).unwrap();
    let db = scenario::start_agentd(lab, &hb, "bob", &w.control).unwrap();
    (ha, hb, da, db)
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
    let relayed = lab
        .count_packets(
            lab.internet(),
            &format!("ip saddr {} ip daddr {} tcp dport 443", ra.wan_ip, w.near.host.ip),
        )
        .unwrap();
    let (ha, _hb, mut a, mut b) = devices(&lab, &w, &ra, &rb);
    let up = Instant::now();

    // The first ping gets through at once.
    let first = first_ping(&lab, &ha, b.ip, Duration::from_secs(10));
    assert!(first < Duration::from_secs(2), "first ping took {first:?}");

    // The path becomes direct within a second.
    let t = wait_direct(&mut a, up, Duration::from_secs(5));
    eprintln!("alice: direct after {t:?}");
    assert!(t < Duration::from_secs(1) + first, "direct only after {t:?}");
    wait_direct(&mut b, up, Duration::from_secs(5));

    // Data now goes directly, not through the relay.
    let d0 = direct.packets().unwrap();
    let r0 = relayed.packets().unwrap();
    all_pings_answer(&lab, &ha, b.ip, 5);
    let (dd, dr) = (direct.packets().unwrap() - d0, relayed.packets().unwrap() - r0);
    eprintln!("5 pings: {dd} direct UDP packets, {dr} relay TCP packets from alice's router");
    assert!(dd >= 5, "pings did not go directly ({dd} direct packets)");
    assert!(dr <= 2, "pings still went through the relay ({dr} packets)");

    // Both picked the nearer region as home.
    for d in [&mut a, &mut b] {
        d.agentd
            .wait_for_output("home relay region region=901", Duration::from_secs(5))
            .unwrap();
        assert!(!d.agentd.stdout().contains("home relay region region=902"));
    }
}
