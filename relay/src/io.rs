//! Async plumbing shared by the client and the server: the byte stream type, a frame
//! reader that holds no buffer while its connection is idle, and a stream that replays
//! bytes already read past an HTTP head (read with `netbase::http::read_head`).
//!
//! Not for: protocol rules (see `frame`) or connection policy (client and server modules).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::frame::{self, FrameError, HEADER_LEN};

/// Any byte stream DERP can run over: TCP, TLS over TCP, or a WebSocket adapter.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ByteStream for T {}

/// A boxed [`ByteStream`].
pub type BoxStream = Box<dyn ByteStream>;

/// Bytes asked for per read while data is flowing.
const READ_CHUNK: usize = 64 << 10;
/// Bytes read at a frame boundary after the connection went quiet.
const IDLE_PROBE: usize = 128;

/// A frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a frame")]
    TruncatedFrame,
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads whole DERP frames from a stream.
///
/// While frames flow it reads in 64 KiB chunks; when a read would wait at a frame
/// boundary it drops its buffer and waits with a small stack probe instead, so an idle
/// connection costs a few hundred bytes rather than a full read buffer.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_len: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `prefix` holds bytes already read from the stream (after an HTTP head).
    pub fn new(inner: R, prefix: BytesMut, max_len: usize) -> Self {
        FrameReader {
            inner,
            buf: prefix,
            max_len,
        }
    }

    /// Change the frame length limit (the server allows a larger ClientInfo first).
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Whether a whole frame is already buffered (the next read will not wait).
    pub fn frame_buffered(&self) -> bool {
        matches!(frame::pending_len(&self.buf, self.max_len), Ok(Some(len)) if self.buf.len() >= HEADER_LEN + len)
    }

    /// The next frame as `(type, body)`; `Ok(None)` on a clean end of stream.
    pub async fn read_raw(&mut self) -> Result<Option<(u8, Bytes)>, ReadError> {
        loop {
            if let Some(f) = frame::decode(&mut self.buf, self.max_len)? {
                return Ok(Some(f));
            }
            if self.buf.is_empty() {
                if !self.read_at_boundary().await? {
                    return Ok(None);
                }
                continue;
            }
            let want = match frame::pending_len(&self.buf, self.max_len)? {
                Some(len) => HEADER_LEN + len - self.buf.len(),
                None => HEADER_LEN - self.buf.len(),
            };
            if self.buf.capacity() - self.buf.len() < want.max(4096) {
                self.buf.reserve(want.max(READ_CHUNK));
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::TruncatedFrame);
            }
        }
    }

    /// Reads at a frame boundary; returns false on end of stream.
    async fn read_at_boundary(&mut self) -> Result<bool, ReadError> {
        if self.buf.capacity() > 0 {
            // Data is probably flowing: try one chunk-sized read without waiting. The buffer
            // is empty, so reserving reuses its allocation from the start.
            self.buf.reserve(READ_CHUNK);
            let attempt = {
                let mut fut = pin!(self.inner.read_buf(&mut self.buf));
                poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
            };
            match attempt {
                Poll::Ready(Ok(0)) => return Ok(false),
                Poll::Ready(Ok(_)) => return Ok(true),
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => self.buf = BytesMut::new(),
            }
        }
        let mut probe = [0u8; IDLE_PROBE];
        let n = self.inner.read(&mut probe).await?;
        if n == 0 {
            return Ok(false);
        }
        self.buf.reserve(READ_CHUNK);
        self.buf.extend_from_slice(&probe[..n]);
        Ok(true)
    }
}

/// Writes `data` fully and flushes (TLS and WebSocket streams buffer until flushed).
pub async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    w.write_all(data).await?;
    w.flush().await
}

/// A stream that first yields `prefix`, then reads from `inner`; writes go to `inner`.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;
    use proto::NodePublic;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn reader_splits_frames_across_arbitrary_read_boundaries() {
        let (mut a, b) = tokio::io::duplex(7);
        let frames = vec![
            Frame::KeepAlive,
            Frame::SendPacket {
                dst: NodePublic::from_bytes([3; 32]),
                payload: Bytes::from(vec![9u8; 3000]),
            },
            Frame::Ping { data: [1; 8] },
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let writer = tokio::spawn(async move {
            a.write_all(&wire).await.unwrap();
        });
        let mut r = FrameReader::new(b, BytesMut::new(), frame::MAX_SERVER_RECV_FRAME);
        for f in &frames {
            let (t, body) = r.read_raw().await.unwrap().unwrap();
            assert_eq!(&Frame::parse(t, body).unwrap(), f);
        }
        writer.await.unwrap();
        assert!(r.read_raw().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn reader_reports_truncation_and_oversize() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"\x04\x00\x00\x00\x30abc").await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b, BytesMut::new(), 1000);
        assert!(matches!(r.read_raw().await, Err(ReadError::TruncatedFrame)));

        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"\x04\x7f\x00\x00\x00").await.unwrap();
        let mut r = FrameReader::new(b, BytesMut::new(), 1000);
        assert!(matches!(
            r.read_raw().await,
            Err(ReadError::Frame(FrameError::TooLong { .. }))
        ));
    }

    #[tokio::test]
    async fn prefix_bytes_come_first() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"\x00\x00\x00\x00").await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b, BytesMut::from(&b"\x06"[..]), 100);
        let (t, body) = r.read_raw().await.unwrap().unwrap();
        assert_eq!((t, body.len()), (0x06, 0));
    }
}
