//! The local API server: HTTP/1.1 with JSON bodies on a Unix socket, or a named pipe on
//! Windows (documents in `proto::localapi`). Each connection carries one request; the
//! engine answers queries through a bounded channel, so the API never touches engine
//! state directly.
//!
//! The socket is created mode 0660, group `agentd` when that group exists, so root and
//! members of the group can use agentctl. A stale socket file (left by a crash) is
//! replaced; a live one (another agentd) is an error. The named pipe admits LocalSystem and
//! Administrators only (`winpipe.rs`), refuses remote clients, and is claimed as a first
//! instance: a second agentd fails instead of sharing it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::localapi::{
    query_value, ApiError, FilterStatus, NetcheckResult, PeerStatus, PingResult, Status, Version,
};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, oneshot};

/// Version of the API's paths (`/v1/…`).
pub const API_VERSION: u32 = 1;
/// Largest request head we read.
const MAX_REQUEST: usize = 8 << 10;
/// A client gets this long to send its request, and the engine to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// A fresh netcheck report takes up to 5 s (more with the HTTPS fallback).
const NETCHECK_TIMEOUT: Duration = Duration::from_secs(8);
/// Connections served at once (more wait in the kernel's backlog).
const MAX_CONNS: usize = 32;

/// A question for the engine.
#[derive(Debug)]
pub enum Query {
    Status(oneshot::Sender<Status>),
    /// The packet filter in force.
    Filter(oneshot::Sender<FilterStatus>),
    Whois(IpAddr, oneshot::Sender<Option<PeerStatus>>),
    /// A disco ping to the peer named (or addressed) `peer`; the answer comes when the
    /// pong does (the API side gives up after its timeout).
    Ping(String, oneshot::Sender<Result<PingResult, PingError>>),
    /// A fresh netcheck report (answered when the next report is ready).
    Netcheck(oneshot::Sender<NetcheckResult>),
    /// Connect again after `Down`.
    Up(oneshot::Sender<()>),
    /// Disconnect from control, remove the tunnel; the daemon keeps running.
    Down(oneshot::Sender<()>),
}

/// Why a ping was not sent. The status code tells agentctl whether trying again helps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PingError {
    /// No such peer (404): trying again will not help.
    NoSuchPeer(String),
    /// Not possible yet (503): no disco key or no path yet, too many pings in flight.
    NotYet(String),
}

