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
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tests::scenario::{self, ping_once, Control};
use tests::{lab_or_skip, ChildGuard, Host, Lab, RouterSpec};

fn tailscale_bin(name: &str) -> Option<PathBuf> {
    tests::interop::tool(name)
}

/// Whether tailscaled and its CLI are here (`tool` fails the test under CI=true when
/// they should be and are not).
fn have_tailscaled() -> bool {
    tailscale_bin("tailscaled").is_some() && tailscale_bin("tailscale").is_some()
}

/// A tailscaled in `host`, logged in to `control`.
struct Tailscaled {
    host: Host,
    cli: PathBuf,
    socket: String,
    ip: Ipv4Addr,
    _daemon: ChildGuard,
}

impl Tailscaled {
    fn start(lab: &Lab, host: &Host, name: &str, control: &Control) -> Tailscaled {
        let daemon_bin = tailscale_bin("tailscaled").unwrap();
        let cli = tailscale_bin("tailscale").unwrap();
        let dir = lab.log_dir().join(format!("{name}-tailscaled"));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("tailscaled.sock").display().to_string();
        let daemon = lab
            .spawn(
                host,
                daemon_bin,
                [
                    "--tun=userspace-networking".to_string(),
                    "--state=mem:".to_string(),
                    format!("--statedir={}", dir.display()),
                    format!("--socket={socket}"),
                    "--port=41641".to_string(),
                    "--no-logs-no-support".to_string(),
                ],
            )
            .unwrap();
        let t0 = Instant::now();
        while !std::path::Path::new(&socket).exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "tailscaled did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = lab
            .exec(
                host,
                &cli,
                [
                    format!("--socket={socket}"),
                    "up".into(),
                    format!("--login-server={}", control.url),
                    format!("--auth-key={}", control.auth_key),
                    format!("--hostname={name}"),
                    "--accept-dns=false".into(),
                    "--timeout=30s".into(),
                ],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "tailscale up: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ip = lab
            .exec_ok(
                host,
                &cli,
                [format!("--socket={socket}"), "ip".into(), "-4".into()],
            )
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Tailscaled {
            host: host.clone(),
            cli,
            socket,
            ip,
            _daemon: daemon,
        }
    }

    /// Runs `tailscale ARGS`; returns (success, stdout + stderr).
    fn run(&self, lab: &Lab, args: &[&str]) -> (bool, String) {
        let mut all = vec![format!("--socket={}", self.socket)];
        all.extend(args.iter().map(|s| s.to_string()));
        let out = lab.exec(&self.host, &self.cli, all).unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// The host names `tailscale status --json` lists as peers.
    fn peer_names(&self, lab: &Lab) -> Vec<String> {
        let (ok, out) = self.run(lab, &["status", "--json"]);
        assert!(ok, "tailscale status --json: {out}");
        let status: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("tailscale status --json: {e}: {out}"));
        status["Peer"]
            .as_object()
            .map(|peers| {
                peers
                    .values()
                    .filter_map(|p| p["HostName"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `tailscale ping` until a direct pong (at most 20 pings); returns its output.
    fn ping_until_direct(&self, lab: &Lab, ip: Ipv4Addr) -> String {
        let (ok, out) = self.run(
            lab,
            &["ping", "--c", "20", "--timeout", "3s", &ip.to_string()],
        );
        assert!(ok, "tailscale ping {ip} found no direct path:\n{out}");
        out
    }
}

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
    let a = Tailscaled::start(&lab, &ha, "ta", &control);
    let b = Tailscaled::start(&lab, &hb, "tb", &control);

    // Each lists the other.
    assert_eq!(a.peer_names(&lab), ["tb"]);
    assert_eq!(b.peer_names(&lab), ["ta"]);

    let out = a.ping_until_direct(&lab, b.ip);
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
    let b = Tailscaled::start(&lab, &hb, "tb", &control);

    // Disco from tailscaled to agentd: relayed pongs, then a direct one.
    let out = b.ping_until_direct(&lab, a.ip);
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
    let (ok, out) = b.run(
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
    );
    assert!(
        ok && out.contains(&format!("pong from alice ({})", a.ip)),
        "tailscale ping --icmp alice:\n{out}"
    );
    assert_eq!(b.peer_names(&lab), ["alice"]);
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
fn start_headscale(lab: &Lab, region: &scenario::Region) -> Option<Control> {
    let bin = tailscale_bin("headscale")?;
    let host = lab.add_server("headscale").unwrap();
    let dir = lab.log_dir().join("headscale");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    std::fs::write(
        dir.join("derp.yaml"),
        format!(
            "regions:\n  {id}:\n    regionid: {id}\n    regioncode: r{id}\n    regionname: Region {id}\n    nodes:\n      - name: {id}a\n        regionid: {id}\n        hostname: relay{id}\n        ipv4: {ip}\n        ipv6: none\n        insecurefortests: true\n",
            id = region.id,
            ip = region.host.ip
        ),
    )
    .unwrap();
    let ip = host.ip;
    let config = format!(
        "server_url: http://{ip}:8080\nlisten_addr: {ip}:8080\n\
         metrics_listen_addr: {ip}:9090\ngrpc_listen_addr: {ip}:50443\n\
         noise:\n  private_key_path: {d}/noise_private.key\n\
         prefixes:\n  v4: 100.64.0.0/10\n  v6: fd7a:115c:a1e0::/48\n\
         derp:\n  server:\n    enabled: false\n  urls: []\n  paths:\n    - {d}/derp.yaml\n  auto_update_enabled: false\n\
         disable_check_updates: true\n\
         database:\n  type: sqlite\n  sqlite:\n    path: {d}/db.sqlite\n\
         dns:\n  magic_dns: false\n  base_domain: example.com\n  override_local_dns: false\n  nameservers:\n    global: []\n\
         unix_socket: {d}/headscale.sock\nunix_socket_permission: \"0770\"\n"
    );
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, config).unwrap();
    let cfg = cfg.display().to_string();
    let server = lab.spawn(&host, &bin, ["serve", "-c", &cfg]).unwrap();
    let cli = |args: &[&str]| -> Option<serde_json::Value> {
        let mut all = vec!["-c", cfg.as_str(), "-o", "json"];
        all.extend_from_slice(args);
        let out = lab.exec(&host, &bin, all).ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    };
    // The CLI works once the server listens on its socket.
    let t0 = Instant::now();
    let user = loop {
        if let Some(u) = cli(&["users", "create", "lab"]) {
            break u;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "headscale did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let user_id = user["id"].as_u64().unwrap().to_string();
    let key = cli(&["preauthkeys", "create", "--user", &user_id, "--reusable"]).unwrap();
    Some(Control {
        host,
        url: format!("http://{ip}:8080"),
        db: dir.join("db.sqlite"),
        auth_key: key["key"].as_str().unwrap().to_string(),
        server,
    })
}

#[test]
fn agentd_on_headscale_reaches_a_tailscaled_peer_through_our_relay() {
    let lab = lab_or_skip!();
    if !have_tailscaled() {
        return;
    }
    let region = scenario::start_region(&lab, 901, 10).unwrap();
    let Some(hs) = start_headscale(&lab, &region) else {
        return;
    };
    // Hard NATs on both sides: the traffic has to go through the relay.
    let ra = lab.add_router("ra", RouterSpec::hard()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::hard()).unwrap();
    let ha = lab.add_lan_host("alice", &ra).unwrap();
    let hb = lab.add_lan_host("tb", &rb).unwrap();
    let a = scenario::start_agentd(&lab, &ha, "alice", &hs).unwrap();
    let b = Tailscaled::start(&lab, &hb, "tb", &hs);

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
    let (ok, status) = b.run(&lab, &["status"]);
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
