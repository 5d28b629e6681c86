//! `agentctl debug …`: tools for looking at one mechanism at a time.
//! `debug portmap` asks the router for a UDP port mapping (UPnP, NAT-PMP or PCP), keeps it
//! while it runs, prints every datagram that arrives through it, and deletes it on exit.
//! `debug filter` prints the packet filter the running agentd enforces.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use netcheck::PortMapper;
use tokio::net::UdpSocket;

#[derive(Debug, clap::Subcommand)]
pub enum Debug {
    /// Map a public UDP port to a local one through the router and listen on it.
    Portmap(PortmapArgs),
    /// The packet filter the running agentd enforces: its rules, what it refused and why.
    Filter(FilterArgs),
}

#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// Print the filter as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct PortmapArgs {
    /// Local UDP port to map (and listen on).
    #[arg(long, default_value_t = 41641)]
    port: u16,
    /// Give up if no mapping is granted within this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Release the mapping and exit after this long (default: on Ctrl-C or SIGTERM).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

fn say(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

pub async fn run(conn: &crate::local::Conn, cmd: Debug) -> anyhow::Result<()> {
    match cmd {
        Debug::Portmap(a) => portmap(a).await,
        Debug::Filter(a) => {
            let f: proto::localapi::FilterStatus = conn.get("/v1/filter").await?;
            if a.json {
                say(&serde_json::to_string_pretty(&f)?)
            } else {
                say(render_filter(&f).trim_end())
            }
        }
    }
}

/// `agentctl debug filter` as text.
fn render_filter(f: &proto::localapi::FilterStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if !f.received {
        out.push_str(
            "No packet filter from the control server yet: all inbound traffic is denied.\n",
        );
    } else if f.rules.is_empty() {
        out.push_str("The filter has no rules: all inbound traffic is denied (replies to this device's own connections pass).\n");
    } else {
        let _ = writeln!(out, "{} rules in force:", f.rules.len());
        for r in &f.rules {
            let _ = writeln!(out, "  {r}");
        }
    }
    if f.skipped > 0 {
        let _ = writeln!(
            out,
            "{} rules could not be read and are not enforced (what they would allow stays denied)",
            f.skipped
        );
    }
    let _ = writeln!(out, "for: {}", f.local.join(", "));
    let _ = writeln!(
        out,
        "flows open for replies: {} ({} evicted)",
        f.flows, f.flows_evicted
    );
    let denied: Vec<String> = f
        .denied
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "denied: {}",
        if denied.is_empty() {
            "none".into()
        } else {
            denied.join(", ")
        }
    );
    out
}

async fn portmap(a: PortmapArgs) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", a.port))
        .await
        .with_context(|| format!("binding UDP port {}", a.port))?;
    let pm = PortMapper::new();
    match pm.probe(Duration::from_secs(2)).await {
        Ok(s) => say(&format!("gateway offers: {s}"))?,
        Err(e) => say(&format!("gateway probe: {e}"))?,
    }
    pm.map(a.port);
    let mut ext = pm.external();
    let mapped = tokio::time::timeout(a.timeout, ext.wait_for(|e| e.is_some()))
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|e| *e));
    let Some(mapped) = mapped else {
        anyhow::bail!(
            "the router granted no mapping within {:?}: it offers none of UPnP, NAT-PMP or PCP, or refused",
            a.timeout
        );
    };
    say(&format!("mapped {mapped} -> local port {}", a.port))?;
    let stop = async {
        match a.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => shutdown_signal().await,
        }
    };
    tokio::pin!(stop);
    let mut buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            _ = &mut stop => break,
            r = sock.recv_from(&mut buf) => {
                let (n, from) = r.context("receiving")?;
                say(&format!("received {n} bytes from {from}"))?;
            }
            _ = ext.changed() => {
                match *ext.borrow() {
                    Some(e) => say(&format!("mapped {e} -> local port {}", a.port))?,
                    None => say("mapping lost; asking again")?,
                }
            }
        }
    }
    pm.release(Duration::from_secs(3)).await;
    say("released")?;
    Ok(())
}

#[cfg(unix)]
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_text_says_what_is_in_force() {
        let none = render_filter(&Default::default());
        assert!(none.starts_with("No packet filter"), "{none}");
        let f = proto::localapi::FilterStatus {
            received: true,
            rules: vec!["accept tcp from 100.64.0.2/32 to 100.64.0.1/32:22".into()],
            skipped: 2,
            local: vec!["100.64.0.1/32".into()],
            flows: 3,
            flows_evicted: 0,
            denied: [("no_rule".to_string(), 5), ("malformed".to_string(), 0)]
                .into_iter()
                .collect(),
        };
        let t = render_filter(&f);
        assert!(
            t.contains("1 rules in force:\n  accept tcp from 100.64.0.2/32 to 100.64.0.1/32:22\n"),
            "{t}"
        );
        assert!(t.contains("2 rules could not be read"), "{t}");
        assert!(t.contains("denied: no_rule 5\n"), "{t}");
        let empty = proto::localapi::FilterStatus {
            received: true,
            ..Default::default()
        };
        assert!(render_filter(&empty).contains("all inbound traffic is denied"));
    }
}