/// The running server; the socket file is removed on drop.
#[derive(Debug)]
pub struct ApiServer {
    #[cfg_attr(not(unix), allow(dead_code))] // only a socket file needs removing
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        // A socket file stays behind when its listener closes; a pipe goes by itself.
        #[cfg(unix)]
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` and serves queries through `engine`.
#[cfg(unix)]
pub fn serve(path: &Path, engine: mpsc::Sender<Query>) -> anyhow::Result<ApiServer> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt as _;

    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agentd is already serving {} (stop it first)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the local API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    match nix::unistd::Group::from_name("agentd") {
        Ok(Some(g)) => {
            if let Err(e) = nix::unistd::chown(path, None, Some(g.gid)) {
                tracing::warn!(
                    socket = %path.display(),
                    error = %e,
                    "cannot give the local API socket to group agentd: only root can use agentctl \
                     (run agentd in group agentd, as agentd.service does, or with CAP_CHOWN)"
                );
            }
        }
        Ok(None) => tracing::info!(
            socket = %path.display(),
            "no group agentd: only root can use agentctl (`groupadd --system agentd` to let its members)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot look up group agentd"),
    }
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            serve_conn(stream, &limit, &engine).await;
        }
    });
    Ok(ApiServer {
        path: path.to_path_buf(),
        task,
    })
}

/// Creates the named pipe `path` and serves queries through `engine`.
#[cfg(windows)]
pub fn serve(path: &Path, engine: mpsc::Sender<Query>) -> anyhow::Result<ApiServer> {
    use anyhow::Context as _;
    use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};

    let name = path.as_os_str().to_owned();
    let security = crate::winpipe::PipeSecurity::admins_only();
    if security.is_none() {
        tracing::warn!("cannot build the pipe's access list; Windows' default security applies");
    }
    let create = move |first: bool| -> std::io::Result<NamedPipeServer> {
        let mut opts = ServerOptions::new();
        opts.first_pipe_instance(first).reject_remote_clients(true);
        match &security {
            Some(s) => s.create(&opts, &name),
            None => opts.create(&name),
        }
    };
    let mut next = create(true).with_context(|| {
        format!(
            "creating the local API pipe {} (is another agentd running? is this an administrator?)",
            path.display()
        )
    })?;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
    let task = tokio::spawn(async move {
        loop {
            let connected = next.connect().await.is_ok();
            // A pipe instance serves one client (or failed); a fresh one waits for the next.
            let fresh = match create(false) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "local API pipe lost; agentctl cannot reach agentd");
                    return;
                }
            };
            let conn = std::mem::replace(&mut next, fresh);
            if connected {
                serve_conn(conn, &limit, &engine).await;
            }
        }
    });
    Ok(ApiServer {
        path: path.to_path_buf(),
        task,
    })
}

/// Serves one connection in a task of its own once one of the `MAX_CONNS` slots is free.
#[cfg(any(unix, windows))]
async fn serve_conn<S>(
    stream: S,
    limit: &std::sync::Arc<tokio::sync::Semaphore>,
    engine: &mpsc::Sender<Query>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The semaphore is never closed: acquiring only waits.
    let Ok(permit) = std::sync::Arc::clone(limit).acquire_owned().await else {
        return;
    };
    let engine = engine.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(TIMEOUT * 2, handle(stream, engine)).await;
        drop(permit);
    });
}

#[cfg(not(any(unix, windows)))]
pub fn serve(path: &Path, _engine: mpsc::Sender<Query>) -> anyhow::Result<ApiServer> {
    anyhow::bail!(
        "the local API ({}) needs a Unix socket or a Windows named pipe",
        path.display()
    )
}

/// A response: status code and JSON body.
type Reply = (u16, String);

fn json<T: serde::Serialize>(v: &T) -> Reply {
    match serde_json::to_string_pretty(v) {
        Ok(s) => (200, s),
        Err(e) => error(500, &e.to_string()),
    }
}

fn error(code: u16, msg: &str) -> Reply {
    let body = serde_json::to_string(&ApiError {
        error: msg.to_string(),
    })
    .unwrap_or_default();
    (code, body)
}

async fn handle<S>(mut stream: S, engine: mpsc::Sender<Query>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // The request head (one read loop for all of the project's HTTP: netbase's).
    let head =
        match tokio::time::timeout(TIMEOUT, netbase::http::read_head(&mut stream, MAX_REQUEST))
            .await
        {
            Ok(Ok((head, _))) => head,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                let _ = write_reply(&mut stream, error(431, "request too large")).await;
                return;
            }
            _ => return,
        };
    let reply = match netbase::http::RequestHead::parse(&head) {
        Some(req) => route(&req.method, &req.path, &req.query, &engine).await,
        None => error(400, "malformed request"),
    };
    let _ = write_reply(&mut stream, reply).await;
}

async fn write_reply<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    (code, body): Reply,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        504 => "Gateway Timeout",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(body.as_bytes()).await?;
    w.shutdown().await
}

async fn ask<T>(
    engine: &mpsc::Sender<Query>,
    q: impl FnOnce(oneshot::Sender<T>) -> Query,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    engine.send_timeout(q(tx), TIMEOUT).await.ok()?;
    tokio::time::timeout(TIMEOUT, rx).await.ok()?.ok()
}

async fn route(method: &str, path: &str, query: &str, engine: &mpsc::Sender<Query>) -> Reply {
    let post = matches!(path, "/v1/up" | "/v1/down");
    if (post && method != "POST") || (!post && method != "GET") {
        return error(405, if post { "use POST" } else { "use GET" });
    }
    match path {
        "/v1/up" => match ask(engine, Query::Up).await {
            Some(()) => json(&serde_json::json!({ "state": "up" })),
            None => error(503, "agentd is busy or shutting down"),
        },
        "/v1/down" => match ask(engine, Query::Down).await {
            Some(()) => json(&serde_json::json!({ "state": "down" })),
            None => error(503, "agentd is busy or shutting down"),
        },
        "/v1/version" => json(&Version {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api: API_VERSION,
        }),
        "/v1/status" => match ask(engine, Query::Status).await {
            Some(s) => json(&s),
            None => error(503, "agentd is busy or shutting down"),
        },
        "/v1/filter" => match ask(engine, Query::Filter).await {
            Some(f) => json(&f),
            None => error(503, "agentd is busy or shutting down"),
        },
        "/v1/whois" => {
            let Some(ip) = query_value(query, "ip").and_then(|s| s.parse::<IpAddr>().ok()) else {
                return error(400, "want ?ip=ADDRESS");
            };
            match ask(engine, |tx| Query::Whois(ip, tx)).await {
                Some(Some(p)) => json(&p),
                Some(None) => error(404, &format!("no peer has the address {ip}")),
                None => error(503, "agentd is busy or shutting down"),
            }
        }
        "/v1/netcheck" => {
            let (tx, rx) = oneshot::channel();
            if engine
                .send_timeout(Query::Netcheck(tx), TIMEOUT)
                .await
                .is_err()
            {
                return error(503, "agentd is busy or shutting down");
            }
            match tokio::time::timeout(NETCHECK_TIMEOUT, rx).await {
                Ok(Ok(r)) => json(&r),
                _ => error(504, "no netcheck report within 8 s"),
            }
        }
        "/v1/ping" => {
            let Some(peer) = query_value(query, "peer").filter(|p| !p.is_empty()) else {
                return error(400, "want ?peer=NAME_OR_ADDRESS");
            };
            let wait = query_value(query, "timeout_ms")
                .and_then(|t| t.parse::<u64>().ok())
                .map_or(Duration::from_secs(2), Duration::from_millis)
                .min(TIMEOUT);
            let (tx, rx) = oneshot::channel();
            if engine
                .send_timeout(Query::Ping(peer.clone(), tx), TIMEOUT)
                .await
                .is_err()
            {
                return error(503, "agentd is busy or shutting down");
            }
            match tokio::time::timeout(wait, rx).await {
                Ok(Ok(Ok(r))) => json(&r),
                Ok(Ok(Err(PingError::NoSuchPeer(e)))) => error(404, &e),
                Ok(Ok(Err(PingError::NotYet(e)))) => error(503, &e),
                Ok(Err(_)) => error(503, "agentd is shutting down"),
                Err(_) => error(504, &format!("no pong from {peer} within {wait:?}")),
            }
        }
        _ => error(404, &format!("no such API path: {path}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        assert_eq!(
            query_value("ip=100.64.0.1&x=1", "ip").as_deref(),
            Some("100.64.0.1")
        );
        assert_eq!(
            query_value("peer=my%20laptop", "peer").as_deref(),
            Some("my laptop")
        );
        assert_eq!(query_value("", "ip"), None);
    }

    /// What `handle` answers to `request`: the status line.
    async fn status_line(request: &[u8]) -> String {
        use tokio::io::AsyncReadExt as _;
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let (tx, _rx) = mpsc::channel(1);
        let server = tokio::spawn(handle(server, tx));
        client.write_all(request).await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        server.await.unwrap();
        String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test]
    async fn connections_get_a_status_line_for_good_bad_and_oversized_requests() {
        let ok = status_line(b"GET /v1/version HTTP/1.1\r\nHost: agentd\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let bad = status_line(b"\x00\x01 nonsense\r\n\r\n").await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        let mut huge = b"GET /v1/version HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST + 1));
        let big = status_line(&huge).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    }

    #[tokio::test]
    async fn routes_answer_and_reject() {
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(q) = rx.recv().await {
                match q {
                    Query::Status(r) => {
                        let _ = r.send(Status {
                            state: proto::localapi::BackendState::Running,
                            ..Default::default()
                        });
                    }
                    Query::Whois(_, r) => {
                        let _ = r.send(None);
                    }
                    Query::Filter(r) => {
                        let _ = r.send(FilterStatus {
                            rules: vec!["accept tcp from * to 100.64.0.1/32:22".into()],
                            ..Default::default()
                        });
                    }
                    Query::Ping(_, r) => {
                        let _ = r.send(Err(PingError::NoSuchPeer("no such peer".into())));
                    }
                    Query::Netcheck(_) => {}
                    Query::Up(r) | Query::Down(r) => {
                        let _ = r.send(());
                    }
                }
            }
        });
        let (code, body) = route("GET", "/v1/status", "", &tx).await;
        assert_eq!(code, 200);
        assert!(body.contains("Running"));
        assert_eq!(route("GET", "/v1/whois", "ip=100.64.0.9", &tx).await.0, 404);
        assert_eq!(route("GET", "/v1/whois", "", &tx).await.0, 400);
        assert_eq!(route("POST", "/v1/status", "", &tx).await.0, 405);
        assert_eq!(route("GET", "/v1/down", "", &tx).await.0, 405);
        assert_eq!(route("POST", "/v1/down", "", &tx).await.0, 200);
        assert_eq!(route("GET", "/v2/status", "", &tx).await.0, 404);
        assert_eq!(route("GET", "/v1/version", "", &tx).await.0, 200);
        let (code, body) = route("GET", "/v1/filter", "", &tx).await;
        assert_eq!(code, 200);
        assert!(body.contains("100.64.0.1/32:22"), "{body}");
    }
}
