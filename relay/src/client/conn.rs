//! One DERP connection: dial, TLS, HTTP or WebSocket upgrade, handshake; then a reader
//! and a writer half. No reconnection here (see `client::RelayClient`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::BytesMut;
use proto::relaymap::{NodeAddr, RelayNode};
use proto::{NodePrivate, NodePublic};
use rand::RngCore as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::tls::{client_config, TlsSettings, TlsVerify};
use crate::frame::{self, ty, Frame};
use crate::handshake::{self, ClientInfo, ServerInfo};
use netbase::http::{read_head, ResponseHead};

use crate::io::{write_flush, BoxStream, FrameReader, Prefixed, ReadError};
use crate::ws::{self, WsByteStream};

/// Budget for dial + TLS + upgrade + DERP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Budget for one TCP dial attempt to one address.
const DIAL_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the next address of a relay waits for the one before it.
const DIAL_STAGGER: Duration = Duration::from_millis(250);
/// Largest HTTP response head we read.
const MAX_HTTP_HEAD: usize = 16 << 10;

/// Where a relay is and how to reach it.
#[derive(Debug, Clone)]
pub struct RelayTarget {
    /// Host name for the `Host` header (and SNI unless `tls.server_name` says otherwise).
    pub host: String,
    pub port: u16,
    /// Connect to these addresses (IPv4 before IPv6, staggered: the first to answer
    /// wins)…
    pub dial_addrs: Vec<SocketAddr>,
    /// …and to what `host` resolves to in these families (IPv4, IPv6).
    pub resolve: (bool, bool),
    /// `None` = plain HTTP (development only).
    pub tls: Option<TlsSettings>,
    /// Use a WebSocket (subprotocol `derp`) instead of the `Upgrade: DERP` request.
    pub websocket: bool,
}

/// A relay URL or dial target is unusable.
#[derive(Debug, thiserror::Error)]
#[error("bad relay URL {url:?}: {why}")]
pub struct TargetError {
    url: String,
    why: &'static str,
}

impl RelayTarget {
    /// `http://`, `https://`, `ws://` or `wss://` + `host[:port]` (path, if any, ignored).
    pub fn parse_url(url: &str) -> Result<Self, TargetError> {
        let err = |why| TargetError {
            url: url.to_string(),
            why,
        };
        let (scheme, rest) = url.split_once("://").ok_or(err("missing scheme"))?;
        let (tls, websocket, default_port) = match scheme {
            "http" => (false, false, 80),
            "https" => (true, false, 443),
            "ws" => (false, true, 80),
            "wss" => (true, true, 443),
            _ => return Err(err("scheme must be http, https, ws or wss")),
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = split_host_port(authority, default_port).ok_or(err("bad host:port"))?;
        if host.is_empty() {
            return Err(err("empty host"));
        }
        Ok(RelayTarget {
            dial_addrs: Vec::new(),
            resolve: (true, true),
            tls: tls.then(|| TlsSettings {
                server_name: host.clone(),
                verify: TlsVerify::SystemRoots,
            }),
            host,
            port,
            websocket,
        })
    }

    /// The target for a relay-map node: TLS to `HostName:DERPPort`, honouring `CertName`
    /// (SNI, or a `sha256-raw:` pin) and `InsecureForTests`. Each family's address is the
    /// fixed `IPv4`/`IPv6` when given, none when it is `"none"`, else what `HostName`
    /// resolves to; IPv4 is dialled first, IPv6 a moment later.
    pub fn from_node(node: &RelayNode) -> Self {
        let mut server_name = node.host_name.clone();
        let mut verify = TlsVerify::SystemRoots;
        if let Some(pin) = node.cert_name.strip_prefix("sha256-raw:") {
            let mut h = [0u8; 32];
            if hex::decode_to_slice(pin, &mut h).is_ok() {
                verify = TlsVerify::PinnedSha256(h);
            }
        } else if !node.cert_name.is_empty() {
            server_name = node.cert_name.clone();
        }
        if node.insecure_for_tests {
            verify = TlsVerify::InsecureForTests;
        }
        let port = node.derp_port();
        let mut dial_addrs = Vec::new();
        let (v4, v6) = (node.ipv4_addr(), node.ipv6_addr());
        if let NodeAddr::Fixed(ip) = v4 {
            dial_addrs.push(SocketAddr::new(ip.into(), port));
        }
        if let NodeAddr::Fixed(ip) = v6 {
            dial_addrs.push(SocketAddr::new(ip.into(), port));
        }
        let resolve = (
            matches!(v4, NodeAddr::Resolve),
            matches!(v6, NodeAddr::Resolve),
        );
        RelayTarget {
            host: node.host_name.clone(),
            port,
            dial_addrs,
            resolve,
            tls: Some(TlsSettings {
                server_name,
                verify,
            }),
            websocket: false,
        }
    }

    fn host_header(&self) -> String {
        let default = if self.tls.is_some() { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((s.to_string(), default_port)),
    }
}

/// Connecting to a relay failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach relay {target}: {source}")]
    Dial {
        target: String,
        source: std::io::Error,
    },
    #[error("TLS with relay {target} failed: {source}")]
    Tls {
        target: String,
        source: std::io::Error,
    },
    #[error("relay {target} refused the upgrade: {status}")]
    Upgrade { target: String, status: String },
    #[error("DERP handshake with {target} failed: {why}")]
    Handshake { target: String, why: String },
    #[error("connecting to relay {target} took longer than {timeout:?}")]
    Timeout { target: String, timeout: Duration },
}

/// A connected, handshaken DERP connection.
#[derive(Debug)]
pub struct RelayConn {
    pub reader: RelayReader,
    pub writer: RelayWriter,
    /// The relay's public key (from its ServerKey frame).
    pub server_key: NodePublic,
    pub server_info: ServerInfo,
    /// The address that answered (of the target's several, or of its name's).
    pub remote: SocketAddr,
}

/// Dials `target` and completes the DERP handshake as `key`.
pub async fn connect(
    target: &RelayTarget,
    key: &NodePrivate,
    info: &ClientInfo,
) -> Result<RelayConn, ConnectError> {
    let name = format!("{}:{}", target.host, target.port);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_inner(target, key, info, &name)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout {
            target: name,
            timeout: CONNECT_TIMEOUT,
        }),
    }
}

