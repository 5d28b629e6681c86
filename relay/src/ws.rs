//! DERP over WebSocket: the upgrade's accept-key rule and an adapter that turns a
//! WebSocket (binary messages, subprotocol `derp`) into a plain byte stream, so the DERP
//! frame code runs unchanged on top of it. Message boundaries need not match frames.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use base64::Engine as _;
use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The subprotocol a DERP WebSocket must negotiate.
pub const SUBPROTOCOL: &str = "derp";

/// Largest binary message we send. The WebSocket library of Tailscale's Go programs
/// (derper's server side and its clients) refuses messages over 32 KiB by default and
/// drops the connection ("message too big: read limited at 32769 bytes"), so a large
/// DERP frame, or several coalesced small ones, goes out in pieces; the stream is the
/// concatenation of the messages, so boundaries do not matter to the reader.
pub const MAX_MESSAGE: usize = 16 << 10;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 section 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A byte stream carried in binary WebSocket messages.
#[derive(Debug)]
pub struct WsByteStream<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::ConnectionAborted, "websocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsByteStream<S> {
    /// Wraps a stream whose HTTP upgrade is already done.
    pub async fn new(stream: S, role: Role) -> Self {
        let mut config = WebSocketConfig::default();
        // A DERP frame is at most 64 KiB + keys; leave room for coalesced writes.
        config.max_message_size = Some(1 << 20);
        config.max_frame_size = Some(1 << 20);
        WsByteStream {
            ws: WebSocketStream::from_raw_socket(stream, role, Some(config)).await,
            pending: Bytes::new(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // Pings are answered by the WebSocket layer; text is not DERP.
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on a DERP websocket",
                    )))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = Pin::new(&mut self.ws);
        ready!(Sink::<Message>::poll_ready(ws, cx)).map_err(to_io)?;
        let n = buf.len().min(MAX_MESSAGE);
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Message>::poll_flush(Pin::new(&mut self.ws), cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Message>::poll_close(Pin::new(&mut self.ws), cx).map_err(to_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that, like Go's WebSocket library, refuses messages over 32 KiB still
    /// reads a 64 KiB DERP frame written in one call: it arrives in several messages.
    #[tokio::test]
    async fn big_writes_go_out_in_messages_a_go_peer_accepts() {
        use futures_util::StreamExt as _;
        use tokio::io::AsyncWriteExt as _;

        let (a, b) = tokio::io::duplex(1 << 20);
        let mut ours = WsByteStream::new(a, Role::Client).await;
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(32 << 10);
        let mut go_like = WebSocketStream::from_raw_socket(b, Role::Server, Some(config)).await;
        let data: Vec<u8> = (0..(64 << 10) + 37).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn(async move {
            ours.write_all(&data).await.unwrap();
            ours.flush().await.unwrap();
            (ours, data)
        });
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while got.len() < (64 << 10) + 37 {
            match go_like.next().await.unwrap().unwrap() {
                Message::Binary(m) => {
                    sizes.push(m.len());
                    got.extend_from_slice(&m);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let (_ours, data) = writer.await.unwrap();
        assert_eq!(got, data);
        assert!(sizes.iter().all(|s| *s <= MAX_MESSAGE), "{sizes:?}");
        assert!(sizes.len() >= 5, "{sizes:?}");
    }

    #[test]
    fn accept_key_matches_rfc6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
