//! `controld`: the coordination server and its admin commands. See `controld --help`.
// A command-line program reports results and fatal errors to the person who ran it.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use control::server::mapper::rfc3339;
use control::server::store::{SqliteStore, Store};
use control::server::{ControlConfig, ControlServer};
use proto::{MachinePrivate, RelayMap};

/// controld: the coordination server of an agentd network (ts2021, Headscale-compatible).
///
/// `controld serve` runs the server; the other commands administer its database and may
/// run while the server does (changes reach connected devices within a second).
#[derive(Parser, Debug)]
#[command(name = "controld", version, about)]
struct Cli {
    /// Database file (SQLite). [default: /var/lib/controld/controld.db]
    #[arg(long, global = true, value_name = "FILE", env = "CONTROLD_DB")]
    db: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Manage pre-auth keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Manage nodes.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Access policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Check a policy file (syntax, names, ports, and its `tests` section) without a
    /// server: exits 0 when `controld serve --policy FILE` would accept it.
    Check { file: PathBuf },
}

#[derive(Args, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServeArgs {
    /// TOML file with any of these settings (same names without dashes); flags win.
    #[arg(long, short = 'c', value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Listen address. [default: [::]:443, or 127.0.0.1:8080 with --dev]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Plain HTTP on loopback defaults (development, or behind a TLS proxy).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    dev: Option<bool>,
    /// TLS certificate chain (PEM). Required unless --dev.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The relay map served to every node (DERPMap JSON).
    #[arg(long, value_name = "FILE")]
    relay_map: Option<PathBuf>,
    /// Control (Noise) private key; created with mode 0600 if missing.
    /// [default: next to the database, control.key]
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// DNS suffix of node names. [default: agentd.internal]
    #[arg(long, value_name = "DOMAIN")]
    domain: Option<String>,
    /// Access policy (Tailscale's policy file format, HuJSON: groups, hosts, tagOwners,
    /// acls, grants, tests). Reloaded when the file changes and on SIGHUP; an invalid
    /// edit is refused and the policy in force stays. Without it every device may reach
    /// every other.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Log filter. [default: info]
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

#[derive(Subcommand, Debug)]
enum UsersCmd {
    /// Create a user.
    Create { name: String },
    /// List users.
    List,
}

#[derive(Subcommand, Debug)]
enum KeysCmd {
    /// Create a pre-auth key (printed once; only its hash is stored).
    Create {
        /// The user the key registers nodes for.
        #[arg(long)]
        user: String,
        /// The key can register any number of nodes.
        #[arg(long)]
        reusable: bool,
        /// Nodes registered with it are ephemeral.
        #[arg(long)]
        ephemeral: bool,
        /// How long the key is valid (e.g. 30m, 24h, 7d).
        #[arg(long, default_value = "24h")]
        expiration: String,
        /// ACL tags for the nodes it registers, comma-separated (`tag:server,tag:web`).
        /// A tagged node is owned by its tags in the policy, not by the user.
        #[arg(long, value_delimiter = ',', value_name = "TAGS")]
        tags: Vec<String>,
    },
    /// List pre-auth keys (prefixes only).
    List,
    /// Expire a key now.
    Expire { id: i64 },
}

