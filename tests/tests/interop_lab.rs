//! Interop in the lab with Tailscale's own client (pinned v1.102.3, built by `.ci/run`
//! with `go install` into a cache outside the repository): `tailscaled` in userspace
//! networking mode with its state in memory, one per namespace, behind NAT routers.
//!
//! - two tailscaled log in to our controld with a pre-auth key, relay through our relayd,
//!   and `tailscale ping` reaches the other first through the relay, then directly;
//! - agentd and tailscaled on our controld: ping through the tunnel both ways, disco from
//!   tailscaled to agentd ends on a direct path;
//! - agentd registered with Headscale reaches a tailscaled peer through our relayd;
//! - Tailscale's derper answers our STUN request (our DERP client against derper is in
//!   `relay/tests/interop_tailscale.rs`).
//!
//! The binaries are looked up in `$AGENTD_TAILSCALE_BIN`, else
//! `~/.cache/agentd-interop/bin`. Without them (or without root) the tests skip on a
//! developer machine and fail under `CI=true`.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tests::scenario::{self, ping_once};
use tests::tailscale::{have_tailscaled, tool as tailscale_bin, Headscale, Tailscaled};
use tests::{lab_or_skip, Host, RouterSpec};

#[test]
fn two_tailscaled_on_our_controld_and_relayd_ping_via_relay_then_direct() {
    let lab = lab_or_skip!();
    if !have_tailscaled() {
        return;
    }
    let (_region, control) = scenario::one_region_and_control(&lab).unwrap();
    let ra = lab.add_router("ra", RouterSpec::easy()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    let ha = lab.add_lan_host("ta", &ra).unwrap();
    let hb = lab.add_lan_host("tb", &rb).unwrap();
    let a = Tailscaled::start(&lab, &ha, "ta", &control).unwrap();
    let b = Tailscaled::start(&lab, &hb, "tb", &control).unwrap();

    // Each lists the other.
    assert_eq!(a.peer_names(&lab).unwrap(), ["tb"]);
    assert_eq!(b.peer_names(&lab).unwrap(), ["ta"]);

    let (ok, out) = a.ping_until_direct(&lab, b.ip).unwrap();
    assert!(ok, "tailscale ping found no direct path:\n{out}");
    eprintln!("tailscale ping tb:\n{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("pong")).collect();
    assert!(lines.first().unwrap().contains("via DERP(r901)"), "{out}");
    assert!(
        lines
            .last()
            .unwrap()
            .contains(&format!("via {}:", rb.wan_ip)),
        "{out}"
    );
}

/// agentd (alice) and tailscaled (tb) on our controld, each behind a router of `spec`:
/// tailscaled's disco pings end in a direct pong, traffic flows through the tunnel, and
/// agentd lists tailscaled as direct. Over IPv6 when `v6` (the routers must route it),
/// else over the routers' public IPv4 addresses.
fn agentd_and_tailscaled_go_direct(spec: RouterSpec, v6: bool) {
    let lab = lab_or_skip!();
    if !have_tailscaled() {
        return;
    }
    let (_region, control) = scenario::one_region_and_control(&lab).unwrap();
    let ra = lab.add_router("ra", spec.clone()).unwrap();
    let rb = lab.add_router("rb", spec).unwrap();
    let ha = lab.add_lan_host("alice", &ra).unwrap();
    let hb = lab.add_lan_host("tb", &rb).unwrap();
    // Where each side should see the other.
    let (alice_at, tb_at) = if v6 {
        (
            format!("[{}]:", ha.ip6.unwrap()),
            format!("[{}]:", hb.ip6.unwrap()),
        )
    } else {
        (format!("{}:", ra.wan_ip), format!("{}:", rb.wan_ip))
    };
    let a = scenario::start_agentd(&lab, &ha, "alice", &control).unwrap();
    let b = Tailscaled::start(&lab, &hb, "tb", &control).unwrap();

    // Disco from tailscaled to agentd: relayed pongs, then a direct one.
    let (ok, out) = b.ping_until_direct(&lab, a.ip).unwrap();
    assert!(ok, "tailscale ping found no direct path:\n{out}");
    eprintln!("tailscale ping alice:\n{out}");
    assert!(
        out.lines()
            .rfind(|l| l.starts_with("pong"))
            .unwrap()
            .contains(&format!("via {alice_at}")),
        "{out}"
    );

    // Traffic through the tunnel: ICMP from agentd's side to tailscaled's netstack and
    // back.
    scenario::wait_for_ping(&lab, &ha, b.ip, Duration::from_secs(10)).unwrap();
    for _ in 0..3 {
        assert!(ping_once(&lab, &ha, b.ip, Duration::from_secs(1)).is_some());
    }
    // And from tailscaled's side: an ICMP echo through the tunnel, answered by alice's
    // kernel behind agentd's TUN device.
    let (ok, out) = b
        .run(
            &lab,
            &[
                "ping",
                "--icmp",
                "--c",
                "5",
                "--timeout",
                "2s",
                &a.ip.to_string(),
            ],
        )
        .unwrap();
    assert!(
        ok && out.contains(&format!("pong from alice ({})", a.ip)),
        "tailscale ping --icmp alice:\n{out}"
    );
    assert_eq!(b.peer_names(&lab).unwrap(), ["alice"]);
    // agentd sees tailscaled as a direct peer, at the address expected.
    let peer = a
        .peer(&lab, "tb")
        .unwrap()
        .expect("agentd lists tailscaled");
    assert_eq!(peer["path"], "direct", "{peer:#}");
    assert!(
        peer["direct"]
            .as_str()
            .is_some_and(|d| d.starts_with(&tb_at)),
        "{peer:#}"
    );
}

#[test]
fn agentd_and_tailscaled_on_our_controld_reach_each_other_directly() {
    agentd_and_tailscaled_go_direct(RouterSpec::easy(), false);
}

#[test]
fn agentd_and_tailscaled_behind_hard_nats_go_direct_over_ipv6() {
    // IPv4 behind symmetric NATs (no direct IPv4 path), IPv6 routed behind stateful
    // firewalls: the only direct path is IPv6, found by both programs' disco together.
    agentd_and_tailscaled_go_direct(RouterSpec::hard().with_ipv6(true), true);
}

/// Headscale (pinned, built by `.ci/run`) on its own server in the lab, with our relayd's
/// region as its relay map, a user and a reusable pre-auth key. Returned as a [`Control`]
/// so agentd and tailscaled join it the same way they join controld.
#[test]
fn agentd_on_headscale_reaches_a_tailscaled_peer_through_our_relay() {
    let lab = lab_or_skip!();
    if !have_tailscaled() {
        return;
    }
    let region = scenario::start_region(&lab, 901, 10).unwrap();
    let Some(hs) = Headscale::start(&lab, &region, None).unwrap() else {
        return;
    };
    // Hard NATs on both sides: the traffic has to go through the relay.
    let ra = lab.add_router("ra", RouterSpec::hard()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::hard()).unwrap();
    let ha = lab.add_lan_host("alice", &ra).unwrap();
    let hb = lab.add_lan_host("tb", &rb).unwrap();
    let a = scenario::start_agentd(&lab, &ha, "alice", &hs.control).unwrap();
    let b = Tailscaled::start(&lab, &hb, "tb", &hs.control).unwrap();

    scenario::wait_for_ping(&lab, &ha, b.ip, Duration::from_secs(20)).unwrap();
    for _ in 0..3 {
        assert!(ping_once(&lab, &ha, b.ip, Duration::from_secs(1)).is_some());
    }
    let peer = a
        .peer(&lab, "tb")
        .unwrap()
        .expect("agentd lists tailscaled");
    assert_eq!(peer["path"], "relay", "{peer:#}");
    assert_eq!(peer["relay_region"], 901, "{peer:#}");
    // And tailscaled lists agentd.
    let (ok, status) = b.run(&lab, &["status"]).unwrap();
    assert!(ok && status.contains("alice"), "{status}");
}

#[test]
fn tailscale_derper_answers_our_stun_request_with_the_nat_address() {
    let lab = lab_or_skip!();
    let Some(derper) = tailscale_bin("derper") else {
        return;
    };
    let server = lab.add_server("derper").unwrap();
    let dir = lab.log_dir().join("derper");
    std::fs::create_dir_all(&dir).unwrap();
    let _derper = lab
        .spawn(
            &server,
            derper,
            [
                "-a".to_string(),
                format!("{}:3340", server.ip),
                "--http-port=-1".into(),
                "--stun=true".into(),
                "--stun-port=3478".into(),
                "-c".into(),
                dir.join("derper.key").display().to_string(),
                "--mesh-psk-file=".into(),
            ],
        )
        .unwrap();
    // Our STUN request (Tailscale's form: derper answers no other) from a host behind a
    // NAT: derper reports the router's address, and our parser reads its answer.
    let router = lab.add_router("r", RouterSpec::easy()).unwrap();
    let host = lab.add_lan_host("h", &router).unwrap();
    let sock = lab.udp_bind(&host, (host.ip, 40000)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let to = std::net::SocketAddr::from((server.ip, 3478));
    let t0 = Instant::now();
    let seen = loop {
        let tx = netcheck::stun::new_tx_id();
        sock.send_to(&netcheck::stun::request(tx), to).unwrap();
        let mut buf = [0u8; 1500];
        if let Ok((n, from)) = tests::recv_from(&sock, &mut buf) {
            assert_eq!(from, to);
            let (got_tx, addr) = netcheck::stun::parse_response(&buf[..n]).unwrap();
            assert_eq!(got_tx, tx);
            break addr;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no STUN answer from derper"
        );
    };
    assert_eq!(seen, std::net::SocketAddr::from((router.wan_ip, 40000)));
}

#[test]
fn tailscale_derpprobe_passes_every_probe_against_two_meshed_relayd() {
    let lab = lab_or_skip!(requires: ["unshare", "mount"]);
    let Some(derpprobe) = tailscale_bin("derpprobe") else {
        return;
    };
    // Two relayd nodes of one region on TLS (one certificate naming both), meshed with a
    // shared key.
    let ha = lab.add_server("relay901a").unwrap();
    let hb = lab.add_server("relay901b").unwrap();
    let names = ["relay901a".to_string(), "relay901b".to_string()];
    let (cert, key) = scenario::write_cert(&lab, "region901", &names).unwrap();
    let psk = lab.log_dir().join("mesh.key");
    std::fs::write(&psk, "ab".repeat(32)).unwrap();
    let mesh = |other: &str, ip: Ipv4Addr| scenario::mesh_flags(other, ip, &psk, &cert);
    let mut ra = scenario::start_relayd_with(
        &lab,
        &ha,
        "relay901a",
        &cert,
        &key,
        &mesh("relay901b", hb.ip),
    )
    .unwrap();
    let mut rb = scenario::start_relayd_with(
        &lab,
        &hb,
        "relay901b",
        &cert,
        &key,
        &mesh("relay901a", ha.ip),
    )
    .unwrap();
    for r in [&mut ra, &mut rb] {
        r.wait_for_output("mesh link up", Duration::from_secs(15))
            .unwrap();
    }

    let node = |n: &str, host: &str, h: &Host| {
        serde_json::json!({
            "Name": n, "RegionID": 901, "HostName": host, "IPv4": h.ip.to_string(),
        })
    };
    let map = serde_json::json!({ "Regions": { "901": {
        "RegionID": 901, "RegionCode": "r901", "RegionName": "Region 901",
        "Nodes": [node("901a", "relay901a", &ha), node("901b", "relay901b", &hb)],
    }}});
    let map_path = lab.log_dir().join("probe-map.json");
    std::fs::write(&map_path, map.to_string()).unwrap();

    // derpprobe on a host of the internet. It needs the relays' names: a hosts file bound
    // over /etc/hosts in a private mount namespace (nothing outside it changes), and our
    // certificate trusted through SSL_CERT_FILE.
    let hosts = lab.log_dir().join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "127.0.0.1 localhost\n{} relay901a\n{} relay901b\n",
            ha.ip, hb.ip
        ),
    )
    .unwrap();
    let prober = lab.add_public_host("prober").unwrap();
    let script = format!(
        "mount --bind '{}' /etc/hosts && exec '{}' --derp-map 'file://{}' --once --spread=false",
        hosts.display(),
        derpprobe.display(),
        map_path.display()
    );
    let mut cmd = lab.command(&prober, "unshare");
    cmd.env("SSL_CERT_FILE", &cert)
        .args(["--mount", "sh", "-c", &script])
        .current_dir(lab.log_dir())
        .stdin(std::process::Stdio::null());
    let out = cmd.output().unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("derpprobe:\n{log}");
    for probe in [
        "derp/r901/901a/tls",
        "derp/r901/901b/tls",
        "derp/r901/901a/udp",
        "derp/r901/901b/udp",
        "derp/r901/901a/901a/mesh",
        "derp/r901/901a/901b/mesh",
        "derp/r901/901b/901a/mesh",
        "derp/r901/901b/901b/mesh",
    ] {
        assert!(
            log.contains(&format!("good: {probe}:")),
            "{probe} did not pass:\n{log}"
        );
    }
    let bad: Vec<&str> = log.lines().filter(|l| l.contains("bad: ")).collect();
    assert!(bad.is_empty(), "probes failed:\n{log}");
}
