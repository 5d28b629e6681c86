//! agentctl against real agentd in the lab: `status` shows each peer's path (direct, or
//! relay with the reason), `--json` parses, `ip`/`whois`/`version` answer, and a daemon
//! that is not running gets a one-line error. Needs root; skips without it (fails under
//! CI=true).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::print_stderr)] // the status tables go to the test's output

use std::time::Duration;

use serde_json::Value;
use tests::scenario::{self, ping_once, Device};
use tests::{lab_or_skip, Host, Lab, Router, RouterSpec};

/// Alice behind an easy NAT, bob behind another (direct to alice) and carol behind a hard
/// one (relayed), all on one region and controld.
struct Three {
    ha: Host,
    hb: Host,
    ra: Router,
    rb: Router,
    a: Device,
    b: Device,
    c: Device,
    /// Relay and controld: bind it (not to `_`) to keep them running.
    world: (scenario::Region, scenario::Control),
}

fn three(lab: &Lab) -> Three {
    let world = scenario::one_region_and_control(lab).unwrap();
    let ra = lab.add_router("ra", RouterSpec::easy()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    let rc = lab.add_router("rc", RouterSpec::hard()).unwrap();
    let ha = lab.add_lan_host("alice", &ra).unwrap();
    let hb = lab.add_lan_host("bob", &rb).unwrap();
    let hc = lab.add_lan_host("carol", &rc).unwrap();
    let a = scenario::start_agentd(lab, &ha, "alice", &world.1).unwrap();
    let b = scenario::start_agentd(lab, &hb, "bob", &world.1).unwrap();
    let c = scenario::start_agentd(lab, &hc, "carol", &world.1).unwrap();
    Three {
        ha,
        hb,
        ra,
        rb,
        a,
        b,
        c,
        world,
    }
}

#[test]
fn status_shows_direct_and_relayed_peers_with_the_reason() {
    let lab = lab_or_skip!();
    let Three {
        ha,
        ra,
        rb,
        a,
        b,
        c,
        world: _world,
        ..
    } = three(&lab);
    // Alice talks to bob (direct) and carol (relayed).
    for ip in [b.ip, c.ip] {
        scenario::wait_for_ping(&lab, &ha, ip, Duration::from_secs(10)).unwrap();
    }
    for _ in 0..3 {
        ping_once(&lab, &ha, c.ip, Duration::from_secs(1));
    }

    let pb = a
        .wait_peer(&lab, "bob", Duration::from_secs(5), |p| {
            p["path"] == "direct"
        })
        .unwrap();
    assert!(
        pb["direct"]
            .as_str()
            .unwrap()
            .starts_with(&rb.wan_ip.to_string()),
        "{pb:#}"
    );
    assert!(pb["last_handshake_secs"].as_f64().is_some(), "{pb:#}");
    assert!(pb["tx_bytes"].as_u64().unwrap() > 0, "{pb:#}");
    assert_eq!(pb["os"], "linux", "{pb:#}");
    let pc = a
        .wait_peer(&lab, "carol", Duration::from_secs(5), |p| {
            p["path"] == "relay"
                && p["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("unanswered"))
        })
        .unwrap();
    assert_eq!(pc["relay_region"], 901, "{pc:#}");

    let s = a.status(&lab).unwrap();
    assert_eq!(s["state"], "Running", "{s:#}");
    assert_eq!(s["control_connected"], true, "{s:#}");
    assert_eq!(s["self"]["home_region"], 901, "{s:#}");
    assert!(
        s["self"]["home_latency_ms"].as_f64().unwrap() > 15.0,
        "{s:#}"
    );

    // The table a person reads.
    let (ok, table, err) = a.agentctl(&lab, &["status"]).unwrap();
    assert!(ok, "{err}");
    eprintln!("alice's agentctl status:\n{table}");
    assert!(table.contains(&format!("direct {}:", rb.wan_ip)), "{table}");
    assert!(table.contains("relay \"Region 901\""), "{table}");
    assert!(table.contains("pings unanswered"), "{table}");
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .contains("home relay: Region 901"),
        "{table}"
    );

    // ip, whois, version.
    let (ok, out, _) = a.agentctl(&lab, &["ip", "-4"]).unwrap();
    assert!(ok);
    assert_eq!(out.trim(), a.ip.to_string());
    let (ok, out, _) = a
        .agentctl(&lab, &["whois", &b.ip.to_string(), "--json"])
        .unwrap();
    assert!(ok);
    let w: Value = serde_json::from_str(&out).unwrap();
    assert!(w["name"].as_str().unwrap().starts_with("bob"), "{w:#}");
    let (ok, _, err) = a.agentctl(&lab, &["whois", "100.64.0.99"]).unwrap();
    assert!(!ok);
    assert!(err.contains("no peer has the address 100.64.0.99"), "{err}");
    let (ok, out, _) = a.agentctl(&lab, &["version", "--json"]).unwrap();
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["agentd"], v["agentctl"], "{v:#}");

    // A user who is neither root nor in the agentd group: one line saying what to do.
    if tests::have_program("runuser") {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ctl = dir.path().join("agentctl");
        std::fs::copy(tests::process::agentctl().unwrap(), &ctl).unwrap();
        std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = a.socket.display().to_string();
        let out = lab
            .exec(
                &ha,
                "runuser",
                [
                    "-u",
                    "nobody",
                    "--",
                    ctl.to_str().unwrap(),
                    "--socket",
                    &sock,
                    "status",
                ],
            )
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("permission denied") && err.contains("agentd` group"),
            "{err}"
        );
    }

    // netcheck through the daemon: a fresh report from agentd's own socket.
    let (ok, out, err) = a.agentctl(&lab, &["netcheck"]).unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("* Nearest relay: Region 901"), "{out}");
    assert!(
        out.contains(&format!("* IPv4: yes, {}:41641", ra.wan_ip)),
        "{out}"
    );
    let (ok, out, err) = a.agentctl(&lab, &["netcheck", "--json"]).unwrap();
    assert!(ok, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["PreferredDERP"], 901, "{r:#}");
}

