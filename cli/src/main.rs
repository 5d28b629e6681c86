//! `agentctl`: the command-line client of agentd. `netcheck` works on its own, without
//! the daemon; the other commands talk to agentd's local API.

use clap::{Parser, Subcommand};

mod debug;
mod local;
mod netcheck;

#[derive(Debug, Parser)]
#[command(
    name = "agentctl",
    version,
    about = "Control and inspect agentd, the mesh VPN daemon.",
    after_help = "Examples:\n  agentctl status                 this device and its peers (direct or relayed, and why)\n  agentctl ping bob               relay pongs until the first direct one\n  agentctl netcheck               what the network allows (NAT type, relay latency)\n  agentctl down && agentctl up    leave the network and come back\n  agentctl status --json          status, ping, ip, whois, version, up, down, netcheck: --json\n\nExit status: 0 on success, 1 on any failure (with a one-line reason on stderr)."
)]
struct Cli {
    #[command(flatten)]
    conn: local::Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// This device and its peers: addresses, paths (direct or relay, and why), traffic.
    Status(local::StatusArgs),
    /// Disco pings to a peer, like `tailscale ping`: shows whether pongs come through a
    /// relay or directly; stops at the first direct pong.
    Ping(local::PingArgs),
    /// Ask the running agentd to connect again after `down`.
    Up(local::UpDownArgs),
    /// Ask the running agentd to disconnect: leave control, remove the tunnel (the daemon
    /// keeps running; `up` undoes it).
    Down(local::UpDownArgs),
    /// This device's tunnel addresses.
    Ip(local::IpArgs),
    /// Which peer owns a tunnel address.
    Whois(local::WhoisArgs),
    /// agentctl's and the running agentd's versions.
    Version(local::VersionArgs),
    /// Measure this network: public address, NAT type, port mapping, relay latency.
    Netcheck(netcheck::Args),
    /// Debugging tools for one mechanism at a time.
    #[command(subcommand)]
    Debug(debug::Debug),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report_error(&anyhow::anyhow!("cannot start the async runtime: {e}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Status(a) => local::status(&cli.conn, a).await,
            Command::Ping(a) => local::ping(&cli.conn, a).await,
            Command::Up(a) => local::up_down(&cli.conn, true, a).await,
            Command::Down(a) => local::up_down(&cli.conn, false, a).await,
            Command::Ip(a) => local::ip(&cli.conn, a).await,
            Command::Whois(a) => local::whois(&cli.conn, a).await,
            Command::Version(a) => local::version(&cli.conn, a).await,
            Command::Netcheck(args) => netcheck::run(&cli.conn, args).await,
            Command::Debug(cmd) => debug::run(&cli.conn, cmd).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e);
            std::process::ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stderr)]
fn report_error(e: &anyhow::Error) {
    eprintln!("agentctl: {e:#}");
}
