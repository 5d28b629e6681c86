//! Tests of per-peer path selection, driven with explicit instants: behaviour named by
//! test, plus a randomized check that the timers always move forward.

use super::*;

fn region(id: i32) -> proto::RegionId {
    proto::RegionId::new(id).expect("a region ID is positive")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Drains actions; returns the pings (to, tx) and whether a call-me-maybe was asked.
fn drain(p: &mut PathState) -> (Vec<(SocketAddr, TxId)>, bool, Vec<Path>) {
    let (mut pings, mut cmm, mut changes) = (Vec::new(), false, Vec::new());
    while let Some(a) = p.poll_action() {
        match a {
            Action::SendPing { to, tx_id } => pings.push((to, tx_id)),
            Action::SendCallMeMaybe => cmm = true,
            Action::PathChanged(x) => changes.push(x),
            Action::DirectPathQuiet => {}
        }
    }
    (pings, cmm, changes)
}

fn peer(eps: &[&str], t0: Instant) -> PathState {
    let mut p = PathState::new(1, t0);
    p.set_relay(true);
    let eps: Vec<SocketAddr> = eps.iter().map(|e| addr(e)).collect();
    p.set_endpoints(&eps, t0);
    p
}

/// Answers every ping in `pings` to `ok` addresses after `rtt`.
fn answer(
    p: &mut PathState,
    pings: &[(SocketAddr, TxId)],
    ok: &[(SocketAddr, Duration)],
    sent: Instant,
) {
    for (to, tx) in pings {
        if let Some((_, rtt)) = ok.iter().find(|(a, _)| a == to) {
            p.on_pong(*to, *tx, addr("192.0.2.200:1"), sent + *rtt);
        }
    }
}

#[test]
fn relay_first_then_direct_after_first_pong() {
    let t0 = Instant::now();
    let mut p = peer(&["198.51.100.2:41641"], t0);
    assert_eq!(
        p.send_targets(t0),
        SendTargets {
            udp: None,
            relay: true
        }
    );
    assert_eq!(p.reason(t0), PathReason::Idle);
    assert!(p.on_data_sent(t0), "no trusted path: discovery starts");
    let (pings, cmm, _) = drain(&mut p);
    assert_eq!(pings.len(), 1);
    assert!(cmm, "discovery also asks the peer to ping back");
    assert!(matches!(p.reason(t0), PathReason::Discovering { .. }));
    // Still relay until the pong.
    assert_eq!(p.send_targets(t0 + ms(10)).udp, None);
    answer(&mut p, &pings, &[(addr("198.51.100.2:41641"), ms(20))], t0);
    let (_, _, changes) = drain(&mut p);
    assert_eq!(changes, vec![Path::Direct(addr("198.51.100.2:41641"))]);
    let now = t0 + ms(21);
    assert_eq!(
        p.send_targets(now),
        SendTargets {
            udp: Some(addr("198.51.100.2:41641")),
            relay: false
        }
    );
    assert!(p
        .reason(now)
        .describe(now)
        .starts_with("direct 198.51.100.2:41641"));
    // Data on the trusted path asks for nothing to be sent.
    assert!(!p.on_data_sent(now));
    assert_eq!(drain(&mut p).0.len(), 0);
}

#[test]
fn heartbeat_keeps_path_trusted() {
    let t0 = Instant::now();
    let ep = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    settle(&mut p, &[(ep, ms(10))], t0);
    // Traffic for 30 s, the peer answers every heartbeat: never untrusted.
    let mut now = t0;
    while now < t0 + Duration::from_secs(30) {
        now += ms(100);
        p.on_data_sent(now);
        run_due(&mut p, now);
        let (pings, _, changes) = drain(&mut p);
        assert!(changes.is_empty(), "path changed at {:?}", now - t0);
        answer(&mut p, &pings, &[(ep, ms(10))], now);
        assert_eq!(
            p.send_targets(now + ms(10)),
            SendTargets {
                udp: Some(ep),
                relay: false
            }
        );
    }
    assert!(p.counters.pings_sent >= 9, "heartbeats every 3 s");
}

#[test]
fn pongs_stop_falls_back_to_relay_within_trust_window() {
    let t0 = Instant::now();
    let ep = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    settle(&mut p, &[(ep, ms(10))], t0);
    let last_pong = t0 + ms(10);
    // From now on nothing answers, traffic keeps flowing.
    let mut now = t0;
    let mut relay_again = None;
    let mut lost = None;
    while now < t0 + Duration::from_secs(20) {
        now += ms(100);
        p.on_data_sent(now);
        run_due(&mut p, now);
        let (_, _, changes) = drain(&mut p);
        if relay_again.is_none() && p.send_targets(now).relay {
            relay_again = Some(now);
        }
        if changes.contains(&Path::Relay) {
            lost = Some(now);
        }
    }
    let relay_again = relay_again.expect("relay used again");
    assert!(relay_again - last_pong <= TRUST_UDP_ADDR + ms(100));
    assert!(lost.is_some(), "the dead path is given up");
    assert!(matches!(p.reason(now), PathReason::DirectLost { .. }));
    assert_eq!(
        p.send_targets(now),
        SendTargets {
            udp: None,
            relay: true
        }
    );
}

/// A direct path carrying traffic both ways, then blackholed at `cut`: returns the
/// state and the time (after `cut`) the relay was first used again, the time the
/// path was given up, and how often `handle_timeout` ran.
fn blackhole_after(cut: Duration, until: Duration) -> (PathState, Duration, Duration, usize) {
    let t0 = Instant::now();
    let ep = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    settle(&mut p, &[(ep, ms(10))], t0);
    let (mut relay_at, mut lost_at, mut runs) = (None, None, 0);
    let mut now = t0;
    while now < t0 + until {
        now += ms(10);
        p.on_data_sent(now);
        let alive = now < t0 + cut;
        if alive {
            // The peer's packets (TCP acknowledgements, say) come back directly.
            p.on_heard_direct(now);
        }
        runs += usize::from(run_due(&mut p, now));
        let (pings, _, changes) = drain(&mut p);
        if alive {
            answer(&mut p, &pings, &[(ep, ms(10))], now);
            assert!(
                !p.send_targets(now).relay,
                "relay used while the path works"
            );
        } else {
            if relay_at.is_none() && p.send_targets(now).relay {
                relay_at = Some(now - (t0 + cut));
            }
            if changes.contains(&Path::Relay) {
                lost_at.get_or_insert(now - (t0 + cut));
            }
        }
    }
    (
        p,
        relay_at.expect("relay used again"),
        lost_at.expect("path given up"),
        runs,
    )
}

#[test]
fn quiet_path_is_probed_and_distrusted_long_before_the_trust_window_ends() {
    // Cut at several points of the heartbeat rhythm.
    for cut_ms in [10_000, 10_700, 11_400, 12_100, 12_900] {
        let (p, relay_at, lost_at, runs) = blackhole_after(ms(cut_ms), ms(cut_ms + 15_000));
        // Quiet for 1.5 s, then a ping unanswered for 1 s (a heartbeat that went
        // out during the quiet counts as that ping): relay copies within 2.5 s.
        assert!(
            relay_at <= SILENCE_PROBE_AFTER + SILENCE_PROBE_WAIT + ms(20),
            "cut at {cut_ms} ms: relay again after {relay_at:?}"
        );
        // The path itself is given up when that ping is lost (5 s).
        assert!(
            lost_at <= SILENCE_PROBE_AFTER + PING_TIMEOUT + ms(20),
            "cut at {cut_ms} ms: given up after {lost_at:?}"
        );
        assert_eq!(p.counters.silence_distrusted, 1);
        // The timer ran a bounded number of times (no deadline that stays due).
        assert!(runs < 200, "handle_timeout ran {runs} times");
    }
}

#[test]
fn traffic_coming_back_keeps_the_path_trusted_without_extra_pings() {
    // Never cut: 30 s of traffic both ways.
    let t0 = Instant::now();
    let ep = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    settle(&mut p, &[(ep, ms(10))], t0);
    let mut now = t0;
    while now < t0 + Duration::from_secs(30) {
        now += ms(10);
        p.on_data_sent(now);
        p.on_heard_direct(now);
        run_due(&mut p, now);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(ep, ms(10))], now);
        assert!(!p.send_targets(now).relay);
    }
    assert_eq!(p.counters.silence_probes, 0);
    assert!(p.counters.pings_sent <= 12, "{:?}", p.counters);
}

