//! HTTP/1.1 chunked transfer coding, decoded from a buffer: used for the `/key` answer,
//! the one HTTP/1 body the control client reads. Pure (bytes in, body out) so that unit
//! tests and the fuzzer reach it directly. Not a general HTTP/1 client: no streaming of
//! large bodies, no trailer fields kept.
//!
//! Everything about the input is untrusted: a chunk size is parsed with checked
//! arithmetic and compared with the body limit before any byte of the chunk is awaited,
//! so `ffffffffffffffff` is an error, never an overflow or an allocation.

/// Longest chunk-size line accepted (size, extensions and CRLF).
pub const MAX_LINE: usize = 4096;

/// A chunked body that cannot be decoded. Every variant ends the read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("chunk size is not hexadecimal")]
    BadSize,
    #[error("chunk-size line is longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("chunked body is over the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("chunk data is not followed by CRLF")]
    MissingCrlf,
    #[error("line of the chunked body holds a bare CR or LF")]
    BadLine,
}

/// A whole chunked body: its data and how many input bytes it took (up to and including
/// the CRLF that ends the trailer section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub body: Vec<u8>,
    pub consumed: usize,
}

/// Decodes the chunked body at the start of `buf`, refusing data over `limit` bytes.
/// `Ok(None)` when `buf` ends before the body does (read more, then call again).
pub fn decode(buf: &[u8], limit: usize) -> Result<Option<Decoded>, ChunkedError> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let Some(line) = line_at(buf, pos)? else {
            return Ok(None);
        };
        let size = chunk_size(&buf[pos..pos + line])?;
        pos += line + 2;
        if size == 0 {
            break;
        }
        if size > limit - body.len() {
            return Err(ChunkedError::TooLarge { limit });
        }
        // `size` ≤ `limit`, so neither sum can overflow for any real buffer.
        let data_end = pos.saturating_add(size);
        if buf.len() < data_end.saturating_add(2) {
            return Ok(None);
        }
        if &buf[data_end..data_end + 2] != b"\r\n" {
            return Err(ChunkedError::MissingCrlf);
        }
        body.extend_from_slice(&buf[pos..data_end]);
        pos = data_end + 2;
    }
    // Trailer fields (ignored) up to an empty line.
    loop {
        let Some(line) = line_at(buf, pos)? else {
            return Ok(None);
        };
        pos += line + 2;
        if line == 0 {
            return Ok(Some(Decoded {
                body,
                consumed: pos,
            }));
        }
    }
}

/// The length of the line starting at `pos` (without its CRLF); `None` if its CRLF has
/// not arrived yet.
fn line_at(buf: &[u8], pos: usize) -> Result<Option<usize>, ChunkedError> {
    let rest = buf.get(pos..).unwrap_or_default();
    let window = &rest[..rest.len().min(MAX_LINE)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(n) => {
            if window[..n].iter().any(|&b| b == b'\r' || b == b'\n') {
                return Err(ChunkedError::BadLine);
            }
            Ok(Some(n))
        }
        None if rest.len() >= MAX_LINE => Err(ChunkedError::LineTooLong),
        None if window.contains(&b'\n') => Err(ChunkedError::BadLine),
        None => Ok(None),
    }
}