/// Dials `target`; returns the stream and the address that answered.
async fn dial(target: &RelayTarget, name: &str) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let dial_err = |source| ConnectError::Dial {
        target: name.to_string(),
        source,
    };
    let mut fixed = target.dial_addrs.clone();
    // IPv4 first.
    fixed.sort_by_key(|a| a.is_ipv6());
    let (want4, want6) = target.resolve;
    // The lookup runs beside the fixed addresses' attempts, so a slow or broken DNS
    // never delays them.
    let lookup = async move {
        if !(want4 || want6) {
            return Ok(Vec::new());
        }
        let mut found: Vec<SocketAddr> =
            tokio::net::lookup_host((target.host.as_str(), target.port))
                .await?
                .filter(|a| if a.is_ipv4() { want4 } else { want6 })
                .collect();
        found.sort_by_key(|a| a.is_ipv6());
        Ok(found)
    };
    let tcp = race_connect(fixed, lookup, DIAL_STAGGER, DIAL_ATTEMPT_TIMEOUT)
        .await
        .map_err(dial_err)?;
    let remote = tcp.peer_addr().map_err(dial_err)?;
    Ok((tcp, remote))
}

/// Connects to the first address that answers: `addrs` in order, then what `more`
/// yields (when it comes). Attempts start `stagger` apart, and the next one at once when
/// one fails (RFC 8305's pacing): a refused IPv4 costs no wait, a silently dropped one
/// costs `stagger` before IPv6 is tried.
async fn race_connect(
    addrs: Vec<SocketAddr>,
    more: impl std::future::Future<Output = std::io::Result<Vec<SocketAddr>>>,
    stagger: Duration,
    attempt_timeout: Duration,
) -> std::io::Result<TcpStream> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut pending: std::collections::VecDeque<SocketAddr> = addrs.into();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses");
    let mut start_next = true;
    let next_start = tokio::time::sleep(stagger);
    tokio::pin!(next_start);
    tokio::pin!(more);
    let mut waiting_for_more = true;
    loop {
        if start_next {
            start_next = false;
            if let Some(addr) = pending.pop_front() {
                tried.push(addr);
                attempts.spawn(async move {
                    match tokio::time::timeout(attempt_timeout, TcpStream::connect(addr)).await {
                        Ok(r) => r,
                        Err(_) => Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer from {addr} within {attempt_timeout:?}"),
                        )),
                    }
                });
                next_start
                    .as_mut()
                    .reset(tokio::time::Instant::now() + stagger);
            }
        }
        if attempts.is_empty() && pending.is_empty() && !waiting_for_more {
            return Err(last);
        }
        let queued = !pending.is_empty();
        tokio::select! {
            done = attempts.join_next(), if !attempts.is_empty() => match done {
                Some(Ok(Ok(s))) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s); // dropping the set aborts the other attempts
                }
                Some(Ok(Err(e))) => {
                    last = e;
                    start_next = true;
                }
                Some(Err(e)) => {
                    last = std::io::Error::other(e);
                    start_next = true;
                }
                None => {}
            },
            found = &mut more, if waiting_for_more => {
                waiting_for_more = false;
                match found {
                    Ok(found) => {
                        pending.extend(found.into_iter().filter(|a| !tried.contains(a)));
                        // Nothing running: start at once.
                        start_next = attempts.is_empty();
                    }
                    Err(e) if tried.is_empty() && pending.is_empty() => last = e,
                    Err(_) => {}
                }
            },
            _ = &mut next_start, if queued => start_next = true,
        }
    }
}

