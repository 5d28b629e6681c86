//! A ts2021 connection as a byte stream: records in and out over any async byte stream,
//! so HTTP/2 can run on top. Also reads the server's optional early payload.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::record::{Transport, MAX_PLAINTEXT_LEN};

/// `FF FF FF 'T' 'S'`: the start of an early payload.
pub const EARLY_PAYLOAD_MAGIC: [u8; 5] = [0xFF, 0xFF, 0xFF, b'T', b'S'];
/// Largest early payload accepted.
pub const MAX_EARLY_PAYLOAD: usize = 10 << 20;
/// Plaintext sealed per write call (four full records).
const WRITE_CHUNK: usize = 4 * MAX_PLAINTEXT_LEN;

/// Records over `S`, read and written as plaintext.
pub struct NoiseStream<S> {
    io: S,
    transport: Transport,
    /// Ciphertext read but not yet opened.
    rbuf: BytesMut,
    /// Plaintext opened but not yet read.
    plain: BytesMut,
    /// Sealed records not yet written.
    wbuf: Vec<u8>,
    wpos: usize,
}

impl<S> std::fmt::Debug for NoiseStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoiseStream({:?})", self.transport)
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl<S: AsyncRead + AsyncWrite + Unpin> NoiseStream<S> {
    /// `prefix` holds ciphertext already read from `io` (after the handshake response).
    pub fn new(io: S, transport: Transport, prefix: BytesMut) -> Self {
        NoiseStream {
            io,
            transport,
            rbuf: prefix,
            plain: BytesMut::new(),
            wbuf: Vec::new(),
            wpos: 0,
        }
    }

    /// Opens records until at least `want` plaintext bytes are buffered; false at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<bool>> {
        while self.plain.len() < want {
            if let Some(p) = self.transport.open(&mut self.rbuf).map_err(invalid)? {
                self.plain.extend_from_slice(&p);
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                if self.rbuf.is_empty() {
                    return Poll::Ready(Ok(false));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a record",
                )));
            }
            self.rbuf.extend_from_slice(rb.filled());
        }
        Poll::Ready(Ok(true))
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads the early payload if the server sent one (`FF FF FF 54 53 ‖ BE u32 length ‖
    /// JSON`). Otherwise the bytes stay buffered for the next reader (HTTP/2).
    pub async fn read_early_payload(&mut self) -> io::Result<Option<Vec<u8>>> {
        if !std::future::poll_fn(|cx| self.poll_fill(cx, 9)).await? {
            return Ok(None);
        }
        if self.plain[..5] != EARLY_PAYLOAD_MAGIC {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.plain[5], self.plain[6], self.plain[7], self.plain[8]])
            as usize;
        if len > MAX_EARLY_PAYLOAD {
            return Err(invalid(format!(
                "early payload of {len} bytes is too large"
            )));
        }
        if !std::future::poll_fn(|cx| self.poll_fill(cx, 9 + len)).await? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "early payload cut short",
            ));
        }
        self.plain.advance(9);
        Ok(Some(self.plain.split_to(len).to_vec()))
    }

    /// Writes an early payload (server side), before any HTTP/2 bytes.
    pub fn queue_early_payload(&mut self, json: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(9 + json.len());
        msg.extend_from_slice(&EARLY_PAYLOAD_MAGIC);
        msg.extend_from_slice(&(json.len() as u32).to_be_bytes());
        msg.extend_from_slice(json);
        self.transport.seal(&msg, &mut self.wbuf).map_err(invalid)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for NoiseStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.plain.is_empty() && !ready!(this.poll_fill(cx, 1))? {
            return Poll::Ready(Ok(()));
        }
        let n = this.plain.len().min(buf.remaining());
        buf.put_slice(&this.plain[..n]);
        this.plain.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for NoiseStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        let n = buf.len().min(WRITE_CHUNK);
        this.transport
            .seal(&buf[..n], &mut this.wbuf)
            .map_err(invalid)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> (Transport, Transport) {
        (
            Transport::new(&[1; 32], &[2; 32]),
            Transport::new(&[2; 32], &[1; 32]),
        )
    }

    #[tokio::test]
    async fn stream_carries_bytes_both_ways_in_small_pipes() {
        let (ta, tb) = pair();
        let (a, b) = tokio::io::duplex(100);
        let mut a = NoiseStream::new(a, ta, BytesMut::new());
        let mut b = NoiseStream::new(b, tb, BytesMut::new());
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&data).await.unwrap();
            a.flush().await.unwrap();
            a.shutdown().await.unwrap();
            a
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expect);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn early_payload_is_taken_and_other_bytes_are_left_for_http2() {
        let (ta, tb) = pair();
        let (a, b) = tokio::io::duplex(64 << 10);
        let mut server = NoiseStream::new(a, ta, BytesMut::new());
        let mut client = NoiseStream::new(b, tb, BytesMut::new());
        server
            .queue_early_payload(br#"{"nodeKeyChallenge":"chalpub:00"}"#)
            .unwrap();
        server
            .write_all(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        server.flush().await.unwrap();
        let early = client.read_early_payload().await.unwrap().unwrap();
        assert_eq!(early, br#"{"nodeKeyChallenge":"chalpub:00"}"#);
        let mut frame = [0u8; 9];
        client.read_exact(&mut frame).await.unwrap();
        assert_eq!(frame, *b"\x00\x00\x00\x04\x00\x00\x00\x00\x00");

        // Without an early payload the first bytes go to HTTP/2 untouched.
        let (ta, tb) = pair();
        let (a, b) = tokio::io::duplex(64 << 10);
        let mut server = NoiseStream::new(a, ta, BytesMut::new());
        let mut client = NoiseStream::new(b, tb, BytesMut::new());
        server.write_all(b"PRI * HTTP/2.0 settings").await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(client.read_early_payload().await.unwrap(), None);
        let mut s = [0u8; 23];
        client.read_exact(&mut s).await.unwrap();
        assert_eq!(&s, b"PRI * HTTP/2.0 settings");
    }

    #[tokio::test]
    async fn a_record_that_does_not_decrypt_is_an_error() {
        let (ta, _) = pair();
        let (mut a, b) = tokio::io::duplex(1024);
        let mut client = NoiseStream::new(b, ta, BytesMut::new());
        a.write_all(&[0x04, 0x00, 0x20]).await.unwrap();
        a.write_all(&[0u8; 32]).await.unwrap();
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
