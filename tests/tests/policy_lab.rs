//! Access control end to end in the lab: the real controld with a policy file, relayd,
//! and three agentd devices of three users. The policy lets alice reach bob on TCP 22
//! only, lets bob reach alice, and gives carol nothing: what connects, what is refused
//! and counted, who sees whom, and how fast an edited policy takes effect. Needs root;
//! skips without it (fails under CI=true).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::print_stderr)] // measured figures go to the test's output

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::scenario::{self, Device};
use tests::tailscale::{have_tailscaled, Headscale, Tailscaled};
use tests::{lab_or_skip, Host, Lab, RouterSpec};

/// The policy of this test, with bob's SSH port as a parameter (the edit changes it).
fn policy(ssh_port: u16) -> String {
    format!(
        r#"{{
  // Who may reach what. HuJSON: comments and trailing commas are fine.
  "groups": {{ "group:admins": ["alice@"], }},
  "acls": [
    // alice (an admin) may reach bob's SSH port, nothing else of his.
    {{ "action": "accept", "src": ["group:admins"], "dst": ["bob@:{ssh_port}"] }},
    // bob may reach alice on any port.
    {{ "action": "accept", "src": ["bob@"], "dst": ["alice@:*"] }},
  ],
  "tests": [
    {{ "src": "alice@", "accept": ["bob@:{ssh_port}"], "deny": ["bob@:80"] }},
    {{ "src": "carol@", "deny": ["bob@:{ssh_port}", "alice@:22"] }},
  ],
}}
"#
    )
}

/// Accepts connections on `listener` until `stop`, echoing what each sends.
fn serve_echo(listener: TcpListener, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
}

/// Whether a TCP connection from `from` to `to` opens within `wait` and echoes a line.
fn connects(lab: &Lab, from: &Host, to: SocketAddr, wait: Duration) -> bool {
    let Ok(mut s) = lab.tcp_connect(from, to, wait) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 5];
    s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
}