#[derive(Subcommand, Debug)]
enum NodesCmd {
    /// List nodes.
    List,
    /// Delete a node: it disappears from every peer list and loses relay access.
    Delete { id: i64 },
    /// Expire a node's key now: it must log in again.
    Expire { id: i64 },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("controld: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn open_store(db: &Path) -> anyhow::Result<SqliteStore> {
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    SqliteStore::open(db).with_context(|| format!("cannot open database {}", db.display()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let db = cli
        .db
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/controld/controld.db"));
    match cli.command {
        Command::Serve(args) => serve(args, &db),
        Command::Policy(PolicyCmd::Check { file }) => {
            control::server::check_policy_file(&file).map_err(anyhow::Error::msg)?;
            println!("{}: valid", file.display());
            Ok(())
        }
        Command::Users(cmd) => {
            let store = open_store(&db)?;
            match cmd {
                UsersCmd::Create { name } => {
                    let u = store.create_user(&name, now())?;
                    println!("created user {} (id {})", u.name, u.id);
                }
                UsersCmd::List => {
                    println!("{:<6} {:<24} CREATED", "ID", "NAME");
                    for u in store.users()? {
                        println!("{:<6} {:<24} {}", u.id, u.name, rfc3339(u.created));
                    }
                }
            }
            Ok(())
        }
        Command::Keys(cmd) => {
            let store = open_store(&db)?;
            match cmd {
                KeysCmd::Create {
                    user,
                    reusable,
                    ephemeral,
                    expiration,
                    tags,
                } => {
                    for t in &tags {
                        control::server::policy::check_tag(t).map_err(anyhow::Error::msg)?;
                    }
                    let u = store.user_by_name(&user)?.with_context(|| {
                        format!("no user {user:?}: create it with `controld users create {user}`")
                    })?;
                    let d = parse_duration(&expiration)?;
                    let t = now();
                    let (key, rec) = store.create_preauth_key(
                        u.id,
                        reusable,
                        ephemeral,
                        &tags,
                        t + d.as_secs() as i64,
                        t,
                    )?;
                    eprintln!(
                        "created key {} for {} (expires {}); it is shown only now:",
                        rec.id,
                        u.name,
                        rfc3339(rec.expires)
                    );
                    println!("{key}");
                }
                KeysCmd::List => {
                    let t = now();
                    println!(
                        "{:<5} {:<18} {:<6} {:<9} {:<10} {:<5} {:<21} TAGS",
                        "ID", "PREFIX", "USER", "REUSABLE", "EPHEMERAL", "USED", "EXPIRES"
                    );
                    for k in store.preauth_keys()? {
                        let exp = if k.expires <= t {
                            "expired".to_string()
                        } else {
                            rfc3339(k.expires)
                        };
                        println!(
                            "{:<5} {:<18} {:<6} {:<9} {:<10} {:<5} {exp:<21} {}",
                            k.id,
                            format!("{}…", k.prefix),
                            k.user_id,
                            k.reusable,
                            k.ephemeral,
                            k.used,
                            k.tags.join(",")
                        );
                    }
                }
                KeysCmd::Expire { id } => {
                    store.expire_preauth_key(id, now())?;
                    println!("expired key {id}");
                }
            }
            Ok(())
        }
        Command::Nodes(cmd) => {
            let store = open_store(&db)?;
            match cmd {
                NodesCmd::List => {
                    let t = now();
                    println!(
                        "{:<5} {:<20} {:<16} {:<24} {:<6} {:<8} {:<12} TAGS",
                        "ID", "HOSTNAME", "IPV4", "IPV6", "HOME", "EXPIRED", "NODE KEY"
                    );
                    for n in store.nodes()? {
                        println!(
                            "{:<5} {:<20} {:<16} {:<24} {:<6} {:<8} {:<12} {}",
                            n.id,
                            n.hostname,
                            n.ipv4,
                            n.ipv6,
                            n.home_derp,
                            n.is_expired(t),
                            n.node_key.short().to_string(),
                            n.tags.join(",")
                        );
                    }
                }
                NodesCmd::Delete { id } => {
                    store.delete_node(id)?;
                    println!("deleted node {id}");
                }
                NodesCmd::Expire { id } => {
                    store.expire_node(id, now())?;
                    println!("expired node {id}");
                }
            }
            Ok(())
        }
    }
}

fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    if let Some(days) = s.strip_suffix('d') {
        let d: u64 = days
            .parse()
            .with_context(|| format!("bad duration {s:?}"))?;
        return Ok(Duration::from_secs(d * 86_400));
    }
    humantime::parse_duration(s)
        .with_context(|| format!("bad duration {s:?} (use e.g. 30m, 24h, 7d)"))
}

fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    Ok(netbase::tls::load_server_config(cert, key, &[])?)
}

fn serve(mut args: ServeArgs, db: &Path) -> anyhow::Result<()> {
    if let Some(path) = args.config.clone() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file: ServeArgs = toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display()))?;
        args.listen = args.listen.or(file.listen);
        args.dev = args.dev.or(file.dev);
        args.tls_cert = args.tls_cert.or(file.tls_cert);
        args.tls_key = args.tls_key.or(file.tls_key);
        args.relay_map = args.relay_map.or(file.relay_map);
        args.key_file = args.key_file.or(file.key_file);
        args.domain = args.domain.or(file.domain);
        args.policy = args.policy.or(file.policy);
        args.log_level = args.log_level.or(file.log_level);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(args.log_level.as_deref().unwrap_or("info"))
        })
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let dev = args.dev.unwrap_or(false);
    let listen = args.listen.clone().unwrap_or_else(|| {
        if dev {
            "127.0.0.1:8080".into()
        } else {
            "[::]:443".into()
        }
    });
    let listen = std::net::ToSocketAddrs::to_socket_addrs(&listen)
        .with_context(|| format!("bad --listen {listen:?}"))?
        .next()
        .context("--listen has no address")?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(load_tls(c, k)?),
        (None, None) if dev => None,
        (None, None) => {
            bail!("controld needs --tls-cert and --tls-key (PEM files), or --dev for plain HTTP")
        }
        _ => bail!("give both --tls-cert and --tls-key"),
    };
    let relay_map_path = args
        .relay_map
        .as_ref()
        .context("controld needs --relay-map FILE: the DERPMap JSON of your relays (see README)")?;
    let relay_map = RelayMap::load(relay_map_path)?;
    let key_file = args
        .key_file
        .clone()
        .unwrap_or_else(|| db.with_file_name("control.key"));
    let store = Arc::new(open_store(db)?);
    let (control_key, created) =
        proto::secretfile::load_or_create(&key_file, MachinePrivate::generate)?;
    if created {
        tracing::info!(path = %key_file.display(), "created a new control key");
    }
    let mut cfg = ControlConfig::new(listen, control_key, relay_map);
    cfg.tls = tls;
    if let Some(d) = args.domain {
        cfg.domain = d;
    }
    cfg.policy = args.policy;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let server = ControlServer::start(cfg, store)
            .await
            .context("controld could not start")?;
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let mut hup = signal(SignalKind::hangup())?;
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => match server.reload_policy().await {
                        Ok(true) => tracing::info!("SIGHUP: access policy reloaded"),
                        Ok(false) => tracing::info!("SIGHUP: access policy unchanged"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: the policy is refused; the previous one stays in force"),
                    },
                }
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        tracing::info!("controld stopping");
        server.shutdown();
        anyhow::Ok(())
    })
}
