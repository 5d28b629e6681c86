//! The whole system on this machine, in network namespaces: controld, two relay regions
//! (10 ms and 40 ms away), and two agentd devices behind separate home NAT routers. It
//! waits for the devices to reach each other, then prints `agentctl status` on both, which
//! shows the direct path. With `--wait` it keeps everything running until Ctrl-C and says
//! how to step into the namespaces; otherwise it tears everything down and exits.
//! Either way nothing is left behind: namespaces, NAT rules and processes go with it.
//!
//! Needs root (namespaces, nftables, TUN devices). Build first, then run:
//! `cargo build --workspace --all-features && sudo target/debug/demo`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Duration;

use tests::scenario::{self, ping_once};
use tests::{Lab, RouterSpec};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn step(what: &str) {
    println!("==> {what}");
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let wait = std::env::args().any(|a| a == "--wait");
    // Ctrl-C and SIGTERM are taken by sigwait below (blocked here, before any thread
    // starts, so every thread inherits the mask): the lab is then torn down cleanly.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.add(nix::sys::signal::Signal::SIGTERM);
    if wait {
        signals.thread_block()?;
    }
    step("building the lab: an internet, two relay regions, controld, two home NATs");
    let lab = Lab::new()?;
    let near = scenario::start_region(&lab, 901, 10)?;
    let far = scenario::start_region(&lab, 902, 40)?;
    let map = scenario::write_relay_map(&lab, &[&near, &far], &[])?;
    let control = scenario::start_control(&lab, &map)?;
    let ra = lab.add_router("home-a", RouterSpec::easy())?;
    let rb = lab.add_router("home-b", RouterSpec::easy())?;
    let ha = lab.add_lan_host("alice", &ra)?;
    let hb = lab.add_lan_host("bob", &rb)?;

    step("starting agentd on alice and bob (agentd up --login-server … --auth-key-file …)");
    let a = scenario::start_agentd(&lab, &ha, "alice", &control)?;
    let b = scenario::start_agentd(&lab, &hb, "bob", &control)?;
    println!("    alice is {}, bob is {}", a.ip, b.ip);

    step(&format!("ping {} from alice", b.ip));
    let first = scenario::wait_for_ping(&lab, &ha, b.ip, Duration::from_secs(15))
        .map_err(|e| format!("{e}; logs are in {}", lab.log_dir().display()))?;
    let rtt = ping_once(&lab, &ha, b.ip, Duration::from_secs(1)).unwrap_or_default();
    println!("    first reply after {first:.2?} (then a ping takes {rtt:.1?})");
    let (_, out, _) = a.agentctl(&lab, &["ping", "bob"])?;
    print!("{}", indent(&out));

    for d in [&a, &b] {
        step(&format!("agentctl status on {}", d.name));
        let (ok, out, err) = d.agentctl(&lab, &["status"])?;
        if !ok {
            return Err(err.into());
        }
        print!("{}", indent(&out));
    }

    if wait {
        step("running; press Ctrl-C to tear it all down");
        println!("    step in: sudo ip netns exec {} bash", ha.node.ns());
        println!(
            "    agentctl: target/debug/agentctl --socket {} status",
            a.socket.display()
        );
        println!("    logs: {}", lab.log_dir().display());
        let _ = signals.wait();
    }
    step("tearing down");
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
