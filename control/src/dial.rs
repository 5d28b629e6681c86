//! Reaching a control server: `GET /key?v=<capver>` for its Noise key, then
//! `POST /ts2021` with `Upgrade: tailscale-control-protocol` and the Noise initiation in
//! `X-Tailscale-Handshake`; after `101 Switching Protocols` the 51-byte response and the
//! records follow on the raw socket.
//!
//! Every step has a deadline ([`Deadlines`]): TCP connect, TLS, the whole `/key` exchange,
//! and the upgrade up to the end of the early payload. A server that accepts and then
//! stays silent costs one deadline, never a hang.

use std::io;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use bytes::BytesMut;
use netbase::http::{Headers, ResponseHead};
use proto::{MachinePrivate, MachinePublic};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::chunked::{self, ChunkedError};
use crate::deadline::{Deadlines, Step, TimedOut};
use crate::noise::{ClientHandshake, NoiseError, RESPONSE_LEN};
use crate::stream::NoiseStream;

/// Any byte stream: TCP or TLS over TCP.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ByteStream for T {}
pub type BoxStream = Box<dyn ByteStream>;

const MAX_HEAD: usize = 16 << 10;
const MAX_KEY_RESPONSE: usize = 64 << 10;
/// Bytes of a refused upgrade's body kept for the error message.
const MAX_ERROR_BODY: u64 = 4096;

/// Where the control server is: `http://host[:port]` or `https://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl FromStr for ControlUrl {
    type Err = DialError;
    fn from_str(s: &str) -> Result<Self, DialError> {
        let bad = |why: &str| DialError::Url(format!("{s:?}: {why}"));
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let default = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None => default,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_string(), default),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        Ok(ControlUrl { host, port, tls })
    }
}

impl ControlUrl {
    /// `host[:port]` as an HTTP authority (port omitted when it is the scheme's default).
    pub fn authority(&self) -> String {
        self.host_header()
    }

    fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }
}

/// Reaching the control server failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("bad control URL {0}")]
    Url(String),
    #[error("cannot reach the control server: {0}")]
    Io(#[from] io::Error),
    #[error("control server answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("control server's /key answer is not usable: {0}")]
    BadKey(String),
    #[error(transparent)]
    Noise(#[from] NoiseError),
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
}

impl DialError {
    /// The deadline this error is about, if it is a timeout.
    pub fn timed_out(&self) -> Option<&TimedOut> {
        match self {
            DialError::TimedOut(t) => Some(t),
            _ => None,
        }
    }
}

/// TLS with the system's trusted roots (rustls, ring provider).
fn tls_config() -> Result<Arc<rustls::ClientConfig>, DialError> {
    netbase::tls::client_config(&netbase::tls::TlsVerify::SystemRoots)
        .map_err(|e| DialError::Io(io::Error::other(e.to_string())))
}

async fn connect(url: &ControlUrl, deadlines: &Deadlines) -> Result<BoxStream, DialError> {
    let tcp = deadlines
        .run(
            Step::TcpConnect,
            TcpStream::connect((url.host.as_str(), url.port)),
        )
        .await??;
    let _ = tcp.set_nodelay(true);
    if !url.tls {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|e| DialError::Url(e.to_string()))?;
    let tls = deadlines
        .run(
            Step::Tls,
            tokio_rustls::TlsConnector::from(tls_config()?).connect(name, tcp),
        )
        .await??;
    Ok(Box::new(tls))
}

/// Reads and parses an HTTP/1.1 response head; returns it and the bytes after it.
async fn read_head(s: &mut BoxStream) -> Result<(ResponseHead, BytesMut), DialError> {
    let (head, rest) = netbase::http::read_head(s, MAX_HEAD).await?;
    let resp = ResponseHead::parse(&head).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP response head")
    })?;
    Ok((resp, rest))
}

#[derive(Deserialize)]
struct KeyResponse {
    #[serde(rename = "publicKey", default)]
    public_key: Option<MachinePublic>,
}

/// `GET /key?v=<version>`: the control server's Noise public key, under the default
/// deadlines.
pub async fn fetch_control_key(url: &ControlUrl, version: u16) -> Result<MachinePublic, DialError> {
    fetch_control_key_with(url, version, &Deadlines::default()).await
}

