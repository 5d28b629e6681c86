//! The listener: accept-rate limit, optional TLS, one HTTP/1.1 request per connection
//! for the plain endpoints, and the `/derp` upgrade (DERP or WebSocket) that hands the
//! connection to `conn`.
//!
//! Endpoints: `/derp`, `/derp/probe` and `/derp/latency-check` (GET/HEAD → 200),
//! `/generate_204` (captive-portal check with challenge echo), `/` (home page),
//! `/robots.txt`, `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;

use super::ratelimit::TokenBucket;
use super::{conn, LiveGuard, Shared};
use netbase::http::{read_head, RequestHead};

use crate::io::{write_flush, BoxStream, Prefixed};
use crate::ws::{self, WsByteStream};

const MAX_REQUEST_HEAD: usize = 16 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CHALLENGE_LEN: usize = 64;

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut accept_limit = shared
        .cfg
        .accept_rate
        .map(|r| TokenBucket::new(r.per_second, r.burst.max(1.0), Instant::now()));
    let mut shutdown = shared.shutdown.clone();
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        shared.metrics.accepts.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = accept_limit.as_mut() {
            if !b.try_take(1.0, Instant::now()) {
                shared
                    .metrics
                    .accepts_rate_limited
                    .fetch_add(1, Ordering::Relaxed);
                drop(tcp);
                continue;
            }
        }
        let _ = tcp.set_nodelay(true);
        let guard = LiveGuard::new(&shared);
        tokio::spawn(handle_tcp(shared.clone(), tcp, remote, guard));
    }
}

async fn handle_tcp(shared: Arc<Shared>, tcp: TcpStream, remote: SocketAddr, _guard: LiveGuard) {
    let stream: BoxStream = match &shared.cfg.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            match tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    handle_http(shared, stream, remote).await;
}

async fn handle_http(shared: Arc<Shared>, mut stream: BoxStream, remote: SocketAddr) {
    let (head, rest) =
        match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream, MAX_REQUEST_HEAD)).await
        {
            Ok(Ok(x)) => x,
            _ => return,
        };
    let Some(req) = RequestHead::parse(&head) else {
        let _ = respond(&mut stream, "400 Bad Request", &[], b"bad request\n", true).await;
        return;
    };
    match req.path.as_str() {
        "/derp" => upgrade(shared, stream, rest, remote, &req).await,
        "/derp/probe" | "/derp/latency-check" => {
            if req.method == "GET" || req.method == "HEAD" {
                let _ = respond(
                    &mut stream,
                    "200 OK",
                    &[("Access-Control-Allow-Origin", "*")],
                    b"",
                    req.method == "GET",
                )
                .await;
            } else {
                let _ = respond(
                    &mut stream,
                    "405 Method Not Allowed",
                    &[],
                    b"bogus probe method\n",
                    true,
                )
                .await;
            }
        }
        "/generate_204" => {
            let mut extra = vec![(
                "Cache-Control",
                "no-cache, no-store, must-revalidate, no-transform, max-age=0".to_string(),
            )];
            if let Some(c) = req
                .headers
                .get("X-Tailscale-Challenge")
                .filter(|c| valid_challenge(c))
            {
                extra.push(("X-Tailscale-Response", format!("response {c}")));
            }
            let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let _ = respond(&mut stream, "204 No Content", &extra, b"", false).await;
        }
        "/robots.txt" => {
            let _ = respond(
                &mut stream,
                "200 OK",
                &[("Content-Type", "text/plain")],
                b"User-agent: *\nDisallow: /\n",
                true,
            )
            .await;
        }
        "/metrics" => {
            let body = shared.metrics.render();
            let _ = respond(
                &mut stream,
                "200 OK",
                &[("Content-Type", "text/plain; version=0.0.4")],
                body.as_bytes(),
                req.method != "HEAD",
            )
            .await;
        }
        "/" => {
            let body = home_page(&shared);
            let _ = respond(
                &mut stream,
                "200 OK",
                &[("Content-Type", "text/html; charset=utf-8")],
                body.as_bytes(),
                req.method != "HEAD",
            )
            .await;
        }
        _ => {
            let _ = respond(&mut stream, "404 Not Found", &[], b"not found\n", true).await;
        }
    }
}

/// `[A-Za-z0-9._:-]{1,64}`, as Tailscale's captive-portal check requires.
fn valid_challenge(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= MAX_CHALLENGE_LEN
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn home_page(shared: &Shared) -> String {
    let name = if shared.cfg.hostname.is_empty() {
        "this server".to_string()
    } else {
        html_escape(&shared.cfg.hostname)
    };
    format!(
        "<!DOCTYPE html>\n<html><head><title>relayd</title></head><body>\n\
         <h1>relayd</h1>\n<p>This is {name}, a DERP relay of an agentd (Tailscale-compatible) \
         network. It forwards encrypted packets between devices that cannot reach each other \
         directly and answers STUN. There is nothing to browse here.</p>\n\
         <p>Server key: <code>{}</code></p>\n<p>Endpoints: <code>/derp</code>, \
         <code>/derp/probe</code>, <code>/generate_204</code>, <code>/metrics</code>.</p>\n\
         </body></html>\n",
        shared.public
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn respond(
    stream: &mut BoxStream,
    status: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if !status.starts_with("204") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if with_body {
        bytes.extend_from_slice(body);
    }
    write_flush(stream, &bytes).await?;
    stream.shutdown().await
}

async fn upgrade(
    shared: Arc<Shared>,
    mut stream: BoxStream,
    rest: BytesMut,
    remote: SocketAddr,
    req: &RequestHead,
) {
    let upgrade = req
        .headers
        .get("Upgrade")
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let wants_ws_derp = upgrade == "websocket"
        && req
            .headers
            .get("Sec-WebSocket-Protocol")
            .is_some_and(|p| p.split(',').any(|s| s.trim() == ws::SUBPROTOCOL));
    if wants_ws_derp {
        let Some(key) = req.headers.get("Sec-WebSocket-Key") else {
            let _ = respond(
                &mut stream,
                "400 Bad Request",
                &[],
                b"missing Sec-WebSocket-Key\n",
                true,
            )
            .await;
            return;
        };
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            ws::accept_key(key),
            ws::SUBPROTOCOL
        );
        if write_flush(&mut stream, resp.as_bytes()).await.is_err() {
            return;
        }
        let ws = WsByteStream::new(Prefixed::new(rest.freeze(), stream), Role::Server).await;
        conn::serve(shared, Box::new(ws), BytesMut::new(), remote).await;
        return;
    }
    if upgrade != "derp" && upgrade != "websocket" {
        let _ = respond(
            &mut stream,
            "426 Upgrade Required",
            &[],
            b"DERP requires connection upgrade\n",
            true,
        )
        .await;
        return;
    }
    let fast_start = req.headers.get("Derp-Fast-Start").map(str::trim) == Some("1");
    if !fast_start {
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\
             Derp-Version: 2\r\nDerp-Public-Key: {}\r\n\r\n",
            shared.public.untyped_hex()
        );
        if write_flush(&mut stream, resp.as_bytes()).await.is_err() {
            return;
        }
    }
    conn::serve(shared, stream, rest, remote).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_must_be_short_and_plain() {
        assert!(valid_challenge("ts_abc-1.2:3"));
        assert!(!valid_challenge(""));
        assert!(!valid_challenge("has space"));
        assert!(!valid_challenge("new\nline"));
        assert!(valid_challenge(&"a".repeat(64)));
        assert!(!valid_challenge(&"a".repeat(65)));
    }
}
