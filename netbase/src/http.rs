//! HTTP/1.1 heads: reading one off a stream with a size cap, and parsing a request or
//! a response head (with `httparse`) into owned values.
//!
//! The callers speak just enough HTTP to upgrade a connection (DERP, the control
//! protocol's Noise upgrade), fetch a small answer (`/key`, a captive-portal check) or
//! serve a few endpoints; none of them needs a full HTTP stack.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Headers kept from one head; a head with more is malformed for our purposes.
pub const MAX_HEADERS: usize = 64;

/// Reads an HTTP/1.1 head (request or response) up to and including the blank line.
///
/// Returns the head and whatever was read after it. Fails with `InvalidData` when no
/// blank line came within `max` bytes and with `UnexpectedEof` when the stream ended
/// first. It waits as long as the stream does: callers put a deadline around it.
pub async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<(BytesMut, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    // Where the search for the blank line resumes: three bytes before the old end, so
    // a "\r\n\r\n" split across two reads is found.
    let mut searched = 0;
    loop {
        if let Some(end) = head_end(&buf, searched) {
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() >= max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP head too large",
            ));
        }
        buf.reserve(1024);
        // Never read past the cap: a peer sending a huge head costs at most `max`.
        let room = (max - buf.len()).min(buf.capacity() - buf.len()).max(1);
        let n = (&mut *r).take(room as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the end of the HTTP head",
            ));
        }
    }
}

/// The length of the head in `buf` (through the blank line), searching from `from`.
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| from + p + 4)
}

/// Headers as (name, value) pairs, values trimmed; names keep their case and are
/// matched without it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    fn from_parsed(hs: &[httparse::Header<'_>]) -> Self {
        Headers(
            hs.iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).trim().to_string(),
                    )
                })
                .collect(),
        )
    }

    /// The first value of header `name` (any case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
}

impl ResponseHead {
    /// Parses a complete response head; None if it is malformed or incomplete.
    pub fn parse(head: &[u8]) -> Option<ResponseHead> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return None,
        }
        Some(ResponseHead {
            status: resp.code?,
            reason: resp.reason.unwrap_or_default().to_string(),
            headers: Headers::from_parsed(resp.headers),
        })
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The target's path, without the query.
    pub path: String,
    /// The query after `?`, or empty.
    pub query: String,
    pub headers: Headers,
}

impl RequestHead {
    /// Parses a complete request head; None if it is malformed or incomplete.
    pub fn parse(head: &[u8]) -> Option<RequestHead> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return None,
        }
        let target = req.path?;
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Some(RequestHead {
            method: req.method?.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            headers: Headers::from_parsed(req.headers),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn head_split_across_reads_keeps_what_follows() {
        let (mut w, mut r) = tokio::io::duplex(3);
        let writer = tokio::spawn(async move {
            w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\nFRAME")
                .await
                .unwrap();
        });
        let (head, mut rest) = read_head(&mut r, 4096).await.unwrap();
        // Whatever followed the head is handed back, read in the same call or not.
        while rest.len() < 5 {
            r.read_buf(&mut rest).await.unwrap();
        }
        writer.await.unwrap();
        assert_eq!(&rest[..], b"FRAME");
        let h = ResponseHead::parse(&head).unwrap();
        assert_eq!(h.status, 101);
        assert_eq!(h.reason, "Switching Protocols");
        assert_eq!(h.headers.get("upgrade"), Some("DERP"));
    }

    #[tokio::test]
    async fn a_head_over_the_cap_fails_without_reading_more() {
        let big = vec![b'a'; 10_000];
        let mut r = &big[..];
        let e = read_head(&mut r, 1000).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // It stopped at the cap, not at the end of the input.
        assert_eq!(r.len(), 9000);
    }

    #[tokio::test]
    async fn an_early_close_is_eof() {
        let mut r = &b"HTTP/1.1 200 OK\r\n"[..];
        let e = read_head(&mut r, 1000).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn requests_split_path_and_query() {
        let r = RequestHead::parse(
            b"GET /derp/probe?x=1&y HTTP/1.1\r\nHost: a\r\nX-Thing:  v \r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/derp/probe");
        assert_eq!(r.query, "x=1&y");
        assert_eq!(r.headers.get("x-thing"), Some("v"));
        assert_eq!(r.headers.iter().count(), 2);
    }

    #[test]
    fn malformed_or_incomplete_heads_are_none() {
        assert!(ResponseHead::parse(b"HTTP/1.1 200 OK\r\n").is_none());
        assert!(ResponseHead::parse(b"garbage\r\n\r\n").is_none());
        assert!(RequestHead::parse(b"GET\r\n\r\n").is_none());
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("H{i}: v\r\n"))
            .collect();
        assert!(RequestHead::parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).is_none());
    }

    #[test]
    fn head_end_from_an_offset() {
        let b = b"GET / HTTP/1.1\r\n\r\nrest";
        assert_eq!(head_end(b, 0), Some(18));
        assert_eq!(head_end(b, 14), Some(18));
        assert_eq!(head_end(b, 15), None);
        assert_eq!(head_end(b, 100), None);
    }
}
