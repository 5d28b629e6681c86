//! controld fan-out benchmark: N simulated nodes registered and streaming against a real
//! controld process; the time for one endpoint change to reach all of them; controld RSS.
//!
//! ```sh
//! cargo bench -p control --features server --bench controld_bench            # 1000 nodes
//! cargo bench -p control --features server --bench controld_bench -- 200     # other N
//! ```
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use control::client::ControlClient;
use control::dial::{fetch_control_key, ControlUrl};
use proto::tailcfg::{Hostinfo, MapRequest, NetInfo, RegisterAuth, RegisterRequest};
use proto::{DiscoPrivate, MachinePrivate, NodePrivate};
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_controld");

use testkit::KillOnDrop as Child;

fn cli(db: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    testkit::procfs::rss_kib(pid).expect("controld is running")
}

fn req(node: &NodePrivate, disco: &DiscoPrivate, endpoint: &str) -> MapRequest {
    MapRequest {
        version: 113,
        compress: "zstd".into(),
        keep_alive: true,
        node_key: node.public(),
        disco_key: disco.public(),
        stream: true,
        hostinfo: Some(Hostinfo {
            hostname: format!("sim-{}", &node.public().untyped_hex()[..6]),
            net_info: Some(NetInfo {
                preferred_derp: 900,
            }),
            ..Default::default()
        }),
        endpoints: vec![endpoint.into()],
        endpoint_types: vec![2],
        omit_peers: false,
    }
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("controld.db");
    let map = dir.path().join("relaymap.json");
    std::fs::write(&map, r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"loc","Nodes":[{"Name":"900a","RegionID":900,"HostName":"localhost"}]}}}"#).unwrap();
    cli(&db, &["users", "create", "bench"]);
    let key = cli(&db, &["keys", "create", "--user", "bench", "--reusable"])
        .trim()
        .to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Child(
        Command::new(BIN)
            .arg("--db")
            .arg(&db)
            .args([
                "serve",
                "--dev",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--relay-map",
            ])
            .arg(&map)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = server.0.id();
    let url: ControlUrl = format!("http://127.0.0.1:{port}").parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let control_key = loop {
            if let Ok(k) = fetch_control_key(&url, 113).await {
                break k;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let rss_idle = rss_kib(pid);
        // Each simulated node reports (node index, instant) when it sees the marker endpoint.
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, String, Instant)>();
        let t_join = Instant::now();
        let mut first: Option<(ControlClient, MapRequest)> = None;
        let mut set = tokio::task::JoinSet::new();
        let mut streams = Vec::new();
        for i in 0..n {
            let (url, key, seen) = (url.clone(), key.clone(), seen_tx.clone());
            set.spawn(async move {
                let node = NodePrivate::generate();
                let disco = DiscoPrivate::generate();
                let client = ControlClient::connect(&url, &MachinePrivate::generate(), &control_key, 113).await.unwrap();
                let r = req(&node, &disco, &format!("192.0.2.{}:{}", i % 250 + 1, 10_000 + i));
                let resp = client
                    .register(&RegisterRequest {
                        version: 113,
                        node_key: node.public(),
                        auth: Some(RegisterAuth { auth_key: key }),
                        hostinfo: r.hostinfo.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                assert!(resp.machine_authorized, "{resp:?}");
                let mut stream = client.map_stream(&r).await.unwrap();
                let task = tokio::spawn(async move {
                    while let Some(Ok(m)) = stream.next().await {
                        for p in m.peers_changed {
                            if let Some(e) = p.endpoints.first().filter(|e| e.starts_with("198.51.100.")) {
                                let _ = seen.send((i, e.clone(), Instant::now()));
                            }
                        }
                    }
                });
                (i, client, r, task)
            });
            // Keep at most 32 joins in flight.
            while set.len() >= 32 {
                let (i, c, r, t) = set.join_next().await.unwrap().unwrap();
                streams.push(t);
                if i == 0 {
                    first = Some((c, r));
                } else {
                    std::mem::forget(c);
                }
            }
        }
        while let Some(res) = set.join_next().await {
            let (i, c, r, t) = res.unwrap();
            streams.push(t);
            if i == 0 {
                first = Some((c, r));
            } else {
                std::mem::forget(c);
            }
        }
        let join_time = t_join.elapsed();
        // Let the joins settle (every stream has its full map and all deltas).
        tokio::time::sleep(Duration::from_secs(3)).await;
        while seen_rx.try_recv().is_ok() {}
        let rss_streaming = rss_kib(pid);
        let (client0, req0) = first.unwrap();
        let mut fanouts = Vec::new();
        for round in 0..5 {
            let marker = format!("198.51.100.{}:{}", round + 1, 4000 + round);
            let mut moved = req0.clone();
            moved.endpoints = vec![marker.clone()];
            let t0 = Instant::now();
            client0.lite_update(&moved).await.unwrap();
            let mut got = 0;
            let mut last = t0;
            let deadline = t0 + Duration::from_secs(30);
            while got < n - 1 {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, seen_rx.recv()).await {
                    Ok(Some((_, e, at))) if e == marker => {
                        got += 1;
                        last = at;
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            assert_eq!(got, n - 1, "round {round}: only {got} of {} nodes saw the change", n - 1);
            fanouts.push(last - t0);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let rss_after = rss_kib(pid);
        let mut sorted = fanouts.clone();
        sorted.sort();
        println!("controld fan-out, {n} nodes streaming (controld and the simulated nodes on one 2-core machine)");
        println!("| what | value |");
        println!("|---|---:|");
        println!("| {n} nodes joined (register + first map, 32 at a time) | {:.1} s |", join_time.as_secs_f64());
        println!("| one endpoint change reaching all {} other nodes, median of 5 | {:.0} ms |", n - 1, sorted[2].as_secs_f64() * 1000.0);
        println!("| the same, each round | {} |", fanouts.iter().map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0)).collect::<Vec<_>>().join(", "));
        println!("| controld RSS, idle before any node | {:.1} MiB |", rss_idle as f64 / 1024.0);
        println!("| controld RSS, {n} nodes streaming | {:.1} MiB |", rss_streaming as f64 / 1024.0);
        println!("| controld RSS, after the 5 rounds | {:.1} MiB |", rss_after as f64 / 1024.0);
        for t in streams {
            t.abort();
        }
    });
    drop(server);
}