/// [`fetch_control_key`] under `deadlines`: TCP connect and TLS each have their own, and
/// [`Deadlines::fetch_key`] covers the request and the whole answer.
pub async fn fetch_control_key_with(
    url: &ControlUrl,
    version: u16,
    deadlines: &Deadlines,
) -> Result<MachinePublic, DialError> {
    let mut s = connect(url, deadlines).await?;
    let (status, body) = deadlines
        .run(Step::FetchKey, key_exchange(&mut s, url, version))
        .await??;
    if status != 200 {
        return Err(DialError::Http {
            status,
            body: String::from_utf8_lossy(&body).chars().take(200).collect(),
        });
    }
    let parsed: KeyResponse =
        serde_json::from_slice(&body).map_err(|e| DialError::BadKey(e.to_string()))?;
    match parsed.public_key {
        Some(k) if !k.is_zero() => Ok(k),
        _ => Err(DialError::BadKey(
            "no publicKey (server too old for ts2021?)".into(),
        )),
    }
}

/// How the end of an HTTP/1.1 response body is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

fn framing(headers: &Headers) -> Result<Framing, DialError> {
    let bad = |why: &str| DialError::BadKey(why.into());
    if let Some(te) = headers.get("transfer-encoding") {
        // Only "chunked" (last, per HTTP/1.1) is a framing we read; anything else
        // would be a compressed body we never asked for.
        return if te.eq_ignore_ascii_case("chunked") {
            Ok(Framing::Chunked)
        } else {
            Err(bad("unsupported Transfer-Encoding"))
        };
    }
    match headers.get("content-length") {
        Some(v) => {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("bad Content-Length"));
            }
            // Digits only, so a parse failure can only be an overflow: too large anyway.
            let n = v.parse::<usize>().unwrap_or(usize::MAX);
            if n > MAX_KEY_RESPONSE {
                return Err(bad("response over 64 KiB"));
            }
            Ok(Framing::Length(n))
        }
        None => Ok(Framing::UntilClose),
    }
}

/// Sends `GET /key` and reads the answer: (status, body). The body ends where its framing
/// says (Content-Length, chunked, or the server closing), and is at most 64 KiB.
async fn key_exchange(
    s: &mut BoxStream,
    url: &ControlUrl,
    version: u16,
) -> Result<(u16, Vec<u8>), DialError> {
    let req = format!(
        "GET /key?v={version} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n\r\n",
        url.host_header()
    );
    s.write_all(req.as_bytes()).await?;
    s.flush().await?;
    let (head, mut body) = read_head(s).await?;
    let status = head.status;
    let framing = framing(&head.headers)?;
    loop {
        match framing {
            Framing::Length(n) if body.len() >= n => return Ok((status, body[..n].to_vec())),
            Framing::Chunked => {
                if let Some(d) = chunked::decode(&body, MAX_KEY_RESPONSE).map_err(bad_chunks)? {
                    return Ok((status, d.body));
                }
            }
            _ => {}
        }
        // Chunk framing may add a few bytes per chunk on top of the body itself.
        let cap = if framing == Framing::Chunked {
            2 * MAX_KEY_RESPONSE
        } else {
            MAX_KEY_RESPONSE
        };
        if body.len() > cap {
            return Err(DialError::BadKey("response over 64 KiB".into()));
        }
        body.reserve(4096);
        if s.read_buf(&mut body).await? == 0 {
            return match framing {
                Framing::UntilClose if body.len() <= MAX_KEY_RESPONSE => {
                    Ok((status, body.to_vec()))
                }
                Framing::UntilClose => Err(DialError::BadKey("response over 64 KiB".into())),
                _ => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the /key answer ended",
                )
                .into()),
            };
        }
    }
}

fn bad_chunks(e: ChunkedError) -> DialError {
    DialError::BadKey(format!("bad chunked encoding: {e}"))
}

/// A ts2021 connection and the server's early payload (JSON), if it sent one.
#[derive(Debug)]
pub struct ControlConn {
    pub stream: NoiseStream<BoxStream>,
    pub early_payload: Option<Vec<u8>>,
}

