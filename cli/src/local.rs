//! The client side of agentd's local API (HTTP/1.1 + JSON on a Unix socket, see
//! `proto::localapi`), and the commands built on it: `status`, `ip`, `whois`, `version`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use proto::localapi::{ApiError, ControlState, PeerPath, PeerStatus, PingVia, Status, Version};
use serde::de::DeserializeOwned;

/// How long a request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Which agentd to talk to.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// agentd's local API socket (default: the system daemon's /run/agentd/agentd.sock
    /// when it exists, else this user's own).
    #[arg(long, global = true, env = "AGENTD_SOCKET")]
    pub socket: Option<PathBuf>,
}

impl Conn {
    fn path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(proto::localapi::default_client_socket_path)
    }

    /// `GET path`, decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call("GET", path).await
    }

    /// `POST path`, decoded as `T`.
    pub async fn post<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call("POST", path).await
    }

    async fn call<T: DeserializeOwned>(&self, method: &str, path: &str) -> anyhow::Result<T> {
        let sock = self.path();
        let body = tokio::time::timeout(TIMEOUT, request(&sock, method, path))
            .await
            .map_err(|_| {
                anyhow!(
                    "agentd did not answer within {TIMEOUT:?} ({})",
                    sock.display()
                )
            })??;
        serde_json::from_slice(&body).context("agentd sent a malformed answer")
    }
}

#[cfg(unix)]
async fn request(sock: &Path, method: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    let s = match tokio::net::UnixStream::connect(sock).await {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow!(
                    "agentd is not running (nothing answers at {}); start it with `sudo agentd up --login-server URL`",
                    sock.display()
                ),
                std::io::ErrorKind::PermissionDenied => anyhow!(
                    "permission denied on {}: run as root or join the `agentd` group",
                    sock.display()
                ),
                _ => anyhow!("cannot reach agentd at {}: {e}", sock.display()),
            })
        }
    };
    exchange(s, method, path).await
}

#[cfg(windows)]
async fn request(pipe: &Path, method: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    use tokio::net::windows::named_pipe::ClientOptions;
    /// ERROR_PIPE_BUSY: every instance is serving someone; wait and try again.
    const PIPE_BUSY: i32 = 231;
    let s = loop {
        match ClientOptions::new().open(pipe.as_os_str()) {
            Ok(s) => break s,
            Err(e) if e.raw_os_error() == Some(PIPE_BUSY) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(match e.kind() {
                    std::io::ErrorKind::NotFound => anyhow!(
                        "agentd is not running (nothing answers at {}); start it with `agentd up --login-server URL` or `agentd service install`",
                        pipe.display()
                    ),
                    std::io::ErrorKind::PermissionDenied => anyhow!(
                        "permission denied on {}: run agentctl as an administrator",
                        pipe.display()
                    ),
                    _ => anyhow!("cannot reach agentd at {}: {e}", pipe.display()),
                })
            }
        }
    };
    exchange(s, method, path).await
}

#[cfg(not(any(unix, windows)))]
async fn request(sock: &Path, _method: &str, _path: &str) -> anyhow::Result<Vec<u8>> {
    bail!(
        "talking to agentd at {} needs a Unix socket or a named pipe",
        sock.display()
    )
}

/// agentd answered, with an error status; it reads as agentd's message.
#[derive(Debug)]
pub struct Refused {
    pub code: u16,
    pub msg: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Refused {}

/// One request and its answer's body (an error answer becomes a [`Refused`]).
#[cfg(any(unix, windows))]
async fn exchange<S>(mut s: S, method: &str, path: &str) -> anyhow::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: agentd\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    s.take(16 << 20).read_to_end(&mut resp).await?;
    let Some(split) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("agentd sent a malformed answer");
    };
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let body = resp[split + 4..].to_vec();
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("agentd sent a malformed answer"))?;
    if code != 200 {
        let msg = serde_json::from_slice::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("HTTP {code}"));
        return Err(Refused { code, msg }.into());
    }
    Ok(body)
}

#[allow(clippy::print_stdout)]
fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `agentctl status`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  agentctl status\n  agentctl status --json | jq '.peers[] | {name, path}'"
)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

