//! agentd throughput, packet rate, latency and memory, side by side with the raw link and
//! with `boringtun-cli` on the same namespaces (run `cargo bench -p tests --bench
//! agentd_bench`; needs root, iperf3, and for the comparison `boringtun-cli` and `wg`).
//!
//! Two hosts on the lab's internet (one routed hop, veth links), a relay region and
//! controld for agentd's control plane; a third host that the first reaches only through
//! the relay (their UDP is dropped) for the relayed row. Each contender is measured in turn, in rounds, so
//! the machine's noise spreads over all of them; the medians are printed as a Markdown
//! table for BENCHMARKS.md.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::scenario;
use tests::{have_program, Host, Lab};

/// Rounds (`AGENTD_BENCH_ROUNDS` overrides).
fn rounds() -> usize {
    std::env::var("AGENTD_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}
const SECONDS: &str = "5";

fn rss_kib(pid: u32) -> u64 {
    testkit::procfs::rss_kib(pid).unwrap_or(0)
}

/// Context switches of every thread of `pid` so far (each one a wake-up).
fn ctx_switches(pid: u32) -> u64 {
    testkit::procfs::context_switches(pid)
}

/// CPU time `pid` has used so far (user + system), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    testkit::procfs::cpu_seconds(pid).unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn iperf_json(lab: &Lab, from: &Host, to: Ipv4Addr, extra: &[&str]) -> Value {
    let to = to.to_string();
    let mut args = vec!["-c", to.as_str(), "-t", SECONDS, "-J"];
    args.extend_from_slice(extra);
    let out = lab.exec(from, "iperf3", &args).unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Single-stream TCP, Gb/s received.
fn tcp_gbps(lab: &Lab, from: &Host, to: Ipv4Addr) -> f64 {
    let r = iperf_json(lab, from, to, &[]);
    r["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// 64-byte UDP datagrams as fast as iperf3 can send them: packets/s that arrived, and
/// the share of those sent that were lost on the way.
fn udp_pps(lab: &Lab, from: &Host, to: Ipv4Addr) -> (f64, f64) {
    let r = iperf_json(lab, from, to, &["-u", "-l", "64", "-b", "0"]);
    let s = &r["end"]["sum"];
    let packets = s["packets"].as_f64().unwrap_or(0.0);
    let lost = s["lost_packets"].as_f64().unwrap_or(0.0);
    let secs = s["seconds"].as_f64().unwrap_or(1.0).max(0.001);
    ((packets - lost) / secs, lost / packets.max(1.0))
}

/// Median ping round trip in ms (50 pings, 20 ms apart).
fn ping_ms(lab: &Lab, from: &Host, to: Ipv4Addr) -> f64 {
    let out = lab
        .exec(
            from,
            "ping",
            ["-n", "-c", "50", "-i", "0.02", &to.to_string()],
        )
        .unwrap();
    let times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .filter_map(|s| s.parse().ok())
        .collect();
    if times.is_empty() {
        return f64::NAN;
    }
    median(times)
}

/// A boringtun-cli tunnel between the two hosts (10.99.`net`.1 ↔ 10.99.`net`.2),
/// configured with `wg`; `threads` as boringtun-cli's `--threads` (None: its default).
struct Boringtun {
    _procs: Vec<tests::ChildGuard>,
}

fn wg_key(lab: &Lab, host: &Host) -> (String, String) {
    let private = lab
        .exec_ok(host, "wg", ["genkey"])
        .unwrap()
        .trim()
        .to_string();
    let out = lab
        .exec(host, "sh", ["-c", &format!("echo {private} | wg pubkey")])
        .unwrap();
    (
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn boringtun(lab: &Lab, a: &Host, b: &Host, threads: Option<u32>, net: u8) -> Boringtun {
    let port = (51820 + u16::from(net)).to_string();
    let mut procs = Vec::new();
    let keys = [wg_key(lab, a), wg_key(lab, b)];
    for (i, (host, peer)) in [(a, b), (b, a)].into_iter().enumerate() {
        let ifname = format!("bt{net}{i}");
        let mut args = vec![
            "--foreground".to_string(),
            "--disable-drop-privileges".to_string(),
        ];
        if let Some(t) = threads {
            args.push("--threads".into());
            args.push(t.to_string());
        }
        args.push(ifname.clone());
        procs.push(lab.spawn(host, "boringtun-cli", args).unwrap());
        let sock = format!("/var/run/wireguard/{ifname}.sock");
        let t0 = Instant::now();
        while !std::path::Path::new(&sock).exists() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let key_file = lab.log_dir().join(format!("{ifname}.key"));
        std::fs::write(&key_file, &keys[i].0).unwrap();
        let peer_pub = &keys[1 - i].1;
        lab.exec_ok(
            host,
            "wg",
            [
                "set",
                &ifname,
                "private-key",
                &key_file.display().to_string(),
                "listen-port",
                &port,
                "peer",
                peer_pub,
                "endpoint",
                &format!("{}:{port}", peer.ip),
                "allowed-ips",
                &format!("10.99.{net}.{}/32", 2 - i),
            ],
        )
        .unwrap();
        lab.exec_ok(
            host,
            "ip",
            [
                "addr",
                "add",
                &format!("10.99.{net}.{}/24", i + 1),
                "dev",
                &ifname,
            ],
        )
        .unwrap();
        lab.exec_ok(host, "ip", ["link", "set", &ifname, "mtu", "1420", "up"])
            .unwrap();
    }
    Boringtun { _procs: procs }
}

/// What runs beside one agentd run (the TCP one, or with `AGENTD_BENCH_PHASE=udp` the
/// small-packet one), on the profiled agentd `pid`:
/// - `AGENTD_BENCH_PERF=FILE`: `perf record` of it for 4 s (`AGENTD_BENCH_PERF_ALL=1`: of
///   the whole machine);
/// - `AGENTD_BENCH_HOOK=CMD`: `sh -c CMD` with `$PID` set, e.g. to read /proc/$PID/io.
fn start_probes(pid: u32) -> Vec<std::process::Child> {
    let mut out = Vec::new();
    if let Ok(f) = std::env::var("AGENTD_BENCH_PERF") {
        let target = if std::env::var_os("AGENTD_BENCH_PERF_ALL").is_some() {
            vec!["-a".to_string()]
        } else {
            vec!["-p".to_string(), pid.to_string()]
        };
        out.push(
            std::process::Command::new("perf")
                .args(["record", "-g", "-o", &f])
                .args(target)
                .args(["--", "sleep", "4"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    if let Ok(cmd) = std::env::var("AGENTD_BENCH_HOOK") {
        out.push(
            std::process::Command::new("sh")
                .args(["-c", &cmd])
                .env("PID", pid.to_string())
                .spawn()
                .unwrap(),
        );
    }
    out
}

/// Two agentd on public hosts, registered with `control` by the keys given, once the
/// first has a direct path to the second.
fn direct_pair(
    lab: &Lab,
    control: &scenario::Control,
    devices: [(&str, &str); 2],
) -> (Host, Host, scenario::Device, scenario::Device) {
    let [(na, ka), (nb, kb)] = devices;
    let ha = lab.add_public_host(na).unwrap();
    let hb = lab.add_public_host(nb).unwrap();
    let mut a = scenario::start_agentd_with_key(lab, &ha, na, &control.url, ka).unwrap();
    let b = scenario::start_agentd_with_key(lab, &hb, nb, &control.url, kb).unwrap();
    let _ = lab.exec(
        &ha,
        "ping",
        ["-c", "3", "-i", "0.2", "-n", &b.ip.to_string()],
    );
    a.agentd
        .wait_for_output("path=direct", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("no direct path from {na} to {nb}: {e}"));
    (ha, hb, a, b)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench --list
    }
    // The lab reuses binaries it finds next to this one: build them fresh first.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = std::process::Command::new(cargo)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "build",
            "--release",
            "-p",
            "agent",
            "-p",
            "relay",
            "-p",
            "control",
            "-p",
            "cli",
            "--features",
            "relay/server,control/server",
        ])
        .status()
        .expect("running cargo");
    assert!(built.success(), "building the binaries failed");
    let lab = Lab::new_requiring(&["iperf3"]).expect("the lab needs root and iperf3");
    let region = scenario::start_region(&lab, 901, 0).unwrap();
    let map = scenario::write_relay_map(&lab, &[&region], &[]).unwrap();
    let control = scenario::start_control(&lab, &map).unwrap();
    let key = control.auth_key.clone();
    let (ha, hb, a, b) = direct_pair(&lab, &control, [("alice", &key), ("bob", &key)]);
    std::thread::sleep(Duration::from_secs(3));
    let idle_rss = rss_kib(a.agentd.pid());

    // Carol is a third device alice can reach only through the relay (UDP between the two
    // is dropped): the relayed row.
    let hc = lab.add_public_host("carol").unwrap();
    lab.block_udp(lab.internet(), ha.ip, hc.ip).unwrap();
    let c = scenario::start_agentd(&lab, &hc, "carol", &control).unwrap();
    scenario::wait_for_ping(&lab, &ha, c.ip, Duration::from_secs(10))
        .expect("alice cannot reach carol through the relay");
    let _server_c = lab.spawn(&hc, "iperf3", ["-s", "--forceflush"]).unwrap();

    // Dave joins and is never talked to: an idle device, for its wake-ups.
    let hd = lab.add_public_host("dave").unwrap();
    let d = scenario::start_agentd(&lab, &hd, "dave", &control).unwrap();
    let dave_up = Instant::now();

    let with_bt = have_program("boringtun-cli") && have_program("wg");
    if !with_bt {
        eprintln!("boringtun-cli or wg missing: no comparison (cargo install boringtun-cli; apt install wireguard-tools)");
    }
    let _bt = with_bt.then(|| boringtun(&lab, &ha, &hb, None, 0));
    let _bt1 = with_bt.then(|| boringtun(&lab, &ha, &hb, Some(1), 1));
    let _server = lab.spawn(&hb, "iperf3", ["-s", "--forceflush"]).unwrap();

    // Eve and Frank: a direct pair like alice and bob, on a second controld whose policy
    // gives Frank a 100-rule packet filter (99 rules for other sources and ports first,
    // then the one that lets Eve in): the filter's cost, against alice → bob whose
    // controld has no policy (one allow-all rule).
    let policy_file = lab.log_dir().join("policy-100.hujson");
    let mut acls: Vec<String> = (0..99)
        .map(|i| {
            format!(
                r#"{{"action": "accept", "src": ["10.{i}.0.0/16"], "dst": ["frank@:{}"]}}"#,
                2000 + i
            )
        })
        .collect();
    acls.push(r#"{"action": "accept", "src": ["eve@"], "dst": ["frank@:*"]}"#.into());
    std::fs::write(
        &policy_file,
        format!("{{\"acls\": [\n{}\n]}}\n", acls.join(",\n")),
    )
    .unwrap();
    let policy_arg = policy_file.display().to_string();
    let control2 =
        scenario::start_control_named(&lab, "control2", &map, &["--policy", &policy_arg]).unwrap();
    let (ke, kf) = (
        control2.user_key(&lab, "eve", &[]).unwrap(),
        control2.user_key(&lab, "frank", &[]).unwrap(),
    );
    let (he, hf, _e, f) = direct_pair(&lab, &control2, [("eve", &ke), ("frank", &kf)]);
    let (ok, rules, _) = f.agentctl(&lab, &["debug", "filter", "--json"]).unwrap();
    let rules: Value = serde_json::from_str(&rules).unwrap();
    assert!(
        ok && rules["rules"].as_array().unwrap().len() == 100,
        "{rules:#}"
    );
    let _server_f = lab.spawn(&hf, "iperf3", ["-s", "--forceflush"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let mut rows: Vec<(&str, &Host, Ipv4Addr)> = vec![
        ("raw veth (no tunnel)", &ha, hb.ip),
        ("agentd (direct)", &ha, b.ip),
        ("agentd (through relayd)", &ha, c.ip),
        ("agentd (direct, 100-rule packet filter)", &he, f.ip),
    ];
    if with_bt {
        rows.push((
            "boringtun-cli, default threads",
            &ha,
            Ipv4Addr::new(10, 99, 0, 2),
        ));
        rows.push((
            "boringtun-cli --threads 1",
            &ha,
            Ipv4Addr::new(10, 99, 1, 2),
        ));
    }
    let mut tcp: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    let mut udp: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    let mut ping: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    let mut load_rss = 0u64;
    let mut cpu_per_gb: Vec<(f64, f64)> = Vec::new();
    for round in 0..rounds() {
        for (i, (name, from, ip)) in rows.iter().enumerate() {
            let pid = a.agentd.pid();
            let sampler = std::thread::spawn(move || {
                let mut max = 0;
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(5) {
                    max = max.max(rss_kib(pid));
                    std::thread::sleep(Duration::from_millis(200));
                }
                max
            });
            // Probes (see `start_probes`) watch alice's agentd, the sender, or with
            // AGENTD_BENCH_PERF_BOB=1 bob's, the receiver.
            let perf_pid = if std::env::var_os("AGENTD_BENCH_PERF_BOB").is_some() {
                b.agentd.pid()
            } else {
                pid
            };
            let udp_phase = std::env::var("AGENTD_BENCH_PHASE").as_deref() == Ok("udp");
            let probes = if i == 1 && !udp_phase {
                start_probes(perf_pid)
            } else {
                Vec::new()
            };
            let cpu0 = (cpu_seconds(a.agentd.pid()), cpu_seconds(b.agentd.pid()));
            let g = tcp_gbps(&lab, from, *ip);
            if i == 1 {
                // CPU seconds per gigabyte carried, each end: less sensitive to a busy
                // machine than the rate.
                let gb = g * SECONDS.parse::<f64>().unwrap_or(5.0) / 8.0;
                cpu_per_gb.push((
                    (cpu_seconds(a.agentd.pid()) - cpu0.0) / gb,
                    (cpu_seconds(b.agentd.pid()) - cpu0.1) / gb,
                ));
            }
            for mut c in probes {
                let _ = c.wait();
            }
            let m = sampler.join().unwrap();
            if i == 1 {
                load_rss = load_rss.max(m);
            }
            let probes = if i == 1 && udp_phase {
                start_probes(perf_pid)
            } else {
                Vec::new()
            };
            let (p, loss) = udp_pps(&lab, from, *ip);
            for mut c in probes {
                let _ = c.wait();
            }
            let r = ping_ms(&lab, from, *ip);
            eprintln!(
                "round {round}: {name}: {g:.2} Gb/s, {p:.0} pps ({:.1} % lost), ping {r:.3} ms",
                loss * 100.0
            );
            tcp[i].push(g);
            udp[i].push(p);
            ping[i].push(r);
        }
    }
    let n = rounds();
    println!("| path | TCP Gb/s (median of {n}) | runs | 64-byte UDP, kpps received | ping RTT, ms (median) |");
    println!("|---|---:|---|---:|---:|");
    for (i, (name, _, _)) in rows.iter().enumerate() {
        let runs: Vec<String> = tcp[i].iter().map(|g| format!("{g:.2}")).collect();
        println!(
            "| {name} | {:.2} | {} | {:.0} | {:.3} |",
            median(tcp[i].clone()),
            runs.join(", "),
            median(udp[i].clone()) / 1000.0,
            median(ping[i].clone())
        );
    }
    println!();
    println!(
        "100-rule packet filter vs none (allow-all), medians: TCP {:.3}, 64-byte UDP {:.3}",
        median(tcp[3].clone()) / median(tcp[1].clone()),
        median(udp[3].clone()) / median(udp[1].clone())
    );
    println!(
        "agentd RSS: idle {:.1} MiB, under load (max during TCP runs) {:.1} MiB",
        idle_rss as f64 / 1024.0,
        load_rss as f64 / 1024.0
    );
    println!(
        "agentd CPU per GB of TCP (direct, median): sender {:.2} s, receiver {:.2} s",
        median(cpu_per_gb.iter().map(|c| c.0).collect()),
        median(cpu_per_gb.iter().map(|c| c.1).collect())
    );
    // Dave has been idle since he joined, at least 20 s by now.
    let waited = dave_up.elapsed();
    if waited < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_secs(20) - waited);
    }
    let c0 = ctx_switches(d.agentd.pid());
    std::thread::sleep(Duration::from_secs(20));
    let woke = ctx_switches(d.agentd.pid()) - c0;
    println!(
        "idle agentd (a device nobody talks to): {:.1} wake-ups/s (context switches of all its threads over 20 s)",
        woke as f64 / 20.0
    );
}