#[test]
fn one_way_traffic_is_probed_but_stays_trusted_while_pongs_come() {
    // Data goes out, nothing comes back but the pongs.
    let t0 = Instant::now();
    let ep = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    settle(&mut p, &[(ep, ms(10))], t0);
    let mut now = t0;
    let mut runs = 0;
    while now < t0 + Duration::from_secs(30) {
        now += ms(10);
        p.on_data_sent(now);
        runs += usize::from(run_due(&mut p, now));
        let (pings, _, changes) = drain(&mut p);
        assert!(changes.is_empty());
        answer(&mut p, &pings, &[(ep, ms(10))], now);
        assert!(!p.send_targets(now + ms(10)).relay, "at {:?}", now - t0);
    }
    // A ping about every 1.5 s instead of every 3 s; never distrusted.
    assert!(p.counters.silence_probes >= 10, "{:?}", p.counters);
    assert!(p.counters.pings_sent <= 30, "{:?}", p.counters);
    assert_eq!(p.counters.silence_distrusted, 0);
    assert!(runs < 100, "handle_timeout ran {runs} times");
}

#[test]
fn a_late_pong_restores_the_trust_a_quiet_path_lost() {
    let t0 = Instant::now();
    let ep = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    settle(&mut p, &[(ep, ms(10))], t0);
    let mut probe = None;
    let mut now = t0;
    while now < t0 + Duration::from_secs(4) {
        now += ms(10);
        p.on_data_sent(now);
        run_due(&mut p, now);
        let (pings, _, _) = drain(&mut p);
        probe = probe.or(pings.first().copied());
    }
    assert!(
        p.send_targets(now).relay,
        "distrusted while the pong is late"
    );
    // The pong of that ping arrives late (a delay spike, not a dead path).
    let (to, tx) = probe.expect("the quiet path was pinged");
    p.on_pong(to, tx, addr("192.0.2.200:1"), now);
    assert_eq!(
        p.send_targets(now),
        SendTargets {
            udp: Some(ep),
            relay: false
        }
    );
    assert_eq!(p.path(), Path::Direct(ep));
}