fn peer_names(lab: &Lab, d: &Device) -> Vec<String> {
    d.status(lab).unwrap()["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

fn write_policy(path: &Path, text: &str) {
    // Replaced in one step, as editors and config tools do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_policy_decides_who_reaches_what_and_an_edit_takes_effect_within_a_second() {
    let lab = lab_or_skip!();
    let region = scenario::start_region(&lab, 901, 5).unwrap();
    let map = scenario::write_relay_map(&lab, &[&region], &[]).unwrap();
    let policy_file = lab.log_dir().join("policy.hujson");
    write_policy(&policy_file, &policy(22));
    let policy_arg = policy_file.display().to_string();
    let mut control = scenario::start_control_with(&lab, &map, &["--policy", &policy_arg]).unwrap();
    let r = lab.add_router("r", RouterSpec::easy()).unwrap();
    let mut devs = Vec::new();
    let mut hosts = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let key = control.user_key(&lab, name, &[]).unwrap();
        let h = lab.add_lan_host(name, &r).unwrap();
        devs.push(scenario::start_agentd_with_key(&lab, &h, name, &control.url, &key).unwrap());
        hosts.push(h);
    }
    let (alice, bob, carol) = (&devs[0], &devs[1], &devs[2]);
    let (ha, hb, hc) = (&hosts[0], &hosts[1], &hosts[2]);

    // Who sees whom: alice and bob each other; carol nobody, and nobody carol.
    bob.wait_peer(&lab, "alice", Duration::from_secs(10), |_| true)
        .unwrap();
    alice
        .wait_peer(&lab, "bob", Duration::from_secs(10), |_| true)
        .unwrap();
    assert_eq!(peer_names(&lab, alice), ["bob.agentd.internal"]);
    assert_eq!(peer_names(&lab, bob), ["alice.agentd.internal"]);
    assert!(
        peer_names(&lab, carol).is_empty(),
        "{:?}",
        peer_names(&lab, carol)
    );

    // bob serves on 22 and 80, alice on 8080 (every address of the device).
    let stop = Arc::new(AtomicBool::new(false));
    for (h, port) in [(hb, 22), (hb, 80), (ha, 8080)] {
        serve_echo(
            lab.tcp_listen(h, (Ipv4Addr::UNSPECIFIED, port)).unwrap(),
            stop.clone(),
        );
    }
    let bob22 = SocketAddr::from((bob.ip, 22));
    let bob80 = SocketAddr::from((bob.ip, 80));

    // alice → bob: 22 connects (the first try may wait for the tunnel), 80 does not.
    let t0 = Instant::now();
    while !connects(&lab, ha, bob22, Duration::from_secs(2)) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "alice never reached bob:22"
        );
    }
    assert!(!connects(&lab, ha, bob80, Duration::from_secs(2)));
    let denied = bob
        .wait_peer(&lab, "alice", Duration::from_secs(5), |p| {
            p["denied"].as_u64() >= Some(1)
        })
        .unwrap()["denied"]
        .as_u64()
        .unwrap();
    eprintln!("bob counted {denied} denied packets from alice");
    let (ok, text, _) = bob.agentctl(&lab, &["status"]).unwrap();
    assert!(ok && text.contains("denied "), "{text}");
    let (ok, rules, _) = bob.agentctl(&lab, &["debug", "filter"]).unwrap();
    assert!(ok, "{rules}");
    eprintln!("bob's filter:\n{rules}");
    assert!(
        rules.contains(&format!("from {}/32", alice.ip)) && rules.contains(":22"),
        "{rules}"
    );
    assert!(rules.contains("no_rule"), "{rules}");

    // carol reaches neither: she has no peers, so nothing even leaves her device.
    assert!(!connects(&lab, hc, bob22, Duration::from_secs(1)));
    assert!(scenario::ping_once(&lab, hc, alice.ip, Duration::from_secs(1)).is_none());

    // bob's own connections out to alice get their replies through bob's filter (which
    // allows nothing from alice but port 22): TCP, ping, and a UDP exchange.
    assert!(connects(
        &lab,
        hb,
        SocketAddr::from((alice.ip, 8080)),
        Duration::from_secs(3)
    ));
    assert!(scenario::ping_once(&lab, hb, alice.ip, Duration::from_secs(2)).is_some());
    let echo = lab
        .start_udp_echo(ha, (Ipv4Addr::UNSPECIFIED, 5353))
        .unwrap();
    let sock = lab.udp_bind(hb, (Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(b"question", (alice.ip, echo.port())).unwrap();
    let mut buf = [0u8; 64];
    let (_, from) = sock.recv_from(&mut buf).expect("the UDP reply reached bob");
    assert_eq!(
        (from.ip(), &buf[..8]),
        (std::net::IpAddr::V4(alice.ip), &b"question"[..8])
    );

    // A stream from alice to bob:22 runs while the policy is edited to move alice's
    // access to port 2222.
    let mut stream = lab.tcp_connect(ha, bob22, Duration::from_secs(3)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let echoed = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let pump = {
        let (echoed, running) = (echoed.clone(), running.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while running.load(Ordering::Relaxed) {
                if stream.write_all(&[7u8; 1024]).is_err() || stream.read_exact(&mut buf).is_err() {
                    return false;
                }
                echoed.fetch_add(1024, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            true
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    write_policy(&policy_file, &policy(2222));
    let edited = Instant::now();
    // The file change is noticed by itself; SIGHUP makes it immediate.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(control.server.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    );
    let mut refused_after = None;
    while edited.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        if !connects(&lab, ha, bob22, Duration::from_millis(200)) {
            refused_after = Some(t.duration_since(edited));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused_after =
        refused_after.expect("new connections to bob:22 still open 3 s after the edit");
    eprintln!("after the edit, new connections to bob:22 refused from {refused_after:?}");
    assert!(refused_after < Duration::from_secs(1), "{refused_after:?}");
    // Refused for good, not by chance.
    for _ in 0..3 {
        assert!(!connects(&lab, ha, bob22, Duration::from_millis(500)));
    }
    // The stream that was already open is a connection bob's host accepted: as in
    // tailscaled, the filter judges new connections, so it keeps flowing.
    let before = echoed.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        echoed.load(Ordering::Relaxed) > before,
        "the open stream stopped"
    );
    running.store(false, Ordering::Relaxed);
    assert!(pump.join().unwrap(), "the open stream broke");
    control
        .server
        .wait_for_output("access policy reloaded", Duration::from_secs(2))
        .unwrap();

    // An invalid edit is refused with its line; the policy in force stays.
    write_policy(&policy_file, "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"group:nobody\"], \"dst\": [\"*:*\"]}\n  ]\n}\n");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(control.server.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    );
    let log = control
        .server
        .wait_for_output("refused", Duration::from_secs(3))
        .unwrap();
    let line = log.lines().rev().find(|l| l.contains("refused")).unwrap();
    assert!(
        line.contains("line 3") && line.contains("group:nobody"),
        "{line}"
    );
    assert!(!connects(&lab, ha, bob22, Duration::from_millis(500)));
    stop.store(true, Ordering::Relaxed);
}

/// The three users' devices: agentd for alice and carol, and for bob either agentd or
/// Tailscale's tailscaled; what must hold under [`policy`] with port 22 is the same.
fn check_alice_bob_carol(
    lab: &Lab,
    alice: (&Host, &Device),
    bob: (&Host, Ipv4Addr),
    carol: (&Host, &Device),
) {
    let stop = Arc::new(AtomicBool::new(false));
    for port in [22, 80] {
        serve_echo(
            lab.tcp_listen(bob.0, (Ipv4Addr::UNSPECIFIED, port))
                .unwrap(),
            stop.clone(),
        );
    }
    let (bob22, bob80) = (SocketAddr::from((bob.1, 22)), SocketAddr::from((bob.1, 80)));
    let t0 = Instant::now();
    while !connects(lab, alice.0, bob22, Duration::from_secs(2)) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "alice never reached bob:22"
        );
    }
    assert!(
        !connects(lab, alice.0, bob80, Duration::from_secs(2)),
        "alice reached bob:80"
    );
    assert!(
        peer_names(lab, carol.1).is_empty(),
        "{:?}",
        peer_names(lab, carol.1)
    );
    assert!(!connects(lab, carol.0, bob22, Duration::from_secs(1)));
    let names = peer_names(lab, alice.1);
    assert!(names.len() == 1 && names[0].starts_with("bob"), "{names:?}");
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn agentd_on_headscale_is_held_to_headscales_compilation_of_the_same_policy() {
    let lab = lab_or_skip!();
    let region = scenario::start_region(&lab, 901, 5).unwrap();
    let policy_file = lab.log_dir().join("policy.hujson");
    write_policy(&policy_file, &policy(22));
    let Some(hs) = Headscale::start(&lab, &region, Some(&policy_file)).unwrap() else {
        return;
    };
    let r = lab.add_router("r", RouterSpec::easy()).unwrap();
    let mut devs = Vec::new();
    let mut hosts = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let key = hs.user_key(&lab, name).unwrap();
        let h = lab.add_lan_host(name, &r).unwrap();
        devs.push(scenario::start_agentd_with_key(&lab, &h, name, &hs.control.url, &key).unwrap());
        hosts.push(h);
    }
    devs[0]
        .wait_peer(&lab, "bob", Duration::from_secs(15), |_| true)
        .unwrap();
    check_alice_bob_carol(
        &lab,
        (&hosts[0], &devs[0]),
        (&hosts[1], devs[1].ip),
        (&hosts[2], &devs[2]),
    );
    // bob's agentd enforced Headscale's filter: it counted alice's refused SYNs.
    let p = devs[1]
        .wait_peer(&lab, "alice", Duration::from_secs(5), |p| {
            p["denied"].as_u64() >= Some(1)
        })
        .unwrap();
    eprintln!(
        "bob (agentd on Headscale) denied {} packets from alice",
        p["denied"]
    );
}

#[test]
fn tailscaled_on_controld_is_held_to_controlds_filter() {
    let lab = lab_or_skip!();
    if !have_tailscaled() {
        return;
    }
    let region = scenario::start_region(&lab, 901, 5).unwrap();
    let map = scenario::write_relay_map(&lab, &[&region], &[]).unwrap();
    let policy_file = lab.log_dir().join("policy.hujson");
    write_policy(&policy_file, &policy(22));
    let policy_arg = policy_file.display().to_string();
    let control = scenario::start_control_with(&lab, &map, &["--policy", &policy_arg]).unwrap();
    let r = lab.add_router("r", RouterSpec::easy()).unwrap();
    let (ha, hb, hc) = (
        lab.add_lan_host("alice", &r).unwrap(),
        lab.add_lan_host("bob", &r).unwrap(),
        lab.add_lan_host("carol", &r).unwrap(),
    );
    let key = |u: &str| control.user_key(&lab, u, &[]).unwrap();
    let alice =
        scenario::start_agentd_with_key(&lab, &ha, "alice", &control.url, &key("alice")).unwrap();
    let bob = Tailscaled::start_with_key(&lab, &hb, "bob", &control.url, &key("bob")).unwrap();
    let carol =
        scenario::start_agentd_with_key(&lab, &hc, "carol", &control.url, &key("carol")).unwrap();
    alice
        .wait_peer(&lab, "bob", Duration::from_secs(15), |_| true)
        .unwrap();
    // tailscaled (userspace networking) hands connections to its address to local ports:
    // what reaches bob's listeners passed tailscaled's own filter, compiled by controld.
    check_alice_bob_carol(&lab, (&ha, &alice), (&hb, bob.ip), (&hc, &carol));
    // tailscaled was shown alice (who may reach it) and not carol.
    assert_eq!(bob.peer_names(&lab).unwrap(), ["alice"]);
}
