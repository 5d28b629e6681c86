//! Helpers for relay integration tests: servers on real loopback listeners, clients,
//! a test certificate, raw HTTP requests, and a verify-URL server.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::{NodePrivate, NodePublic};
use relay::client::tls::{TlsSettings, TlsVerify};
use relay::client::{connect, RelayConn, RelayTarget};
use relay::frame::Frame;
use relay::handshake::ClientInfo;
use relay::server::{RunningServer, Server, ServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const WAIT: Duration = Duration::from_secs(10);

/// A config for a plain-HTTP server on loopback with STUN on loopback.
pub fn config() -> ServerConfig {
    let mut cfg = ServerConfig::new(NodePrivate::generate(), "127.0.0.1:0".parse().unwrap());
    cfg.stun_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg
}

pub async fn start(cfg: ServerConfig) -> RunningServer {
    Server::start(cfg).await.expect("server starts")
}

/// A self-signed certificate for `localhost`.
pub struct TestCert {
    pub der: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

pub fn test_cert() -> TestCert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    TestCert {
        der: ck.cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der())),
    }
}

pub fn tls_config(cert: &TestCert) -> Arc<rustls::ServerConfig> {
    relay::server::config::tls_server_config(vec![cert.der.clone()], cert.key.clone_key()).unwrap()
}

/// Target for a server: plain or TLS (trusting `cert`, SNI localhost), DERP or WebSocket.
pub fn target(addr: SocketAddr, cert: Option<&TestCert>, websocket: bool) -> RelayTarget {
    RelayTarget {
        host: "localhost".into(),
        port: addr.port(),
        dial_addrs: vec![addr],
        resolve: (false, false),
        tls: cert.map(|c| TlsSettings {
            server_name: "localhost".into(),
            verify: TlsVerify::Roots(vec![c.der.clone()]),
        }),
        websocket,
    }
}

pub fn plain(addr: SocketAddr) -> RelayTarget {
    target(addr, None, false)
}

pub async fn client(t: &RelayTarget) -> (NodePrivate, RelayConn) {
    let key = NodePrivate::generate();
    let conn = connect(t, &key, &ClientInfo::regular())
        .await
        .expect("client connects");
    (key, conn)
}

pub async fn client_with_key(t: &RelayTarget, key: &NodePrivate) -> RelayConn {
    connect(t, key, &ClientInfo::regular())
        .await
        .expect("client connects")
}

/// Waits for the next RecvPacket (skipping keepalives etc.).
pub async fn recv_packet(conn: &mut RelayConn) -> (NodePublic, Bytes) {
    tokio::time::timeout(WAIT, async {
        loop {
            match conn.reader.recv().await.expect("connection stays up") {
                Frame::RecvPacket { src, payload } => return (src, payload),
                _ => continue,
            }
        }
    })
    .await
    .expect("packet arrives in time")
}

/// Waits for a frame matching `pred`.
pub async fn recv_matching(conn: &mut RelayConn, pred: impl Fn(&Frame) -> bool) -> Frame {
    tokio::time::timeout(WAIT, async {
        loop {
            let f = conn.reader.recv().await.expect("connection stays up");
            if pred(&f) {
                return f;
            }
        }
    })
    .await
    .expect("frame arrives in time")
}