async fn connect_inner(
    target: &RelayTarget,
    key: &NodePrivate,
    info: &ClientInfo,
    name: &str,
) -> Result<RelayConn, ConnectError> {
    let (tcp, remote) = dial(target, name).await?;
    let mut stream = secure(target, tcp, name).await?;
    let upgrade_err = |status: String| ConnectError::Upgrade {
        target: name.to_string(),
        status,
    };
    let io_upgrade_err = |e: std::io::Error| upgrade_err(e.to_string());

    let ws_key = target.websocket.then(|| {
        let mut k = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut k);
        base64::engine::general_purpose::STANDARD.encode(k)
    });
    let request = match &ws_key {
        Some(k) => format!(
            "GET /derp HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {k}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {}\r\n\r\n",
            target.host_header(),
            ws::SUBPROTOCOL
        ),
        None => format!(
            "GET /derp HTTP/1.1\r\nHost: {}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
            target.host_header()
        ),
    };
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(io_upgrade_err)?;
    stream.flush().await.map_err(io_upgrade_err)?;
    let (head, rest) = read_head(&mut stream, MAX_HTTP_HEAD)
        .await
        .map_err(io_upgrade_err)?;
    let Some(resp) = ResponseHead::parse(&head) else {
        return Err(upgrade_err("malformed HTTP response".into()));
    };
    if resp.status != 101 {
        return Err(upgrade_err(format!("HTTP {} {}", resp.status, resp.reason)));
    }
    let (stream, prefix): (BoxStream, BytesMut) = match ws_key {
        Some(k) => {
            let accept = resp.headers.get("sec-websocket-accept");
            if accept != Some(ws::accept_key(&k).as_str()) {
                return Err(upgrade_err("bad Sec-WebSocket-Accept".into()));
            }
            let inner = Prefixed::new(rest.freeze(), stream);
            (
                Box::new(WsByteStream::new(inner, Role::Client).await),
                BytesMut::new(),
            )
        }
        None => (stream, rest),
    };
    handshake(stream, prefix, key, info, name, remote).await
}

/// Wraps a dialled connection in TLS when the target wants it.
async fn secure(
    target: &RelayTarget,
    tcp: TcpStream,
    name: &str,
) -> Result<BoxStream, ConnectError> {
    let Some(tls) = &target.tls else {
        return Ok(Box::new(tcp));
    };
    let tls_err = |source| ConnectError::Tls {
        target: name.to_string(),
        source,
    };
    let config =
        client_config(&tls.verify).map_err(|e| tls_err(std::io::Error::other(e.to_string())))?;
    let sni = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| tls_err(std::io::Error::other(e.to_string())))?;
    let s = tokio_rustls::TlsConnector::from(Arc::<rustls::ClientConfig>::clone(&config))
        .connect(sni, tcp)
        .await
        .map_err(tls_err)?;
    Ok(Box::new(s))
}

/// Measures a relay's latency over TCP, for netcheck when UDP gets no answer: dials and
/// secures a connection, then times one `GET /derp/latency-check` on it, so the figure is
/// one round trip rather than the TCP and TLS handshakes. Returns the time and the
/// address dialled.
pub async fn latency_check(
    target: &RelayTarget,
    timeout: Duration,
) -> Result<(Duration, SocketAddr), ConnectError> {
    let name = format!("{}:{}", target.host, target.port);
    let work = async {
        let (tcp, remote) = dial(target, &name).await?;
        let mut stream = secure(target, tcp, &name).await?;
        let err = |e: std::io::Error| ConnectError::Upgrade {
            target: name.clone(),
            status: e.to_string(),
        };
        let request = format!(
            "GET /derp/latency-check HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            target.host_header()
        );
        let start = tokio::time::Instant::now();
        stream.write_all(request.as_bytes()).await.map_err(err)?;
        stream.flush().await.map_err(err)?;
        let (head, _) = read_head(&mut stream, MAX_HTTP_HEAD).await.map_err(err)?;
        let elapsed = start.elapsed();
        let code = ResponseHead::parse(&head).map_or(0, |r| r.status);
        if !(200..300).contains(&code) {
            return Err(ConnectError::Upgrade {
                target: name.clone(),
                status: format!("latency check answered HTTP {code}"),
            });
        }
        Ok((elapsed, remote))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout {
            target: name.clone(),
            timeout,
        }),
    }
}

