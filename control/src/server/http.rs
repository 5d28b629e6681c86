//! controld's HTTP/1.1 front: `GET /key`, the `/ts2021` upgrade, `POST /verify` (relay
//! admission, Headscale-compatible), `/health` and `/metrics`. One request per
//! connection; the upgrade hands the socket to `session`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::BytesMut;
use netbase::http::RequestHead;
use proto::NodePublic;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{now_unix, session, Shared};
use crate::dial::BoxStream;
use crate::noise;
use crate::stream::NoiseStream;

const MAX_HEAD: usize = 16 << 10;
const MAX_VERIFY_BODY: usize = 4096;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(handle_tcp(shared.clone(), tcp, remote));
    }
}

async fn handle_tcp(shared: Arc<Shared>, tcp: TcpStream, remote: SocketAddr) {
    let stream: BoxStream = match &shared.cfg.tls {
        None => Box::new(tcp),
        Some(tls) => {
            match tokio::time::timeout(
                REQUEST_TIMEOUT,
                tokio_rustls::TlsAcceptor::from(tls.clone()).accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => Box::new(s),
                _ => return,
            }
        }
    };
    if let Err(e) = handle(shared, stream, remote).await {
        tracing::debug!(%remote, error = %e, "HTTP request failed");
    }
}

/// The request head and what followed it; None for a head that is malformed, too
/// large, or cut off (answered with 400).
async fn read_request(s: &mut BoxStream) -> std::io::Result<Option<(RequestHead, BytesMut)>> {
    match netbase::http::read_head(s, MAX_HEAD).await {
        Ok((head, rest)) => Ok(RequestHead::parse(&head).map(|r| (r, rest))),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn respond(
    s: &mut BoxStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await?;
    s.shutdown().await
}

#[derive(Deserialize)]
struct VerifyRequest {
    #[serde(rename = "NodePublic")]
    node_public: NodePublic,
}

async fn handle(shared: Arc<Shared>, mut s: BoxStream, remote: SocketAddr) -> std::io::Result<()> {
    let Some((req, mut rest)) = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut s))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timed out")
        })??
    else {
        return respond(&mut s, "400 Bad Request", "text/plain", b"bad request\n").await;
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/key") => {
            let v = req
                .query
                .split('&')
                .find_map(|kv| kv.strip_prefix("v="))
                .and_then(|v| v.parse::<u32>().ok());
            if v.is_none() {
                return respond(
                    &mut s,
                    "400 Bad Request",
                    "text/plain",
                    b"missing or bad v= (capability version)\n",
                )
                .await;
            }
            let body = serde_json::json!({
                "legacyPublicKey": proto::MachinePublic::default(),
                "publicKey": shared.cfg.control_key.public(),
            });
            respond(
                &mut s,
                "200 OK",
                "application/json",
                body.to_string().as_bytes(),
            )
            .await
        }
        ("POST", "/ts2021") => {
            let upgrade_ok = req
                .headers
                .get("Upgrade")
                .is_some_and(|u| u.eq_ignore_ascii_case("tailscale-control-protocol"));
            let init = req
                .headers
                .get("X-Tailscale-Handshake")
                .and_then(|h| base64::engine::general_purpose::STANDARD.decode(h).ok());
            let (true, Some(init)) = (upgrade_ok, init) else {
                return respond(
                    &mut s,
                    "400 Bad Request",
                    "text/plain",
                    b"ts2021 needs Upgrade: tailscale-control-protocol and X-Tailscale-Handshake\n",
                )
                .await;
            };
            let accepted = match noise::accept(&shared.cfg.control_key, &init) {
                Ok(a) => a,
                Err(e) => {
                    shared
                        .metrics
                        .noise_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%remote, error = %e, "refused ts2021 handshake");
                    return respond(
                        &mut s,
                        "400 Bad Request",
                        "text/plain",
                        format!("{e}\n").as_bytes(),
                    )
                    .await;
                }
            };
            shared
                .metrics
                .noise_handshakes
                .fetch_add(1, Ordering::Relaxed);
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n").await?;
            s.write_all(&accepted.response).await?;
            s.flush().await?;
            // Anything the client sent after its request head is already ciphertext.
            let prefix = std::mem::take(&mut rest);
            let stream = NoiseStream::new(s, accepted.transport, prefix);
            session::serve(shared, stream, accepted.client, accepted.version, remote).await;
            Ok(())
        }
        ("POST", "/verify") => {
            let len: usize = req
                .headers
                .get("Content-Length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            if len > MAX_VERIFY_BODY {
                return respond(
                    &mut s,
                    "413 Payload Too Large",
                    "text/plain",
                    b"body too large\n",
                )
                .await;
            }
            while rest.len() < len {
                if s.read_buf(&mut rest).await? == 0 {
                    break;
                }
            }
            let Ok(v) = serde_json::from_slice::<VerifyRequest>(&rest[..len.min(rest.len())])
            else {
                return respond(
                    &mut s,
                    "400 Bad Request",
                    "text/plain",
                    b"body must be {\"NodePublic\":\"nodekey:...\"}\n",
                )
                .await;
            };
            let allow = matches!(
                shared.store.node_by_node_key(&v.node_public),
                Ok(Some(n)) if !n.is_expired(now_unix())
            );
            let counter = if allow {
                &shared.metrics.verify_allowed
            } else {
                &shared.metrics.verify_denied
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let body = serde_json::json!({ "Allow": allow });
            respond(
                &mut s,
                "200 OK",
                "application/json",
                body.to_string().as_bytes(),
            )
            .await
        }
        ("GET", "/health") => {
            let ok = shared.store.change_counter().is_ok();
            let (status, body) = if ok {
                ("200 OK", r#"{"status":"pass"}"#)
            } else {
                ("503 Service Unavailable", r#"{"status":"fail"}"#)
            };
            respond(&mut s, status, "application/json", body.as_bytes()).await
        }
        ("GET", "/metrics") => {
            let nodes = shared.snapshot.borrow().nodes.len();
            let body = shared.metrics.render(shared.streaming(), nodes);
            respond(
                &mut s,
                "200 OK",
                "text/plain; version=0.0.4",
                body.as_bytes(),
            )
            .await
        }
        _ => respond(&mut s, "404 Not Found", "text/plain", b"not found\n").await,
    }
}
