//! `agentd`: the mesh VPN daemon. `agentd up --login-server URL --auth-key-file F` joins
//! the network and runs until SIGINT or SIGTERM (Ctrl-C, or the service manager's stop
//! on Windows), then removes what it set up.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "agentd", version, about = "The agentd mesh VPN daemon.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the network and carry traffic until stopped.
    Up(UpArgs),
    /// Run agentd as a system service (systemd on Linux, launchd on macOS, the service
    /// manager on Windows).
    #[command(subcommand)]
    Service(ServiceCmd),
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Install (or update) the service and start it; running it again changes nothing
    /// unless the settings changed.
    #[command(
        after_help = "Example:\n  sudo agentd service install --login-server https://control.example.com --auth-key-file /root/agentd.key"
    )]
    Install {
        /// The control server the service joins.
        #[arg(long)]
        login_server: Option<String>,
        /// A pre-auth key for the first join (stored root-only).
        #[arg(long)]
        auth_key: Option<String>,
        /// Read the pre-auth key from this file (`-`: standard input) instead.
        #[arg(long, conflicts_with = "auth_key")]
        auth_key_file: Option<PathBuf>,
        /// Write the files under this directory instead of / and start nothing
        /// (for packaging).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Write and enable, but do not start now.
        #[arg(long)]
        no_start: bool,
    },
    /// Stop the service and remove it.
    Uninstall {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Whether the service is installed and running.
    Status {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// The service's entry point on Windows (the service manager starts it).
    #[command(hide = true)]
    Run,
}

#[allow(clippy::print_stdout, clippy::print_stderr)]
fn service(cmd: ServiceCmd) -> std::process::ExitCode {
    use agent::service;
    let r = match cmd {
        ServiceCmd::Install {
            login_server,
            auth_key,
            auth_key_file,
            root,
            no_start,
        } => std::env::current_exe()
            .map_err(anyhow::Error::from)
            .and_then(|exe| {
                let auth_key = match auth_key_file {
                    Some(f) => Some(read_auth_key(&f)?),
                    None => auth_key,
                };
                service::install(&service::InstallOptions {
                    exe: exe.canonicalize().unwrap_or(exe),
                    login_server,
                    auth_key,
                    root,
                    start: !no_start,
                })
            }),
        ServiceCmd::Uninstall { root } => service::uninstall(&root),
        ServiceCmd::Status { root } => service::status(&root),
        ServiceCmd::Run => service::run_service(run_as_service).map(|()| String::new()),
    };
    match r {
        Ok(msg) => {
            println!("{msg}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `agentd up`'s flags (no `Debug`: it would print the pre-auth key).
#[derive(clap::Args)]
struct UpArgs {
    /// The control server (controld or Headscale), e.g. https://control.example.com.
    #[arg(long, env = "AGENTD_LOGIN_SERVER")]
    login_server: String,
    /// A pre-auth key; without one (and without earlier registration) agentd prints a
    /// login URL to open. On the command line every local user can read it: prefer
    /// --auth-key-file or the environment variable.
    #[arg(long, env = "AGENTD_AUTH_KEY", hide_env_values = true)]
    auth_key: Option<String>,
    /// Read the pre-auth key from this file (`-`: standard input).
    #[arg(long, env = "AGENTD_AUTH_KEY_FILE", conflicts_with = "auth_key")]
    auth_key_file: Option<PathBuf>,
    /// This device's name in the network (default: the host name).
    #[arg(long)]
    hostname: Option<String>,
    /// Where keys are kept (default: /var/lib/agentd for root on Linux, else the
    /// per-user data directory).
    #[arg(long, env = "AGENTD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// UDP port for WireGuard and disco (0 = any).
    #[arg(long, default_value_t = 41641)]
    port: u16,
    /// Name of the TUN device.
    #[arg(long, default_value = "agentd0")]
    tun: String,
    /// The local API's Unix socket (default: /run/agentd/agentd.sock for root).
    #[arg(long, env = "AGENTD_SOCKET")]
    socket: Option<PathBuf>,
    /// Log filter, `RUST_LOG` syntax (e.g. info, debug, agent=debug); `RUST_LOG` wins.
    #[arg(long, default_value = "info", env = "AGENTD_LOG")]
    log_level: String,
    /// `text` (plain when not on a terminal, as journald wants it) or `json` (one object
    /// per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Append logs to this file instead of writing them to stderr.
    #[arg(long)]
    log_file: Option<PathBuf>,
}

/// What the Windows service manager's agentd runs: `agentd up` with the service's
/// settings, keys and log file.
fn run_as_service(
    how: agent::service::ServiceRun,
    stop: agent::service::Shutdown,
) -> anyhow::Result<()> {
    let login_server = how
        .settings
        .login_server
        .context("no login server in the service's settings: run `agentd service install --login-server URL`")?;
    let mut argv = vec![
        "agentd".to_string(),
        "up".into(),
        "--login-server".into(),
        login_server,
    ];
    argv.extend(["--state-dir".into(), how.state_dir.display().to_string()]);
    if let Some(f) = &how.log_file {
        argv.extend(["--log-file".into(), f.display().to_string()]);
    }
    let Command::Up(mut a) = Cli::try_parse_from(argv)?.command else {
        anyhow::bail!("internal: `up` did not parse as `up`");
    };
    a.auth_key = how.settings.auth_key;
    up(a, stop)
}

/// Longest pre-auth key file read (keys are well under 100 bytes).
const MAX_AUTH_KEY_FILE: u64 = 4096;

/// Reads a pre-auth key from `path` (`-`: standard input), trimmed. The key itself is
/// never part of an error.
fn read_auth_key(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    let what = if path == std::path::Path::new("-") {
        std::io::stdin()
            .take(MAX_AUTH_KEY_FILE)
            .read_to_string(&mut text)
            .context("reading the pre-auth key from standard input")?;
        "standard input".to_string()
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_AUTH_KEY_FILE).read_to_string(&mut text))
            .with_context(|| format!("reading the pre-auth key file {}", path.display()))?;
        path.display().to_string()
    };
    let key = text.trim();
    anyhow::ensure!(!key.is_empty(), "no pre-auth key in {what}");
    anyhow::ensure!(
        !key.contains(char::is_whitespace),
        "{what} holds more than one word; it should hold only the pre-auth key"
    );
    Ok(key.to_string())
}

/// Whether the pre-auth key was given as a command-line argument (readable by every
/// local user in /proc/<pid>/cmdline for the life of the process).
fn auth_key_on_command_line() -> bool {
    std::env::args_os()
        .filter_map(|a| a.into_string().ok())
        .any(|a| a == "--auth-key" || a.starts_with("--auth-key="))
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "device".into())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Service(cmd) => service(cmd),
        Command::Up(a) => match up(a, Box::pin(shutdown_signal())) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("agentd: {e:#}");
                }
                std::process::ExitCode::FAILURE
            }
        },
    }
}

