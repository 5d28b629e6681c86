//! Interop in the lab with Tailscale's own client (pinned v1.102.3, built by `.ci/run`
//! with `go install` into a cache outside the repository): `tailscaled` in userspace
//! networking mode with its state in memory, one per namespace, behind NAT routers.
//!
//! - two tailscaled log in to our controld with a pre-auth key, relay through our relayd,
//!   and `tailscale ping` reaches the other first through the relay, then directly;
//! - agentd and tailscaled on our controld: ping through the tunnel both ways, disco from
//!   tailscaled to agentd ends on a direct path.
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
    let dir = std::env::var_os("AGENTD_TAILSCALE_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/agentd-interop/bin"))
        })?;
    let p = dir.join(name);
    if p.is_file() {
        return Some(p);
    }
    assert!(
        !tests::in_ci(),
        "{name} not found in {}: .ci/run installs it with `go install tailscale.com/cmd/{name}@v1.102.3`",
        dir.display()
    );
    eprintln!("SKIPPED (not CI): {name} not installed (see .ci/run)");
    None
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

/// Relay region 901 (relayd) and controld, as in the other lab tests.
fn world(lab: &Lab) -> (scenario::Region, Control) {
    let near = scenario::start_region(lab, 901, 10).unwrap();
    let map = scenario::write_relay_map(lab, &[&near], &[]).unwrap();
    let control = scenario::start_control(lab, &map).unwrap();
    (near, control)
}

#[test]
fn two_tailscaled_on_our_controld_and_relayd_ping_via_relay_then_direct() {
    let lab = lab_or_skip!();
    if tailscale_bin("tailscaled").is_none() || tailscale_bin("tailscale").is_none() {
        return;
    }
    let (_region, control) = world(&lab);
    let ra = lab.add_router("ra", RouterSpec::easy()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    let ha = lab.add_lan_host("ta", &ra).unwrap();
    let hb = lab.add_lan_host("tb", &rb).unwrap();
    let a = Tailscaled::start(&lab, &ha, "ta", &control);
    let b = Tailscaled::start(&lab, &hb, "tb", &control);

    // Each lists the other.
    let (ok, status) = a.run(&lab, &["status"]);
    assert!(ok && status.contains("tb"), "{status}");
    let (ok, status) = b.run(&lab, &["status"]);
    assert!(ok && status.contains("ta"), "{status}");

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

#[test]
fn agentd_and_tailscaled_on_our_controld_reach_each_other_directly() {
    let lab = lab_or_skip!();
    if tailscale_bin("tailscaled").is_none() || tailscale_bin("tailscale").is_none() {
        return;
    }
    let (_region, control) = world(&lab);
    let ra = lab.add_router("ra", RouterSpec::easy()).unwrap();
    let rb = lab.add_router("rb", RouterSpec::easy()).unwrap();
    let ha = lab.add_lan_host("alice", &ra).unwrap();
    let hb = lab.add_lan_host("tb", &rb).unwrap();
    let a = scenario::start_agentd(&lab, &ha, "alice", &control).unwrap();
    let b = Tailscaled::start(&lab, &hb, "tb", &control);

    // Disco from tailscaled to agentd: relayed pongs, then a direct one.
    let out = b.ping_until_direct(&lab, a.ip);
    eprintln!("tailscale ping alice:\n{out}");
    assert!(
        out.lines()
            .rfind(|l| l.starts_with("pong"))
            .unwrap()
            .contains(&format!("via {}:", ra.wan_ip)),
        "{out}"
    );

    // Traffic through the tunnel: ICMP from agentd's side to tailscaled's netstack and
    // back.
    let t0 = Instant::now();
    while ping_once(&lab, &ha, b.ip, Duration::from_secs(1)).is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "alice cannot ping tailscaled"
        );
    }
    for _ in 0..3 {
        assert!(ping_once(&lab, &ha, b.ip, Duration::from_secs(1)).is_some());
    }
    // agentd sees tailscaled as a direct peer.
    let s = a.status(&lab).unwrap();
    let peer = s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str().is_some_and(|n| n.starts_with("tb")))
        .cloned()
        .unwrap_or_else(|| panic!("{s:#}"));
    assert_eq!(peer["path"], "direct", "{peer:#}");
}
