//! `agentctl debug …`: tools for looking at one mechanism at a time.
//! `debug portmap` asks the router for a UDP port mapping (UPnP, NAT-PMP or PCP), keeps it
//! while it runs, prints every datagram that arrives through it, and deletes it on exit.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use netcheck::PortMapper;
use tokio::net::UdpSocket;

#[derive(Debug, clap::Subcommand)]
pub enum Debug {
    /// Map a public UDP port to a local one through the router and listen on it.
    Portmap(PortmapArgs),
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

pub async fn run(cmd: Debug) -> anyhow::Result<()> {
    match cmd {
        Debug::Portmap(a) => portmap(a).await,
    }
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