/// Two peers on a simulated network where each can reach the other only after it
/// has itself sent to it (two port-restricted NATs): call-me-maybe makes both ping.
#[test]
fn call_me_maybe_makes_both_sides_ping() {
    let t0 = Instant::now();
    let a_addr = addr("198.51.100.1:41641");
    let b_addr = addr("198.51.100.2:41641");
    let mut a = peer(&["198.51.100.2:41641"], t0);
    let mut b = peer(&["198.51.100.1:41641"], t0);
    let mut opened_a = false; // a's NAT has sent to b
    let mut opened_b = false;
    a.on_data_sent(t0);
    let (pings_a, cmm, _) = drain(&mut a);
    assert!(cmm);
    opened_a = opened_a || !pings_a.is_empty();
    // a's pings die at b's NAT (b never sent to a). The call-me-maybe reaches b via
    // the relay; b pings a's endpoints at once and does not call back.
    assert!(!opened_b);
    let now = t0 + ms(30);
    b.on_call_me_maybe(&[a_addr], now);
    let (pings_b, cmm_b, _) = drain(&mut b);
    assert!(!cmm_b, "no call-me-maybe in reply to one");
    assert_eq!(
        pings_b.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        vec![a_addr]
    );
    opened_b = true;
    // b's ping passes a's NAT (a has sent to b): a answers; b gets its direct path.
    assert!(opened_a && opened_b);
    a.on_ping(Via::Udp(b_addr), pings_b[0].1, now + ms(10));
    b.on_pong(a_addr, pings_b[0].1, b_addr, now + ms(20));
    assert_eq!(b.path(), Path::Direct(a_addr));
    // a learned b's address from the ping and pinged it back; b answers that.
    let (pings_a2, _, _) = drain(&mut a);
    let back = pings_a2
        .iter()
        .find(|(t, _)| *t == b_addr)
        .expect("a pings b back");
    a.on_pong(b_addr, back.1, a_addr, now + ms(30));
    assert_eq!(a.path(), Path::Direct(b_addr));
}

/// Runs the timers if one is due; returns whether it did.
fn run_due(p: &mut PathState, now: Instant) -> bool {
    let due = p.poll_timeout().is_some_and(|t| t <= now);
    if due {
        p.handle_timeout(now);
    }
    due
}

fn settle(p: &mut PathState, eps: &[(SocketAddr, Duration)], t0: Instant) -> Instant {
    p.on_data_sent(t0);
    let (pings, _, _) = drain(p);
    answer(p, &pings, eps, t0);
    drain(p);
    t0 + ms(100)
}

#[test]
fn slightly_faster_candidate_does_not_steal_path() {
    let t0 = Instant::now();
    let a = addr("198.51.100.2:41641");
    let b = addr("203.0.113.9:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    let mut now = settle(&mut p, &[(a, ms(20))], t0);
    assert_eq!(p.path(), Path::Direct(a));
    // b appears and keeps answering 5 % faster (then 10 %): the path stays on a.
    for rtt_b in [19, 19, 18, 18, 18, 18, 18, 18].map(ms) {
        p.on_call_me_maybe(&[b], now);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(a, ms(20)), (b, rtt_b)], now);
        let (_, _, changes) = drain(&mut p);
        assert!(changes.is_empty(), "{changes:?}");
        now += Duration::from_secs(6);
    }
    assert_eq!(p.path(), Path::Direct(a));
}

