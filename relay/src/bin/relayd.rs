//! `relayd`: the DERP relay server. See `relayd --help`.
// A command-line program reports fatal errors on stderr for the person who started it.
#![allow(clippy::print_stderr)]

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use relay::server::config::Args;
use relay::server::Server;

fn main() -> ExitCode {
    let args = match Args::parse().merge_config_file() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("relayd: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(args.log_level.as_deref().unwrap_or("info"))
        })
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relayd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relayd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Every client is a socket: allow as many as the hard limit does, as derper does.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let cfg = args.to_server_config()?;
    let server = Server::start(cfg).await.context("relayd could not start")?;
    wait_for_signal().await?;
    tracing::info!("shutting down: draining connections");
    server.shutdown().await;
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await.context("cannot watch Ctrl-C")
}