fn up(a: UpArgs, shutdown: agent::service::Shutdown) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&f).context("bad RUST_LOG filter")?
        }
        _ => tracing_subscriber::EnvFilter::try_new(&a.log_level)
            .context("bad --log-level filter")?,
    };
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let (writer, terminal) = match &a.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the log file {}", path.display()))?;
            (BoxMakeWriter::new(std::sync::Mutex::new(file)), false)
        }
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if a.log_format == "json" {
        logs.json().init();
    } else {
        logs.with_ansi(terminal).init();
    }
    if a.auth_key.is_some() && auth_key_on_command_line() {
        tracing::warn!(
            "the pre-auth key is on the command line, where every local user can read it: \
             use --auth-key-file PATH (or - for standard input) or AGENTD_AUTH_KEY instead"
        );
    }
    let auth_key = match &a.auth_key_file {
        Some(f) => Some(read_auth_key(f)?),
        None => a.auth_key,
    };
    let cfg = agent::engine::Config {
        login_server: a
            .login_server
            .parse()
            .with_context(|| format!("bad --login-server {:?}", a.login_server))?,
        auth_key,
        hostname: a.hostname.unwrap_or_else(hostname),
        state_dir: a.state_dir.unwrap_or_else(agent::state::default_state_dir),
        port: a.port,
        tun_name: a.tun,
        socket: a
            .socket
            .unwrap_or_else(proto::localapi::default_socket_path),
    };
    // One thread: the data path is one task, and handing packets between threads costs
    // more (wake-ups, cache misses) than it gains on small machines.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(agent::engine::run(cfg, shutdown))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