/// Asserts the server closes this connection soon.
pub async fn assert_closed(conn: &mut RelayConn) {
    let r = tokio::time::timeout(WAIT, async {
        loop {
            if conn.reader.recv().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(r.is_ok(), "server did not close the connection");
}

/// A disco-looking payload (magic + 62 bytes), so PeerGone(NotHere) rules apply.
pub fn disco_payload(tag: u8) -> Bytes {
    let mut p = vec![0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
    p.resize(100, tag);
    Bytes::from(p)
}

/// One HTTP/1.1 request over plain TCP; returns (status, head, body).
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    (status, head.to_string(), body.as_bytes().to_vec())
}

/// Reads a counter line from /metrics.
pub async fn metric(addr: SocketAddr, line_prefix: &str) -> u64 {
    let (_, _, body) = http_get(addr, "/metrics", &[]).await;
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix) && l[line_prefix.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {line_prefix} missing"))
}

/// A verify URL like Headscale's /verify: allows the node keys in the set.
pub struct VerifyServer {
    pub url: String,
    pub allowed: Arc<Mutex<HashSet<String>>>,
    pub requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for VerifyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn verify_server() -> VerifyServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/verify", listener.local_addr().unwrap());
    let allowed: Arc<Mutex<HashSet<String>>> = Default::default();
    let requests: Arc<Mutex<Vec<String>>> = Default::default();
    let (a, r) = (allowed.clone(), requests.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (a, r) = (a.clone(), r.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() < len {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(&body[..len]).unwrap();
                    let key = v["NodePublic"].as_str().unwrap_or_default().to_string();
                    assert!(
                        v["Source"].as_str().is_some(),
                        "verify request carries Source"
                    );
                    r.lock().unwrap().push(key.clone());
                    let allow = a.lock().unwrap().contains(&key);
                    let body = format!("{{\"Allow\":{allow}}}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    return;
                }
            });
        }
    });
    VerifyServer {
        url,
        allowed,
        requests,
        task,
    }
}

#[allow(unused_imports)] // not every program that includes this module uses both
pub use testkit::{free_port, KillOnDrop};

/// The built `relayd` binary running as a child process.
pub struct RelaydProcess {
    pub child: KillOnDrop,
    /// Where it listens (read from its "relay listening" log line).
    pub addr: SocketAddr,
    /// Its further log lines.
    pub logs: std::sync::mpsc::Receiver<String>,
}

/// Starts `relayd` with `args` and waits until it logs its listening address.
pub fn spawn_relayd(args: &[String]) -> RelaydProcess {
    use std::io::BufRead as _;
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_relayd"))
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("relayd starts"),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, logs) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let addr = loop {
        let line = logs.recv_timeout(WAIT).expect("relayd logs its address");
        if let Some(rest) = line.split("relay listening").nth(1) {
            let a = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .unwrap();
            break a.parse().unwrap();
        }
    };
    RelaydProcess { child, addr, logs }
}

/// PEM text of one DER object.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `cert` as `<name>.crt` and `<name>.key` PEM files in `dir`; returns both paths.
pub fn write_cert_files(
    cert: &TestCert,
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, pem("CERTIFICATE", &cert.der)).unwrap();
    std::fs::write(&k, pem("PRIVATE KEY", cert.key.secret_der())).unwrap();
    (c, k)
}

/// What a [`StallProxy`] lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Everything, both ways.
    Open,
    /// Nothing, either way; every socket stays open (a node whose packets are dropped,
    /// as a client sees it: no FIN, no RST, no answer).
    Blackhole,
    /// The server's bytes still reach the client, but the client's are no longer read
    /// (a server that stops reading: the client's writes back up and block).
    StopReading,
}

/// A TCP proxy in front of a relay that can be switched to a [`Flow`] at any time.
pub struct StallProxy {
    pub addr: SocketAddr,
    flow: tokio::sync::watch::Sender<Flow>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StallProxy {
    pub fn set(&self, flow: Flow) {
        self.flow.send_replace(flow);
    }
}

/// Copies `from` to `to` while `flow` lets this direction through; otherwise holds both
/// sockets open and moves nothing.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flow: tokio::sync::watch::Receiver<Flow>,
    passes: fn(Flow) -> bool,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if !passes(*flow.borrow_and_update()) {
            if flow.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            n = from.read(&mut buf) => {
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                // Bytes read just as the flow stopped are dropped, like packets.
                if passes(*flow.borrow()) && to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            r = flow.changed() => if r.is_err() { return },
        }
    }
}

/// A [`StallProxy`] to `upstream`, open at first.
pub async fn stall_proxy(upstream: SocketAddr) -> StallProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (flow, rx) = tokio::sync::watch::channel(Flow::Open);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            conns.spawn(pipe(cr, sw, rx.clone(), |f| f == Flow::Open));
            conns.spawn(pipe(sr, cw, rx.clone(), |f| f != Flow::Blackhole));
        }
    });
    StallProxy { addr, flow, task }
}