/// Upgrades to ts2021 as `machine`, expecting the control key `control`, under the
/// default deadlines.
pub async fn dial(
    url: &ControlUrl,
    machine: &MachinePrivate,
    control: &MachinePublic,
    version: u16,
) -> Result<ControlConn, DialError> {
    dial_with(url, machine, control, version, &Deadlines::default()).await
}

/// [`dial`] under `deadlines`: TCP connect and TLS each have their own, and
/// [`Deadlines::upgrade`] covers the upgrade request, the Noise response and the early
/// payload.
pub async fn dial_with(
    url: &ControlUrl,
    machine: &MachinePrivate,
    control: &MachinePublic,
    version: u16,
    deadlines: &Deadlines,
) -> Result<ControlConn, DialError> {
    let (hs, init) = ClientHandshake::start(machine, control, version)?;
    let s = connect(url, deadlines).await?;
    deadlines
        .run(Step::Upgrade, upgrade(s, url, hs, &init))
        .await?
}

async fn upgrade(
    mut s: BoxStream,
    url: &ControlUrl,
    hs: ClientHandshake,
    init: &[u8],
) -> Result<ControlConn, DialError> {
    let req = format!(
        "POST /ts2021 HTTP/1.1\r\nHost: {}\r\nUpgrade: tailscale-control-protocol\r\n\
         Connection: upgrade\r\nX-Tailscale-Handshake: {}\r\nContent-Length: 0\r\n\r\n",
        url.host_header(),
        base64::engine::general_purpose::STANDARD.encode(init)
    );
    s.write_all(req.as_bytes()).await?;
    s.flush().await?;
    let (head, mut rest) = read_head(&mut s).await?;
    let status = head.status;
    if status != 101 {
        let mut body = rest.to_vec();
        body.truncate(MAX_ERROR_BODY as usize);
        let room = MAX_ERROR_BODY - body.len() as u64;
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            (&mut s).take(room).read_to_end(&mut body),
        )
        .await;
        return Err(DialError::Http {
            status,
            body: String::from_utf8_lossy(&body).chars().take(200).collect(),
        });
    }
    let upgrade_ok = head.headers.get("upgrade") == Some("tailscale-control-protocol");
    if !upgrade_ok {
        return Err(DialError::Http {
            status,
            body: "101 without Upgrade: tailscale-control-protocol".into(),
        });
    }
    while rest.len() < 3 {
        if s.read_buf(&mut rest).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the handshake",
            )
            .into());
        }
    }
    // A type-3 message carries the server's reason for refusing.
    let want = if rest[0] == 0x03 {
        3 + u16::from_be_bytes([rest[1], rest[2]]) as usize
    } else {
        RESPONSE_LEN
    };
    while rest.len() < want {
        if s.read_buf(&mut rest).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the handshake",
            )
            .into());
        }
    }
    let response = rest.split_to(want);
    let transport = hs.finish(&response)?;
    let mut stream = NoiseStream::new(s, transport, rest);
    let early_payload = stream.read_early_payload().await?;
    Ok(ControlConn {
        stream,
        early_payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::TcpListener;

    /// A server that answers every connection's request head with `answer` (nothing at
    /// all when empty) and then holds the socket open until the test ends.
    async fn holding_server(
        answer: Vec<u8>,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                if !answer.is_empty() {
                    let _ = s.write_all(&answer).await;
                }
                held.push(s);
            }
        });
        (addr, task)
    }

    fn short() -> Deadlines {
        Deadlines {
            tcp_connect: Duration::from_millis(300),
            tls: Duration::from_millis(300),
            fetch_key: Duration::from_millis(300),
            upgrade: Duration::from_millis(300),
            ..Deadlines::default()
        }
    }

    fn key_json() -> (MachinePublic, String) {
        let k = MachinePrivate::generate().public();
        (k, format!(r#"{{"legacyPublicKey":"","publicKey":"{k}"}}"#))
    }

    #[tokio::test]
    async fn a_key_answer_is_read_to_its_length_or_last_chunk_without_waiting_for_close() {
        let (key, json) = key_json();
        let by_length = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{json}",
            json.len()
        );
        let (a, b) = json.split_at(10);
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};e=1\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        for answer in [by_length, chunked] {
            let (addr, _srv) = holding_server(answer.into_bytes()).await;
            let url: ControlUrl = format!("http://{addr}").parse().unwrap();
            let got = fetch_control_key_with(&url, 113, &short()).await.unwrap();
            assert_eq!(got, key);
        }
    }

    #[tokio::test]
    async fn bad_chunk_sizes_in_the_key_answer_are_errors_not_panics() {
        let (_, json) = key_json();
        for size in ["ffffffffffffffff", "10000000000000000", "zz", "-1", "20000"] {
            let answer = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\n{json}\r\n0\r\n\r\n"
            );
            let (addr, _srv) = holding_server(answer.into_bytes()).await;
            let url: ControlUrl = format!("http://{addr}").parse().unwrap();
            let err = fetch_control_key_with(&url, 113, &short())
                .await
                .unwrap_err();
            assert!(
                matches!(&err, DialError::BadKey(why) if why.contains("chunk")),
                "{size}: {err}"
            );
        }
        // An oversized Content-Length is refused before any body is awaited.
        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n";
        let (addr, _srv) = holding_server(answer.into()).await;
        let url: ControlUrl = format!("http://{addr}").parse().unwrap();
        let err = fetch_control_key_with(&url, 113, &short())
            .await
            .unwrap_err();
        assert!(matches!(err, DialError::BadKey(_)), "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_naming_the_step() {
        let (addr, _srv) = holding_server(Vec::new()).await;
        let d = short();
        let url: ControlUrl = format!("http://{addr}").parse().unwrap();
        let err = fetch_control_key_with(&url, 113, &d).await.unwrap_err();
        assert_eq!(
            err.timed_out(),
            Some(&TimedOut {
                step: Step::FetchKey,
                after: d.fetch_key
            }),
            "{err}"
        );
        let key = MachinePrivate::generate().public();
        let err = dial_with(&url, &MachinePrivate::generate(), &key, 113, &d)
            .await
            .unwrap_err();
        assert_eq!(
            err.timed_out().map(|t| t.step),
            Some(Step::Upgrade),
            "{err}"
        );
        // The same listener as https://: nothing answers the TLS ClientHello.
        let url: ControlUrl = format!("https://{addr}").parse().unwrap();
        let err = fetch_control_key_with(&url, 113, &d).await.unwrap_err();
        assert_eq!(err.timed_out().map(|t| t.step), Some(Step::Tls), "{err}");
    }

    #[tokio::test]
    async fn a_listener_whose_accept_queue_is_full_times_out_the_tcp_connect() {
        // Never accepting with a backlog of 1: once the queue is full the kernel drops
        // further SYNs, so a connect hangs as it would towards a black-holed server.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = sock.listen(1).unwrap();
        let addr = l.local_addr().unwrap();
        let mut queued = Vec::new();
        let full = loop {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => queued.push(s),
                Ok(Err(e)) => panic!("connect failed: {e}"),
                Err(_) => break true,
            }
            if queued.len() > 64 {
                break false;
            }
        };
        assert!(full, "the accept queue never filled");
        let url: ControlUrl = format!("http://{addr}").parse().unwrap();
        let d = short();
        let err = fetch_control_key_with(&url, 113, &d).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "connecting to the control server (TCP): timed out after 300 ms"
        );
    }

    #[tokio::test]
    async fn a_server_stalling_after_the_101_times_out_in_the_upgrade() {
        let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n\x02\x00";
        let (addr, _srv) = holding_server(answer.into()).await;
        let url: ControlUrl = format!("http://{addr}").parse().unwrap();
        let key = MachinePrivate::generate().public();
        let err = dial_with(&url, &MachinePrivate::generate(), &key, 113, &short())
            .await
            .unwrap_err();
        assert_eq!(
            err.timed_out().map(|t| t.step),
            Some(Step::Upgrade),
            "{err}"
        );
    }

    #[test]
    fn control_urls() {
        let u: ControlUrl = "https://hs.example.com".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("hs.example.com", 443, true)
        );
        let u: ControlUrl = "http://127.0.0.1:8080/".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("127.0.0.1", 8080, false));
        assert_eq!(u.host_header(), "127.0.0.1:8080");
        let u: ControlUrl = "http://[::1]:9".parse().unwrap();
        assert_eq!(u.host_header(), "[::1]:9");
        assert!("ftp://x".parse::<ControlUrl>().is_err());
        assert!("http://".parse::<ControlUrl>().is_err());
    }
}