#[test]
fn agentctl_without_a_daemon_says_so_in_one_line() {
    let lab = lab_or_skip!();
    let h = lab.add_public_host("h").unwrap();
    let sock = lab.log_dir().join("nobody.sock");
    let out = lab
        .exec(
            &h,
            tests::process::agentctl().unwrap(),
            ["--socket", &sock.display().to_string(), "status"],
        )
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("agentd is not running"), "{err}");
    // A stale socket file (a crashed daemon's) reads the same.
    std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let out = lab
        .exec(
            &h,
            tests::process::agentctl().unwrap(),
            ["--socket", &sock.display().to_string(), "status"],
        )
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("agentd is not running"));
}

#[test]
fn ping_reports_relay_pongs_then_a_direct_one() {
    let lab = lab_or_skip!();
    let Three {
        rb,
        a,
        b: _b,
        c: _c,
        world: _world,
        ..
    } = three(&lab);
    // Both peers known to alice, with their home relay, before the first ping.
    a.wait_peer(&lab, "bob", Duration::from_secs(10), |p| {
        p["relay_region"] == 901
    })
    .unwrap();
    a.wait_peer(&lab, "carol", Duration::from_secs(10), |p| {
        p["relay_region"] == 901
    })
    .unwrap();

    // No traffic yet: the first pong comes through the relay, then a direct one ends it.
    let (ok, out, err) = a.agentctl(&lab, &["ping", "bob", "--count", "10"]).unwrap();
    eprintln!("agentctl ping bob:\n{out}{err}");
    assert!(ok, "no direct pong: {out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("via relay \"Region 901\""), "{out}");
    let last = lines.last().unwrap();
    assert!(last.contains(&format!("via {}:", rb.wan_ip)), "{out}");
    assert!(
        lines.iter().filter(|l| !l.contains("via relay")).count() == 1,
        "{out}"
    );

    // Carol is behind a hard NAT: relayed pongs only, and a non-zero exit.
    let (ok, out, err) = a
        .agentctl(&lab, &["ping", "carol", "--count", "3", "--json"])
        .unwrap();
    assert!(!ok, "{out}");
    assert!(err.contains("direct connection not established"), "{err}");
    assert!(out.lines().count() >= 1, "no pong at all: {out}{err}");
    for l in out.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["via"], "relay", "{out}");
    }

    // An unknown peer: one line, non-zero.
    let (ok, _, err) = a.agentctl(&lab, &["ping", "nobody"]).unwrap();
    assert!(!ok);
    assert!(
        err.contains("no peer named or addressed \"nobody\""),
        "{err}"
    );
}

#[test]
fn down_disconnects_and_up_reconnects() {
    let lab = lab_or_skip!();
    let Three {
        ha,
        hb,
        a,
        b,
        world: _world,
        ..
    } = three(&lab);
    scenario::wait_for_ping(&lab, &ha, b.ip, Duration::from_secs(10)).unwrap();

    let (ok, out, err) = a.agentctl(&lab, &["down"]).unwrap();
    assert!(ok, "{out}{err}");
    let s = a.status(&lab).unwrap();
    assert_eq!(s["state"], "Stopped", "{s:#}");
    assert!(s["peers"].as_array().unwrap().is_empty(), "{s:#}");
    // The tunnel device is gone, and bob hears from control that alice went offline.
    assert!(!lab
        .exec(&ha, "ip", ["link", "show", "agentd0"])
        .unwrap()
        .status
        .success());
    b.wait_peer(&lab, "alice", Duration::from_secs(5), |p| {
        p["online"] == false
    })
    .unwrap();
    assert!(ping_once(&lab, &hb, a.ip, Duration::from_secs(1)).is_none());

    let (ok, out, err) = a.agentctl(&lab, &["up"]).unwrap();
    assert!(ok, "{out}{err}");
    scenario::wait_for_ping(&lab, &ha, b.ip, Duration::from_secs(10)).unwrap();
    assert_eq!(a.status(&lab).unwrap()["state"], "Running");
    b.wait_peer(&lab, "alice", Duration::from_secs(5), |p| {
        p["online"] == true
    })
    .unwrap();
}