fn human_bytes(n: u64) -> String {
    match n {
        0..=9_999 => format!("{n} B"),
        10_000..=9_999_999 => format!("{:.1} KB", n as f64 / 1e3),
        10_000_000..=9_999_999_999 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}

fn ago(secs: Option<f64>) -> String {
    match secs {
        None => "never".into(),
        Some(s) if s < 1.0 => "just now".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s ago"),
        Some(s) => format!("{:.0}m ago", s / 60.0),
    }
}

fn first_v4(addrs: &[String]) -> String {
    addrs
        .iter()
        .map(|a| a.split('/').next().unwrap_or_default())
        .find(|a| !a.contains(':'))
        .or_else(|| {
            addrs
                .first()
                .map(|a| a.split('/').next().unwrap_or_default())
        })
        .unwrap_or("-")
        .to_string()
}

/// The first label of a node's DNS name (`bob` of `bob.agentd.internal`).
fn short_name(name: &str) -> String {
    name.split('.').next().unwrap_or(name).to_string()
}

/// The path column: `direct 203.0.113.5:41641`, `relay "Frankfurt"`, or `none`.
pub fn path_text(p: &PeerStatus) -> String {
    match p.path {
        PeerPath::Direct => format!("direct {}", p.direct.as_deref().unwrap_or("?")),
        PeerPath::Relay => format!(
            "relay {:?}",
            p.relay_region_name
                .clone()
                .unwrap_or_else(|| p.relay_region.unwrap_or_default().to_string())
        ),
        PeerPath::None => "none".into(),
        PeerPath::Unknown => "?".into(),
    }
}

/// Renders the status table.
pub fn render_status(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let me = &s.me;
    let home = match (&me.home_region_name, me.home_region, me.home_latency_ms) {
        (Some(n), _, Some(ms)) => format!("{n} ({ms:.1} ms)"),
        (Some(n), _, None) => n.clone(),
        (None, Some(r), _) => r.to_string(),
        _ => "none yet".into(),
    };
    let _ = writeln!(
        out,
        "{}  {}  {}  home relay: {}  control: {}",
        first_v4(&me.addresses),
        if me.name.is_empty() {
            "-".to_string()
        } else {
            short_name(&me.name)
        },
        me.os,
        home,
        match (s.control_state, &s.control_error) {
            (ControlState::Retrying, Some(e)) => format!("retrying ({e})"),
            // An older agentd says only whether it is connected.
            (ControlState::Unknown, _) if s.control_connected => "connected".to_string(),
            (ControlState::Unknown, _) => "not connected".to_string(),
            (state, _) => serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
        }
    );
    if let Some(why) = &me.ipv6_off {
        let _ = writeln!(out, "IPv6: off on this host ({why})");
    }
    if let Some(url) = &s.auth_url {
        let _ = writeln!(out, "\nLog in to add this device: {url}");
    }
    if s.peers.is_empty() {
        let _ = writeln!(out, "\nNo peers yet.");
        return out;
    }
    out.push('\n');
    let rows: Vec<[String; 8]> = s
        .peers
        .iter()
        .map(|p| {
            [
                first_v4(&p.addresses),
                short_name(&p.name),
                if p.os.is_empty() {
                    "-".into()
                } else {
                    p.os.clone()
                },
                match p.online {
                    _ if p.expired => "expired".into(),
                    Some(true) => "online".into(),
                    Some(false) => "offline".into(),
                    None => "-".into(),
                },
                path_text(p),
                ago(p.last_handshake_secs),
                format!(
                    "rx {} tx {}{}",
                    human_bytes(p.rx_bytes),
                    human_bytes(p.tx_bytes),
                    match p.denied {
                        0 => String::new(),
                        n => format!(" denied {n}"),
                    }
                ),
                if p.path == PeerPath::Direct {
                    String::new()
                } else {
                    p.reason.clone()
                },
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = String::new();
        for i in 0..7 {
            let _ = write!(line, "{:<w$}  ", r[i], w = widths[i]);
        }
        if !r[7].is_empty() {
            let _ = write!(line, "({})", r[7]);
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

#[allow(clippy::print_stdout)]
pub async fn status(conn: &Conn, a: StatusArgs) -> anyhow::Result<()> {
    let s: Status = conn.get("/v1/status").await?;
    if a.json {
        return print_json(&s);
    }
    print!("{}", render_status(&s));
    Ok(())
}

/// `agentctl ip`.
#[derive(Debug, clap::Args)]
pub struct IpArgs {
    /// Only the IPv4 address.
    #[arg(short = '4', conflicts_with = "v6")]
    pub v4: bool,
    /// Only the IPv6 address.
    #[arg(short = '6')]
    pub v6: bool,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[allow(clippy::print_stdout)]
pub async fn ip(conn: &Conn, a: IpArgs) -> anyhow::Result<()> {
    let s: Status = conn.get("/v1/status").await?;
    let addrs: Vec<String> =
        s.me.addresses
            .iter()
            .map(|x| x.split('/').next().unwrap_or_default().to_string())
            .filter(|x| (!a.v4 || !x.contains(':')) && (!a.v6 || x.contains(':')))
            .collect();
    if addrs.is_empty() {
        bail!("this device has no address yet (is it logged in? see `agentctl status`)");
    }
    if a.json {
        return print_json(&addrs);
    }
    for x in addrs {
        println!("{x}");
    }
    Ok(())
}

/// `agentctl whois`.
#[derive(Debug, clap::Args)]
pub struct WhoisArgs {
    /// A tunnel address (100.x or fd7a:…).
    pub ip: std::net::IpAddr,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[allow(clippy::print_stdout)]
pub async fn whois(conn: &Conn, a: WhoisArgs) -> anyhow::Result<()> {
    let p: PeerStatus = conn
        .get(&format!(
            "/v1/whois?ip={}",
            proto::localapi::encode_query_value(&a.ip.to_string())
        ))
        .await?;
    if a.json {
        return print_json(&p);
    }
    println!("Name:    {}", p.name);
    println!("Key:     {}", p.node_key);
    println!("OS:      {}", p.os);
    println!("Address: {}", p.addresses.join(", "));
    println!("Path:    {}", path_text(&p));
    Ok(())
}

/// `agentctl version`.
#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[allow(clippy::print_stdout)]
pub async fn version(conn: &Conn, a: VersionArgs) -> anyhow::Result<()> {
    let mine = env!("CARGO_PKG_VERSION");
    let daemon: Option<Version> = conn.get("/v1/version").await.ok();
    if a.json {
        return print_json(&serde_json::json!({
            "agentctl": mine,
            "agentd": daemon.as_ref().map(|v| v.version.clone()),
        }));
    }
    println!("agentctl {mine}");
    match daemon {
        Some(v) => println!("agentd   {} (local API v{})", v.version, v.api),
        None => println!("agentd   not running"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::localapi::BackendState;

    #[test]
    fn status_header_says_why_control_is_retrying_and_that_ipv6_is_off() {
        let s = Status {
            state: BackendState::Starting,
            control_state: ControlState::Retrying,
            control_error: Some("fetching the control key: timed out after 10 s".into()),
            me: proto::localapi::SelfStatus {
                os: "linux".into(),
                ipv6_off: Some("IPv6 is switched off (disable_ipv6)".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let t = render_status(&s);
        assert!(
            t.contains("control: retrying (fetching the control key: timed out after 10 s)"),
            "{t}"
        );
        assert!(
            t.contains("IPv6: off on this host (IPv6 is switched off (disable_ipv6))"),
            "{t}"
        );
        // An older agentd says only whether it is connected.
        let old = Status {
            control_connected: true,
            ..Default::default()
        };
        assert!(render_status(&old).contains("control: connected"));
    }

    #[test]
    fn status_table_shows_paths_and_why_relayed() {
        let s = Status {
            state: BackendState::Running,
            control_connected: true,
            me: proto::localapi::SelfStatus {
                name: "alice".into(),
                addresses: vec!["100.64.0.1/32".into(), "fd7a:115c:a1e0::1/128".into()],
                os: "linux".into(),
                home_region: Some(901),
                home_region_name: Some("Frankfurt".into()),
                home_latency_ms: Some(20.4),
                ..Default::default()
            },
            peers: vec![
                PeerStatus {
                    name: "bob".into(),
                    addresses: vec!["100.64.0.2/32".into()],
                    os: "linux".into(),
                    online: Some(true),
                    path: PeerPath::Direct,
                    direct: Some("198.51.100.11:41641".into()),
                    last_handshake_secs: Some(3.0),
                    rx_bytes: 1234,
                    tx_bytes: 20_000,
                    ..Default::default()
                },
                PeerStatus {
                    name: "carol".into(),
                    addresses: vec!["100.64.0.3/32".into()],
                    denied: 7,
                    expired: true,
                    path: PeerPath::Relay,
                    relay_region: Some(902),
                    relay_region_name: Some("Virginia".into()),
                    reason: "relay: pings unanswered since 5s ago".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let t = render_status(&s);
        assert!(
            t.starts_with("100.64.0.1  alice  linux  home relay: Frankfurt (20.4 ms)"),
            "{t}"
        );
        assert!(t.contains("direct 198.51.100.11:41641"), "{t}");
        assert!(t.contains("relay \"Virginia\""), "{t}");
        assert!(t.contains("(relay: pings unanswered since 5s ago)"), "{t}");
        assert!(t.contains("rx 1234 B tx 20.0 KB\n"), "{t}");
        assert!(t.contains("rx 0 B tx 0 B denied 7"), "{t}");
        assert!(t.contains("carol  -      expired"), "{t}");
    }
}

/// `agentctl ping`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  agentctl ping bob\n  agentctl ping 100.64.0.2 --count 20\n\nExits 0 at the first direct pong; 1 if no direct path answered (relayed pongs print but do not count)."
)]
pub struct PingArgs {
    /// The peer: its name (`bob` or `bob.agentd.internal`) or tunnel address.
    pub peer: String,
    /// Pings at most.
    #[arg(long, short = 'c', default_value_t = 10)]
    pub count: u32,
    /// How long to wait for each pong.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// One JSON object per ping.
    #[arg(long)]
    pub json: bool,
}

/// One line of `agentctl ping` output.
pub fn pong_text(r: &proto::localapi::PingResult) -> String {
    let via = match r.via {
        PingVia::Direct => r.endpoint.clone().unwrap_or_default(),
        PingVia::Relay | PingVia::Unknown => format!(
            "relay {:?}",
            r.relay_region_name
                .clone()
                .unwrap_or_else(|| r.relay_region.unwrap_or_default().to_string())
        ),
    };
    format!(
        "pong from {} ({}) via {via} in {:.1}ms",
        r.peer, r.address, r.latency_ms
    )
}

#[allow(clippy::print_stdout)]
pub async fn ping(conn: &Conn, a: PingArgs) -> anyhow::Result<()> {
    let path = format!(
        "/v1/ping?peer={}&timeout_ms={}",
        proto::localapi::encode_query_value(&a.peer),
        a.timeout.as_millis()
    );
    for i in 0..a.count.max(1) {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match conn.get::<proto::localapi::PingResult>(&path).await {
            Ok(r) => {
                if a.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!("{}", pong_text(&r));
                }
                if r.via == PingVia::Direct {
                    return Ok(());
                }
            }
            Err(e) => {
                // Only "not yet" (503) and "no pong in time" (504) are worth another
                // ping; no such peer, no daemon, no permission are not.
                let again = e
                    .downcast_ref::<Refused>()
                    .is_some_and(|r| matches!(r.code, 503 | 504));
                if !again {
                    return Err(e);
                }
                let msg = e.to_string();
                if a.json {
                    println!("{}", serde_json::json!({ "error": msg }));
                } else {
                    println!("{msg}");
                }
            }
        }
    }
    bail!(
        "direct connection not established (after {} pings)",
        a.count.max(1)
    )
}

/// `agentctl up` / `agentctl down`.
#[derive(Debug, clap::Args)]
pub struct UpDownArgs {
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[allow(clippy::print_stdout)]
pub async fn up_down(conn: &Conn, up: bool, a: UpDownArgs) -> anyhow::Result<()> {
    let path = if up { "/v1/up" } else { "/v1/down" };
    let v: serde_json::Value = conn.post(path).await?;
    if a.json {
        return print_json(&v);
    }
    if up {
        println!("agentd is connecting (see `agentctl status`)");
    } else {
        println!("agentd is down: disconnected from control, tunnel removed (`agentctl up` to reconnect)");
    }
    Ok(())
}