#[test]
fn much_faster_candidate_takes_path() {
    let t0 = Instant::now();
    let a = addr("198.51.100.2:41641");
    let b = addr("203.0.113.9:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    let now = settle(&mut p, &[(a, ms(20))], t0);
    assert_eq!(p.path(), Path::Direct(a));
    // b answers in 40 % of the time: it takes over at its first pong.
    let later = now + Duration::from_secs(6);
    p.on_call_me_maybe(&[b], later);
    let (pings, _, _) = drain(&mut p);
    answer(&mut p, &pings, &[(a, ms(20)), (b, ms(8))], later);
    let (_, _, changes) = drain(&mut p);
    assert_eq!(changes, vec![Path::Direct(b)]);
    // And keeps it while it stays that fast.
    let mut t = later;
    for _ in 0..LATENCY_WINDOW {
        t += Duration::from_secs(6);
        p.on_call_me_maybe(&[b], t);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(a, ms(20)), (b, ms(8))], t);
    }
    assert_eq!(p.path(), Path::Direct(b));
}

#[test]
fn lan_address_preferred_over_public_when_close() {
    let t0 = Instant::now();
    let public = addr("198.51.100.2:41641");
    let lan = addr("10.1.0.20:41641");
    let mut p = peer(&["198.51.100.2:41641", "10.1.0.20:41641"], t0);
    p.on_data_sent(t0);
    let (pings, _, _) = drain(&mut p);
    // The public answer comes first and is 3 % faster; the LAN one wins anyway.
    let pub_tx = pings.iter().find(|(a, _)| *a == public).unwrap().1;
    let lan_tx = pings.iter().find(|(a, _)| *a == lan).unwrap().1;
    p.on_pong(public, pub_tx, public, t0 + ms(1));
    p.on_pong(lan, lan_tx, lan, t0 + Duration::from_micros(1030));
    assert_eq!(p.path(), Path::Direct(lan));
    // And a public path much faster than a slow LAN one still wins.
    let mut q = peer(&["198.51.100.2:41641", "10.1.0.20:41641"], t0);
    q.on_data_sent(t0);
    let (pings, _, _) = drain(&mut q);
    let lan_tx = pings.iter().find(|(a, _)| *a == lan).unwrap().1;
    let pub_tx = pings.iter().find(|(a, _)| *a == public).unwrap().1;
    q.on_pong(lan, lan_tx, lan, t0 + ms(40));
    assert_eq!(
        q.path(),
        Path::Direct(lan),
        "first answer while nothing else is known"
    );
    q.on_pong(public, pub_tx, public, t0 + ms(10));
    assert_eq!(
        q.path(),
        Path::Direct(public),
        "4× faster beats the LAN bonus"
    );
}

#[test]
fn unanswered_candidate_is_penalised_then_forgiven() {
    let t0 = Instant::now();
    let steady = addr("198.51.100.2:41641");
    let flaky = addr("203.0.113.9:41641");
    let mut p = peer(&["198.51.100.2:41641", "203.0.113.9:41641"], t0);
    p.on_data_sent(t0);
    let (pings, _, _) = drain(&mut p);
    // Only steady answers; flaky's ping times out → penalised.
    answer(&mut p, &pings, &[(steady, ms(20))], t0);
    drain(&mut p);
    let t1 = t0 + PING_TIMEOUT + ms(1);
    p.handle_timeout(t1);
    drain(&mut p);
    assert!(p.candidates[&flaky].penalised(t1));
    // Flaky now answers 15 % faster: with the penalty that is not enough.
    p.on_call_me_maybe(&[flaky], t1);
    let (pings, _, _) = drain(&mut p);
    answer(&mut p, &pings, &[(steady, ms(20)), (flaky, ms(17))], t1);
    drain(&mut p);
    assert_eq!(p.path(), Path::Direct(steady));
    // After the penalty runs out the same margin wins.
    let t2 = t1 + FAILURE_PENALTY_TIME + ms(1);
    p.on_call_me_maybe(&[flaky], t2);
    let (pings, _, _) = drain(&mut p);
    answer(&mut p, &pings, &[(steady, ms(20)), (flaky, ms(17))], t2);
    assert_eq!(p.path(), Path::Direct(flaky));
}

#[test]
fn ping_learned_candidate_expires_after_45s() {
    let t0 = Instant::now();
    let mut p = peer(&[], t0);
    assert_eq!(p.reason(t0), PathReason::NoEndpoints);
    let from = addr("198.51.100.77:5555");
    p.on_ping(Via::Udp(from), [1; 12], t0);
    let (pings, _, _) = drain(&mut p);
    assert_eq!(pings.len(), 1, "a new source is pinged back");
    assert_eq!(p.candidates().len(), 1);
    p.handle_timeout(t0 + SESSION_ACTIVE_TIMEOUT - ms(1));
    assert_eq!(p.candidates().len(), 1);
    p.handle_timeout(t0 + SESSION_ACTIVE_TIMEOUT);
    assert!(p.candidates().is_empty());
}