/// Runs the DERP handshake on an upgraded stream (`prefix` = bytes read past the HTTP head)
/// to the relay at `remote`.
pub async fn handshake(
    stream: BoxStream,
    prefix: BytesMut,
    key: &NodePrivate,
    info: &ClientInfo,
    name: &str,
    remote: SocketAddr,
) -> Result<RelayConn, ConnectError> {
    let hs_err = |why: String| ConnectError::Handshake {
        target: name.to_string(),
        why,
    };
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd, prefix, frame::MAX_CLIENT_RECV_FRAME);
    let mut writer = RelayWriter {
        io: wr,
        buf: BytesMut::new(),
    };
    let server_key = match next_frame(&mut reader).await {
        Ok(Frame::ServerKey { key }) => key,
        Ok(other) => return Err(hs_err(format!("expected ServerKey, got {other:?}"))),
        Err(e) => return Err(hs_err(e.to_string())),
    };
    let sealed = handshake::seal_client_info(key, &server_key, info);
    writer
        .send(&Frame::ClientInfo {
            key: key.public(),
            sealed,
        })
        .await
        .map_err(|e| hs_err(e.to_string()))?;
    let server_info = match next_frame(&mut reader).await {
        Ok(Frame::ServerInfo { sealed }) => handshake::open_server_info(key, &server_key, &sealed)
            .map_err(|e| hs_err(e.to_string()))?,
        Ok(other) => return Err(hs_err(format!("expected ServerInfo, got {other:?}"))),
        Err(e) => {
            return Err(hs_err(format!(
                "{e} (the relay may have refused this client)"
            )))
        }
    };
    Ok(RelayConn {
        reader: RelayReader { frames: reader },
        writer,
        server_key,
        server_info,
        remote,
    })
}

async fn next_frame(r: &mut FrameReader<ReadHalf<BoxStream>>) -> Result<Frame, ReadError> {
    match r.read_raw().await? {
        Some((t, body)) => Ok(Frame::parse(t, body)?),
        None => Err(ReadError::Closed),
    }
}

/// The receiving half of a relay connection.
pub struct RelayReader {
    frames: FrameReader<ReadHalf<BoxStream>>,
}

impl std::fmt::Debug for RelayReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayReader")
    }
}

impl std::fmt::Debug for RelayWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelayWriter({} bytes queued)", self.buf.len())
    }
}

impl RelayReader {
    /// The next meaningful frame. Unknown types and a stray ServerKey (fast start) are skipped,
    /// as are RecvPacket frames too short to carry a source key.
    pub async fn recv(&mut self) -> Result<Frame, ReadError> {
        loop {
            let Some((t, body)) = self.frames.read_raw().await? else {
                return Err(ReadError::Closed);
            };
            if t == ty::RECV_PACKET && body.len() < 32 {
                continue;
            }
            match Frame::parse(t, body)? {
                Frame::Unknown { .. } | Frame::ServerKey { .. } => continue,
                f => return Ok(f),
            }
        }
    }
}

/// The sending half of a relay connection. Frames can be queued and written in one go.
pub struct RelayWriter {
    io: WriteHalf<BoxStream>,
    buf: BytesMut,
}

impl RelayWriter {
    /// Queues a frame without writing it.
    pub fn queue(&mut self, f: &Frame) {
        f.encode(&mut self.buf);
    }

