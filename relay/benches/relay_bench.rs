//! relayd benchmark on loopback: forwarding throughput and memory per idle client.
//!
//! Runs the real `relayd` binary as a separate process, so its RSS is its own.
//!
//! ```sh
//! ulimit -n 65536
//! cargo bench -p relay --features server --bench relay_bench            # everything
//! cargo bench -p relay --features server --bench relay_bench -- forward  # throughput only
//! cargo bench -p relay --features server --bench relay_bench -- idle     # memory only
//! ```
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{spawn_relayd, target, test_cert, write_cert_files, RelaydProcess, TestCert};
use proto::NodePrivate;
use relay::client::{connect, RelayConn, RelayTarget};
use relay::frame::Frame;
use relay::handshake::ClientInfo;

const PACKET: usize = 1200;

/// relayd as a child process, plain or with TLS from PEM files.
fn start_relayd(tls: Option<&TestCert>, dir: &std::path::Path) -> RelaydProcess {
    let mut args: Vec<String> = [
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--stun=false",
        "--log-level",
        "warn,relay::server=info",
    ]
    .map(String::from)
    .to_vec();
    if let Some(cert) = tls {
        let (c, k) = write_cert_files(cert, dir, "relayd");
        args.extend([
            "--tls-cert".into(),
            c.display().to_string(),
            "--tls-key".into(),
            k.display().to_string(),
        ]);
    }
    spawn_relayd(&args)
}

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    testkit::procfs::rss_kib(pid).expect("the relay is running")
}

async fn conn(t: &RelayTarget) -> (NodePrivate, RelayConn) {
    let k = NodePrivate::generate();
    let c = connect(t, &k, &ClientInfo::regular()).await.unwrap();
    (k, c)
}

struct ForwardResult {
    pairs: usize,
    mbytes_per_s: f64,
    pkts_per_s: f64,
}

async fn forward(pairs: usize, secs: f64) -> ForwardResult {
    let dir = tempfile::tempdir().unwrap();
    let relayd = start_relayd(None, dir.path());
    let t = target(relayd.addr, None, false);
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..pairs {
        let (_, mut s) = conn(&t).await;
        let (kr, mut r) = conn(&t).await;
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(f) = r.reader.recv().await {
                if let Frame::RecvPacket { .. } = f {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        let stop = stop.clone();
        let dst = kr.public();
        tasks.push(tokio::spawn(async move {
            let payload = vec![0x5a; PACKET];
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..16 {
                    s.writer.queue_packet(&dst, &payload).unwrap();
                }
                if s.writer.flush().await.is_err() {
                    return;
                }
            }
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n0 = received.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let n = received.load(Ordering::Relaxed) - n0;
    let dt = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    drop(relayd);
    let pps = n as f64 / dt;
    ForwardResult {
        pairs,
        mbytes_per_s: pps * PACKET as f64 / 1e6,
        pkts_per_s: pps,
    }
}

async fn idle(clients: usize, tls: bool) -> (u64, u64, f64) {
    let cert = tls.then(test_cert);
    let dir = tempfile::tempdir().unwrap();
    let relayd = start_relayd(cert.as_ref(), dir.path());
    let t = target(relayd.addr, cert.as_ref(), false);
    let pid = relayd.child.0.id();
    // Warm the server (runtime threads, first allocations) before the baseline.
    let mut conns = Vec::with_capacity(clients + 100);
    for _ in 0..100 {
        conns.push(conn(&t).await.1);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = rss_kib(pid);
    let mut set = tokio::task::JoinSet::new();
    let mut started = 0;
    while started < clients || !set.is_empty() {
        while started < clients && set.len() < 64 {
            let t = t.clone();
            set.spawn(async move { conn(&t).await.1 });
            started += 1;
        }
        if let Some(r) = set.join_next().await {
            conns.push(r.unwrap());
        }
    }
    // Let every connection go idle (buffers released after the handshake).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    drop(conns);
    let per = (after.saturating_sub(base)) as f64 * 1024.0 / clients as f64;
    (base, after, per)
}

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if want("forward") {
            println!("forwarding, {PACKET}-byte packets, relayd and clients on one 2-core machine");
            println!("| pairs | MB/s (payload) | Gb/s | packets/s |");
            println!("|---:|---:|---:|---:|");
            for pairs in [1, 64] {
                let mut runs: Vec<ForwardResult> = Vec::new();
                for _ in 0..3 {
                    runs.push(forward(pairs, 3.0).await);
                }
                runs.sort_by(|a, b| a.mbytes_per_s.total_cmp(&b.mbytes_per_s));
                let r = &runs[1];
                println!(
                    "| {} | {:.0} | {:.2} | {:.0} |   (median of 3; runs: {})",
                    r.pairs,
                    r.mbytes_per_s,
                    r.mbytes_per_s * 8.0 / 1000.0,
                    r.pkts_per_s,
                    runs.iter()
                        .map(|r| format!("{:.0}", r.mbytes_per_s))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        if want("idle") {
            println!("memory per idle client, 10000 clients");
            println!("| transport | relayd RSS before | after | per client |");
            println!("|---|---:|---:|---:|");
            for tls in [false, true] {
                let (base, after, per) = idle(10_000, tls).await;
                println!(
                    "| {} | {} KiB | {} KiB | {:.1} KiB |",
                    if tls { "TLS" } else { "plain" },
                    base,
                    after,
                    per / 1024.0
                );
            }
        }
    });
}