#[test]
fn heartbeats_stop_after_45s_idle() {
    let t0 = Instant::now();
    let ep = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    let mut now = settle(&mut p, &[(ep, ms(10))], t0);
    let sent_before = p.counters.pings_sent;
    // No more data: heartbeats continue until 45 s, then stop.
    let end = t0 + Duration::from_secs(120);
    let mut rounds = 0;
    while let Some(t) = p.poll_timeout() {
        if t > end {
            break;
        }
        rounds += 1;
        assert!(rounds < 1000, "timer stuck at {:?}", t - t0);
        now = t.max(now);
        p.handle_timeout(now);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(ep, ms(10))], now);
    }
    let hb = p.counters.pings_sent - sent_before;
    assert!((13..=16).contains(&hb), "{hb} heartbeats in 45 s");
    assert!(p.heartbeat_at.is_none());
}

#[test]
fn no_flapping_between_similar_paths() {
    let t0 = Instant::now();
    let a = addr("198.51.100.2:41641");
    let b = addr("203.0.113.9:41641");
    let mut p = peer(&["198.51.100.2:41641", "203.0.113.9:41641"], t0);
    p.on_data_sent(t0);
    let mut seed = 7u64;
    let mut jitter = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ms(18 + (seed >> 60) % 5) // 18..22 ms
    };
    let mut now = t0;
    let mut changes = 0;
    for _ in 0..500 {
        let (pings, _, ch) = drain(&mut p);
        changes += ch.len();
        for (to, tx) in pings {
            let _ = to;
            p.on_pong(to, tx, to, now + jitter());
        }
        now += Duration::from_millis(700);
        p.on_data_sent(now);
        p.handle_timeout(now);
        // Every 5 s both candidates are pinged again (a full round).
        p.on_call_me_maybe(&[a, b], now);
    }
    let (_, _, ch) = drain(&mut p);
    changes += ch.len();
    assert!(
        changes <= 3,
        "path changed {changes} times between two equal paths"
    );
}

#[test]
fn bounded_candidates_and_unknown_pongs_are_counted() {
    let t0 = Instant::now();
    let mut p = peer(&[], t0);
    let many: Vec<SocketAddr> = (0..100)
        .map(|i| SocketAddr::from(([198, 51, 100, i], 1)))
        .collect();
    p.on_call_me_maybe(&many, t0);
    assert_eq!(p.candidates().len(), MAX_CANDIDATES);
    assert_eq!(p.counters.candidates_dropped, 100 - MAX_CANDIDATES as u64);
    p.on_pong(many[0], [0xEE; 12], many[0], t0);
    assert_eq!(p.counters.unknown_pongs, 1);
    assert_eq!(p.path(), Path::Relay);
}

/// Drives `p` through its own deadlines up to `end`, answering no ping; returns
/// the instants at which a call-me-maybe was asked for.
fn run_unanswered(p: &mut PathState, end: Instant) -> Vec<Instant> {
    let mut cmm_at = Vec::new();
    let mut rounds = 0;
    while let Some(t) = p.poll_timeout() {
        if t > end {
            break;
        }
        rounds += 1;
        assert!(rounds < 1000, "timer stuck at {t:?}");
        p.handle_timeout(t);
        assert!(
            p.poll_timeout().is_none_or(|n| n > t),
            "deadline did not move"
        );
        if drain(p).1 {
            cmm_at.push(t);
        }
    }
    cmm_at
}

#[test]
fn unanswered_call_me_maybe_is_repeated_with_backoff_until_idle() {
    let t0 = Instant::now();
    let mut p = peer(&["198.51.100.2:41641"], t0);
    p.on_data_sent(t0);
    assert!(drain(&mut p).1);
    let mut cmm_at = vec![t0];
    cmm_at.extend(run_unanswered(&mut p, t0 + Duration::from_secs(300)));
    let gaps: Vec<Duration> = cmm_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps[..2], [CMM_RETRY_MIN, 2 * CMM_RETRY_MIN], "{gaps:?}");
    assert!(
        gaps.iter()
            .all(|g| *g >= CMM_RETRY_MIN && *g <= DISCO_PING_INTERVAL),
        "{gaps:?}"
    );
    let last = *cmm_at.last().unwrap();
    assert!(last < t0 + SESSION_ACTIVE_TIMEOUT, "asked while idle");
    assert!(last >= t0 + SESSION_ACTIVE_TIMEOUT - DISCO_PING_INTERVAL);
    assert_eq!(
        p.poll_timeout(),
        None,
        "an idle peer with no path needs no timer"
    );
}

