//! `agentctl netcheck`: one report (or one every `--every`) printed the way
//! `tailscale netcheck` prints it, plus the NAT type; `--json` for machines, `--verbose`
//! for every probe. Runs without the daemon, from its own UDP socket.

use std::io::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use netcheck::text::format_report;
use netcheck::{Netchecker, PortMapper};
use proto::relaymap::RelayMap;

fn now_text() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The relay map (DERPMap JSON): a file, or an http(s) URL serving one. Without it,
    /// the running agentd measures from its own socket with the map its control server
    /// sent.
    #[arg(long, value_name = "FILE|URL", env = "AGENTCTL_RELAY_MAP")]
    relay_map: Option<String>,
    /// Print the report as JSON (Tailscale's field names; latencies in nanoseconds).
    #[arg(long)]
    json: bool,
    /// Show every probe and fallback check.
    #[arg(long, short)]
    verbose: bool,
    /// Local UDP port to probe from (0 = any). The NAT type applies to this port.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Skip the UPnP / NAT-PMP / PCP probe.
    #[arg(long)]
    no_portmap: bool,
    /// Repeat every this long (e.g. 30s) until interrupted.
    #[arg(long, value_parser = humantime::parse_duration)]
    every: Option<Duration>,
}

async fn load_map(src: &str) -> anyhow::Result<RelayMap> {
    if src.starts_with("http://") || src.starts_with("https://") {
        let body = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?
            .get(src)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("fetching the relay map from {src}"))?
            .text()
            .await
            .with_context(|| format!("reading the relay map from {src}"))?;
        RelayMap::from_json(&body).with_context(|| format!("relay map from {src}"))
    } else {
        RelayMap::load(std::path::Path::new(src)).map_err(anyhow::Error::from)
    }
}

/// Prints one report; with `--every`, waits for the next and returns true.
async fn emit(text: &str, every: Option<Duration>) -> anyhow::Result<bool> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    drop(out);
    let Some(every) = every else {
        return Ok(false);
    };
    tokio::time::sleep(every).await;
    Ok(true)
}

/// Through the running agentd: its own socket and relay map.
async fn run_via_daemon(conn: &crate::local::Conn, args: &Args) -> anyhow::Result<()> {
    if args.verbose || args.port != 0 || args.no_portmap {
        anyhow::bail!(
            "--verbose, --port and --no-portmap need --relay-map (agentctl measuring on its own)"
        );
    }
    loop {
        let r: proto::localapi::NetcheckResult = conn.get("/v1/netcheck").await.map_err(|e| {
            anyhow::anyhow!("{e:#} (or give --relay-map FILE|URL to measure without agentd)")
        })?;
        let text = if args.json {
            serde_json::to_string_pretty(&r.report)? + "\n"
        } else {
            r.text
        };
        if !emit(&text, args.every).await? {
            return Ok(());
        }
    }
}

pub async fn run(conn: &crate::local::Conn, args: Args) -> anyhow::Result<()> {
    let Some(relay_map) = args.relay_map.clone() else {
        return run_via_daemon(conn, &args).await;
    };
    if args.verbose {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("netcheck=debug")
            .with_writer(std::io::stderr)
            .try_init();
    }
    let map = load_map(&relay_map).await?;
    if map.regions.is_empty() {
        anyhow::bail!("the relay map has no regions; nothing to measure");
    }
    let portmapper = (!args.no_portmap).then(PortMapper::new);
    let mut nc = Netchecker::bind(args.port, portmapper)
        .await
        .with_context(|| format!("binding UDP port {}", args.port))?;
    loop {
        let report = nc.report(&map, |_| None).await;
        let text = if args.json {
            let mut v = serde_json::to_value(&report)?;
            if args.verbose {
                v["Probes"] = serde_json::to_value(&nc.details().probes)?;
            }
            serde_json::to_string_pretty(&v)? + "\n"
        } else {
            format_report(&report, nc.details(), &map, args.verbose, &now_text())
        };
        if !emit(&text, args.every).await? {
            return Ok(());
        }
    }
}