    /// Queues a SendPacket. Payloads over 64 KiB are refused.
    pub fn queue_packet(&mut self, dst: &NodePublic, payload: &[u8]) -> std::io::Result<()> {
        if payload.len() > frame::MAX_PACKET_SIZE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "packet larger than 64 KiB",
            ));
        }
        frame::encode_packet(&mut self.buf, ty::SEND_PACKET, dst, payload);
        Ok(())
    }

    /// Bytes queued and not yet written.
    pub fn queued_len(&self) -> usize {
        self.buf.len()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = write_flush(&mut self.io, &self.buf).await;
        self.buf.clear();
        if self.buf.capacity() > 256 << 10 {
            self.buf = BytesMut::new();
        }
        r
    }

    /// Writes one frame now.
    pub async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        self.queue(f);
        self.flush().await
    }

    /// Sends one packet to `dst` now.
    pub async fn send_packet(&mut self, dst: &NodePublic, payload: &[u8]) -> std::io::Result<()> {
        self.queue_packet(dst, payload)?;
        self.flush().await
    }

    /// Sends raw bytes (tests of malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        write_flush(&mut self.io, bytes).await
    }

    /// Closes the sending direction.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.io.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback address whose SYNs go unanswered: a listener with a full accept queue
    /// (kept alive with the connections filling it).
    async fn silent() -> (tokio::net::TcpListener, Vec<TcpStream>, SocketAddr) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = sock.local_addr().unwrap();
        let listener = sock.listen(0).unwrap();
        // Fill the queue (Linux takes backlog + 1); then SYNs are dropped.
        let mut fill = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(c)) =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
            {
                fill.push(c);
            }
        }
        let probe =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await;
        assert!(probe.is_err(), "the full listener still answered");
        (listener, fill, addr)
    }

    async fn none() -> std::io::Result<Vec<SocketAddr>> {
        Ok(Vec::new())
    }

    #[tokio::test]
    async fn race_connect_moves_on_from_refused_and_silent_addresses() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap() // closed again when `l` drops
        };
        // Refused first: the next address is tried at once, not after the stagger.
        let t0 = tokio::time::Instant::now();
        let s = race_connect(
            vec![refused, live_addr],
            none(),
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(s.peer_addr().unwrap(), live_addr);
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());

        // Silent first (IPv4 blackholed, say): the next starts after the stagger and
        // wins long before the first attempt would time out.
        let (_keep, _fill, quiet) = silent().await;
        let t0 = tokio::time::Instant::now();
        let s = race_connect(
            vec![quiet, live_addr],
            none(),
            Duration::from_millis(50),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert_eq!(s.peer_addr().unwrap(), live_addr);
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

        // Nothing answers: the last error.
        let err = race_connect(
            vec![refused],
            none(),
            Duration::from_millis(50),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(race_connect(
            Vec::new(),
            none(),
            Duration::from_millis(50),
            Duration::from_secs(1),
        )
        .await
        .is_err());
        // A lookup that never ends does not hold up the fixed addresses; one that comes
        // late adds its addresses to the race.
        let s = race_connect(
            vec![live_addr],
            std::future::pending(),
            Duration::from_millis(50),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(s.peer_addr().unwrap(), live_addr);
        let late = async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(vec![live_addr])
        };
        let t0 = tokio::time::Instant::now();
        let s = race_connect(
            vec![quiet],
            late,
            Duration::from_millis(200),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(s.peer_addr().unwrap(), live_addr);
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    #[test]
    fn parses_relay_urls() {
        let t = RelayTarget::parse_url("https://derp.example.com").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.websocket),
            ("derp.example.com", 443, false)
        );
        assert!(t.tls.is_some());
        let t = RelayTarget::parse_url("ws://127.0.0.1:3340/derp").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.websocket),
            ("127.0.0.1", 3340, true)
        );
        assert!(t.tls.is_none());
        let t = RelayTarget::parse_url("wss://[::1]:8443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8443));
        assert_eq!(t.host_header(), "[::1]:8443");
        assert!(RelayTarget::parse_url("ftp://x").is_err());
        assert!(RelayTarget::parse_url("http://:80").is_err());
        assert!(RelayTarget::parse_url("http://h:notaport").is_err());
    }

    #[test]
    fn node_target_honours_cert_name_pin_and_fixed_ip() {
        let node = RelayNode {
            name: "900a".into(),
            region_id: 900,
            host_name: "derp.example.com".into(),
            cert_name: format!("sha256-raw:{}", "ab".repeat(32)),
            ipv4: "203.0.113.10".into(),
            derp_port: 8443,
            ..Default::default()
        };
        let t = RelayTarget::from_node(&node);
        assert_eq!(t.dial_addrs, vec!["203.0.113.10:8443".parse().unwrap()]);
        // IPv6 unset: looked up; "none" would switch it off.
        assert_eq!(t.resolve, (false, true));
        let tls = t.tls.unwrap();
        assert_eq!(tls.server_name, "derp.example.com");
        assert!(matches!(tls.verify, TlsVerify::PinnedSha256(h) if h == [0xab; 32]));

        let node = RelayNode {
            cert_name: "relay.internal".into(),
            insecure_for_tests: true,
            ..node
        };
        let tls = RelayTarget::from_node(&node).tls.unwrap();
        assert_eq!(tls.server_name, "relay.internal");
        assert!(matches!(tls.verify, TlsVerify::InsecureForTests));
    }
}