#[test]
fn call_me_maybe_is_not_retried_without_a_relay() {
    let t0 = Instant::now();
    let mut p = peer(&["198.51.100.2:41641"], t0);
    p.on_data_sent(t0);
    assert!(drain(&mut p).1);
    // The peer's home region goes away: no more call-me-maybe, and no timer spins.
    p.set_relay(false);
    let cmm_at = run_unanswered(&mut p, t0 + Duration::from_secs(300));
    assert!(cmm_at.is_empty(), "{cmm_at:?}");
    assert_eq!(p.poll_timeout(), None);
}

#[test]
fn ping_learned_best_path_outlives_45s_without_a_stale_timer() {
    let t0 = Instant::now();
    let from = addr("198.51.100.77:5555");
    let mut p = peer(&[], t0);
    p.on_ping(Via::Udp(from), [1; 12], t0);
    let (pings, _, _) = drain(&mut p);
    answer(&mut p, &pings, &[(from, ms(10))], t0);
    drain(&mut p);
    assert_eq!(p.path(), Path::Direct(from));
    // We keep sending, the peer answers our heartbeats but never pings us again:
    // the address is still the best path after its 45 s as a ping-learned candidate.
    let mut now = t0;
    while now < t0 + Duration::from_secs(90) {
        now += ms(500);
        p.on_data_sent(now);
        run_due(&mut p, now);
        assert!(
            p.poll_timeout().is_none_or(|t| t > now),
            "deadline in the past at {:?}",
            now - t0
        );
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(from, ms(10))], now);
    }
    assert_eq!(p.path(), Path::Direct(from));
}

/// The peer's NAT moved it: the trusted path goes quiet while its new address (from
/// its call-me-maybe) answers. The new address takes over once the quiet path's probe is
/// out and unanswered, not at the next 5 s discovery round; before that, a trusted path
/// with no sign of trouble stays.
#[test]
fn a_quiet_path_gives_way_to_a_candidate_that_answers() {
    let t0 = Instant::now();
    let old = addr("198.51.100.2:41641");
    let new = addr("198.51.100.2:40000");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    p.on_data_sent(t0);
    let (pings, _, _) = drain(&mut p);
    answer(&mut p, &pings, &[(old, ms(10))], t0);
    drain(&mut p);
    // Traffic flows both ways until t1, then nothing comes back from `old`.
    let t1 = t0 + ms(1000);
    p.on_heard_direct(t1);
    // The peer announces its new address while our path is still trusted: it is pinged
    // and answers, and the trusted path stays.
    let t2 = t1 + ms(300);
    p.on_data_sent(t2);
    p.on_call_me_maybe(&[new], t2);
    let (pings, _, _) = drain(&mut p);
    answer(&mut p, &pings, &[(new, ms(10))], t2);
    drain(&mut p);
    assert_eq!(p.path(), Path::Direct(old));
    // Data keeps going out, `new` answers every ping and `old` none: `new` is the path
    // soon after the silence probe, well before the quiet path's trust would run out.
    let mut now = t2;
    while p.path() != Path::Direct(new) {
        now += ms(50);
        assert!(
            now <= t1 + SILENCE_PROBE_AFTER + SILENCE_PROBE_WAIT + ms(100),
            "still on {:?} {:?} after the old path went quiet",
            p.path(),
            now - t1
        );
        p.on_data_sent(now);
        p.handle_timeout(now);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(new, ms(10))], now);
    }
    eprintln!(
        "the new address took over {:?} after the old path went quiet",
        now - t1
    );
}

#[test]
fn our_new_endpoints_are_announced_at_once_even_over_a_trusted_path() {
    let t0 = Instant::now();
    let a = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641", "203.0.113.9:41641"], t0);
    // Idle: nothing to announce (the next data starts discovery anyway).
    p.our_endpoints_changed(t0);
    assert_eq!(p.poll_action(), None);
    p.on_data_sent(t0);
    let (pings, _, _) = drain(&mut p);
    answer(&mut p, &pings, &[(a, ms(10))], t0);
    drain(&mut p);
    let t1 = t0 + ms(300);
    p.on_data_sent(t1);
    assert!(p.send_targets(t1).udp == Some(a) && !p.send_targets(t1).relay);
    p.our_endpoints_changed(t1);
    let (pings, cmm, changes) = drain(&mut p);
    assert!(cmm, "no call-me-maybe for our new endpoints");
    assert_eq!(pings.len(), 2, "every candidate pinged again");
    assert!(changes.is_empty(), "the trusted path stays: {changes:?}");
    assert_eq!(p.path(), Path::Direct(a));
}