/// `1*HEXDIG [ BWS ";" chunk-ext ]`: the size, checked for overflow.
fn chunk_size(line: &[u8]) -> Result<usize, ChunkedError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ChunkedError::BadSize);
    }
    let after = &line[digits..];
    let after = &after[after
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !(after.is_empty() || after[0] == b';') {
        return Err(ChunkedError::BadSize);
    }
    let mut size = 0usize;
    for &d in &line[..digits] {
        let v = (d as char).to_digit(16).ok_or(ChunkedError::BadSize)? as usize;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(v))
            .ok_or(ChunkedError::TooLarge { limit: usize::MAX })?;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64 << 10;

    fn body(input: &[u8]) -> Result<Option<Vec<u8>>, ChunkedError> {
        decode(input, LIMIT).map(|d| d.map(|d| d.body))
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let input =
            b"4\r\nWiki\r\n5;x=y\r\npedia\r\nE \r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nnext";
        let d = decode(input, LIMIT).unwrap().unwrap();
        assert_eq!(d.body, b"Wikipedia in\r\n\r\nchunks.");
        assert_eq!(&input[d.consumed..], b"next");
        assert_eq!(body(b"0\r\n\r\n").unwrap().unwrap(), b"");
        assert_eq!(
            body(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap().unwrap(),
            b"0123456789"
        );
    }

    #[test]
    fn a_body_cut_anywhere_asks_for_more() {
        let input = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\nX-T: 1\r\n\r\n";
        for end in 0..input.len() {
            assert_eq!(body(&input[..end]), Ok(None), "cut at {end}");
        }
        assert!(body(input).unwrap().is_some());
    }

    #[test]
    fn overflowing_and_oversized_chunk_sizes_are_errors() {
        for size in [
            "ffffffffffffffff",
            "fffffffffffffffe",
            "10000000000000000",
            "ffffffffffffffffffffffffffffffff",
            "7fffffffffffffff",
            "ffffffff",
        ] {
            let input = format!("{size}\r\nab\r\n0\r\n\r\n");
            assert!(
                matches!(body(input.as_bytes()), Err(ChunkedError::TooLarge { .. })),
                "{size}"
            );
        }
        // Just over the limit, alone or added to earlier chunks.
        assert_eq!(
            decode(b"11\r\n", 16),
            Err(ChunkedError::TooLarge { limit: 16 })
        );
        assert_eq!(
            decode(b"8\r\n12345678\r\n9\r\n", 16),
            Err(ChunkedError::TooLarge { limit: 16 })
        );
        assert!(decode(b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n", 16)
            .unwrap()
            .is_some());
    }

    #[test]
    fn malformed_sizes_and_framing_are_errors() {
        let cases: &[(&[u8], ChunkedError)] = &[
            (b"zz\r\n", ChunkedError::BadSize),
            (b"\r\n", ChunkedError::BadSize),
            (b" 4\r\nWiki\r\n0\r\n\r\n", ChunkedError::BadSize),
            (b"-4\r\nWiki\r\n0\r\n\r\n", ChunkedError::BadSize),
            (b"+4\r\nWiki\r\n0\r\n\r\n", ChunkedError::BadSize),
            (b"0x4\r\nWiki\r\n0\r\n\r\n", ChunkedError::BadSize),
            (b"4 4\r\nWiki\r\n0\r\n\r\n", ChunkedError::BadSize),
            (b"4\r\nWikiXY0\r\n\r\n", ChunkedError::MissingCrlf),
            (b"4\r\nWiki\n0\r\n\r\n", ChunkedError::MissingCrlf),
            (b"4\nWiki\r\n0\r\n\r\n", ChunkedError::BadLine),
            (b"4\n", ChunkedError::BadLine),
            (b"4\rx\r\nWiki\r\n0\r\n\r\n", ChunkedError::BadLine),
            (b"0\r\nX: \n\r\n\r\n", ChunkedError::BadLine),
        ];
        for (input, want) in cases {
            assert_eq!(
                body(input).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = vec![b'1'; MAX_LINE + 10];
        assert_eq!(body(&long), Err(ChunkedError::LineTooLong));
        let mut ext = b"4;".to_vec();
        ext.extend(vec![b'x'; MAX_LINE]);
        assert_eq!(body(&ext), Err(ChunkedError::LineTooLong));
    }

    #[test]
    fn arbitrary_input_never_panics_and_never_exceeds_the_limit() {
        // A cheap stand-in for the fuzzer (fuzz/fuzz_targets/chunked_body.rs): random
        // bytes from a small alphabet that makes well-formed pieces likely.
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"0123456789abcdefABCDEFxz;= \t\r\n";
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            if let Ok(Some(d)) = decode(&input, 16) {
                assert!(d.body.len() <= 16);
                assert!(d.consumed <= input.len());
            }
        }
    }
}