#[test]
fn a_quiet_trusted_path_asks_for_a_new_measurement_once() {
    let t0 = Instant::now();
    let a = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    p.on_data_sent(t0);
    let (pings, _, _) = drain(&mut p);
    answer(&mut p, &pings, &[(a, ms(10))], t0);
    drain(&mut p);
    // Data keeps going out; nothing comes back.
    let mut quiet = 0;
    let mut now = t0;
    while now < t0 + SILENCE_PROBE_AFTER + SILENCE_PROBE_WAIT {
        now += ms(50);
        p.on_data_sent(now);
        p.handle_timeout(now);
        while let Some(x) = p.poll_action() {
            quiet += usize::from(x == Action::DirectPathQuiet);
        }
    }
    assert_eq!(quiet, 1, "one request per quiet spell");
}

#[test]
fn rediscover_pings_every_candidate_again_while_untrusted() {
    let t0 = Instant::now();
    let a = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641", "203.0.113.9:41641"], t0);
    p.rediscover(t0);
    assert_eq!(p.poll_action(), None, "nothing while no data flows");
    p.on_data_sent(t0);
    let (pings, cmm, _) = drain(&mut p);
    assert_eq!((pings.len(), cmm), (2, true));
    // Half a second later the 5 s spacing would hold pings back; rediscover does not.
    let t1 = t0 + ms(500);
    p.rediscover(t1);
    let (pings, cmm, _) = drain(&mut p);
    assert_eq!((pings.len(), cmm), (2, true));
    // With a trusted direct path there is nothing to rediscover.
    answer(&mut p, &pings, &[(a, ms(10))], t1);
    drain(&mut p);
    p.rediscover(t1 + ms(20));
    assert_eq!(p.poll_action(), None);
}

/// Random inputs (endpoints, call-me-maybe, pings, pongs with loss, relay on and
/// off, data or silence) never leave a deadline in the past after `handle_timeout`,
/// never break the send rule, and keep the state bounded.
#[test]
fn timers_always_move_forward_under_random_events() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let t0 = Instant::now();
    let pool: Vec<SocketAddr> = [
        "198.51.100.2:41641",
        "203.0.113.9:41641",
        "10.0.0.5:41641",
        "[2001:db8::7]:41641",
        "[fe80::1]:41641",
        "127.0.0.1:41641",
    ]
    .iter()
    .map(|a| addr(a))
    .collect();
    for seed in 0..48u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = PathState::new(seed, t0);
        let mut now = t0;
        // Pongs on their way: (arrives at, pinged address, tx).
        let mut wire: Vec<(Instant, SocketAddr, TxId)> = Vec::new();
        for _ in 0..400 {
            // Mostly small steps; sometimes the caller is late by a lot.
            now += if rng.gen_bool(0.03) {
                Duration::from_secs(rng.gen_range(5..120))
            } else {
                ms(rng.gen_range(0..2500))
            };
            let pick = |rng: &mut StdRng| -> Vec<SocketAddr> {
                pool.iter().copied().filter(|_| rng.gen_bool(0.4)).collect()
            };
            match rng.gen_range(0..10) {
                0..=2 => {
                    p.on_data_sent(now);
                }
                3 => p.set_endpoints(&pick(&mut rng), now),
                4 => p.on_call_me_maybe(&pick(&mut rng), now),
                5 => p.on_ping(Via::Udp(pool[rng.gen_range(0..pool.len())]), rng.gen(), now),
                6 => p.on_ping(Via::Relay(region(1)), rng.gen(), now),
                7 => p.set_relay(rng.gen_bool(0.8)),
                8 => p.rediscover(now),
                _ => {}
            }
            // Deliver what has arrived, in order.
            wire.sort_by_key(|w| w.0);
            while wire.first().is_some_and(|w| w.0 <= now) {
                let (_, to, tx) = wire.remove(0);
                p.on_pong(to, tx, to, now);
            }
            if p.poll_timeout().is_some_and(|t| t <= now) {
                p.handle_timeout(now);
            } else {
                // Nothing due: running the timers anyway changes nothing.
                let before = format!("{p:?}");
                p.handle_timeout(now);
                assert_eq!(before, format!("{p:?}"), "seed {seed}: ran a timer not due");
            }
            assert!(
                p.poll_timeout().is_none_or(|t| t > now),
                "seed {seed}: deadline in the past at {:?}",
                now - t0
            );
            let targets = p.send_targets(now);
            assert!(targets.relay || targets.udp.is_some());
            let _ = p.reason(now).describe(now);
            assert!(p.candidates().len() <= MAX_CANDIDATES);
            assert!(p.outstanding.len() <= MAX_OUTSTANDING_PINGS);
            let (pings, _, _) = drain(&mut p);
            for (to, tx) in pings {
                if rng.gen_bool(0.7) {
                    wire.push((now + ms(rng.gen_range(1..80)), to, tx));
                }
            }
        }
    }
}

/// Random inputs with time advanced to exactly each deadline in turn, as the agent's
/// loop does: after `handle_timeout(now)` no timer is due at or before `now` (each due
/// one was acted on: moved past `now` or disarmed), and every timer gets its turn.
#[test]
fn each_due_deadline_is_acted_on_and_the_others_are_left_alone() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let t0 = Instant::now();
    let pool: Vec<SocketAddr> = [
        "198.51.100.2:41641",
        "203.0.113.9:41641",
        "10.0.0.5:41641",
        "[2001:db8::7]:41641",
    ]
    .iter()
    .map(|a| addr(a))
    .collect();
    let mut ran = [0usize; Timer::ALL.len()];
    for seed in 0..48u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = PathState::new(seed, t0);
        p.set_relay(true);
        p.set_endpoints(&pool[..2], t0);
        let mut now = t0;
        let mut wire: Vec<(Instant, SocketAddr, TxId)> = Vec::new();
        let mut event_at = t0;
        for _ in 0..300 {
            // Either the next deadline or the next event, whichever comes first.
            match p.poll_timeout() {
                Some(t) if t <= event_at => now = now.max(t),
                _ => {
                    now = event_at;
                    // Sometimes a long quiet spell, so that sessions go idle.
                    event_at = now
                        + if rng.gen_bool(0.1) {
                            Duration::from_secs(rng.gen_range(30..120))
                        } else {
                            ms(rng.gen_range(0..4000))
                        };
                    match rng.gen_range(0..8) {
                        0..=3 => {
                            p.on_data_sent(now);
                        }
                        4 => p.on_call_me_maybe(&pool[rng.gen_range(0..pool.len())..], now),
                        5 => {
                            p.on_ping(Via::Udp(pool[rng.gen_range(0..pool.len())]), rng.gen(), now)
                        }
                        6 => p.on_heard_direct(now),
                        _ => p.set_relay(rng.gen_bool(0.8)),
                    }
                }
            }
            wire.sort_by_key(|w| w.0);
            while wire.first().is_some_and(|w| w.0 <= now) {
                let (_, to, tx) = wire.remove(0);
                p.on_pong(to, tx, to, now);
            }
            let before: Vec<Option<Instant>> = Timer::ALL.iter().map(|t| p.deadline(*t)).collect();
            p.handle_timeout(now);
            for (i, timer) in Timer::ALL.iter().enumerate() {
                let after = p.deadline(*timer);
                assert!(
                    after.is_none_or(|t| t > now),
                    "seed {seed}: {timer:?} still due at {:?}",
                    now - t0
                );
                if before[i].is_some_and(|t| t <= now) {
                    ran[i] += 1;
                }
            }
            let (pings, _, _) = drain(&mut p);
            for (to, tx) in pings {
                if rng.gen_bool(0.6) {
                    wire.push((now + ms(rng.gen_range(1..80)), to, tx));
                }
            }
        }
    }
    // Every timer was exercised.
    for (timer, n) in Timer::ALL.iter().zip(ran) {
        assert!(n > 0, "{timer:?} never ran: {ran:?}");
    }
}

#[test]
fn status_follows_the_phase_from_idle_to_lost() {
    let t0 = Instant::now();
    let ep = addr("198.51.100.2:41641");
    let mut p = peer(&["198.51.100.2:41641"], t0);
    assert_eq!(p.reason(t0), PathReason::Idle);
    p.on_data_sent(t0);
    drain(&mut p);
    assert_eq!(p.reason(t0), PathReason::Discovering { since: t0 });
    // The ping is lost.
    let t1 = t0 + PING_TIMEOUT;
    p.handle_timeout(t1);
    assert_eq!(p.reason(t1), PathReason::PingsUnanswered { since: t1 });
    // A new one is answered.
    p.on_data_sent(t1);
    let (pings, _, _) = drain(&mut p);
    answer(&mut p, &pings, &[(ep, ms(10))], t1);
    let t2 = t1 + ms(10);
    assert_eq!(
        p.reason(t2),
        PathReason::Direct {
            addr: ep,
            latency: ms(10),
            trusted: true
        }
    );
    // Then nothing answers any more: the path is given up when a heartbeat to it is
    // lost after its trust ran out, a ping timeout after that at the latest.
    let mut now = t2;
    while let Some(t) = p.poll_timeout() {
        if p.path() == Path::Relay {
            break;
        }
        now = t;
        p.handle_timeout(now);
        drain(&mut p);
    }
    assert!(now > t2 + TRUST_UDP_ADDR && now <= t2 + TRUST_UDP_ADDR + PING_TIMEOUT);
    assert_eq!(p.reason(now), PathReason::DirectLost { at: now });
    // Without candidates the reason says so, whatever the phase.
    p.set_endpoints(&[], now);
    assert_eq!(p.reason(now), PathReason::NoEndpoints);
}
