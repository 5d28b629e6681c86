//! Framing of the map stream: each message is `length (u32, little-endian) ‖ body`, the
//! body zstd-compressed JSON when the request asked for `Compress: "zstd"`. This is the one
//! little-endian integer of the control protocol. Pure: bytes in, messages out.

use std::io::Read as _;

use bytes::{Buf, Bytes, BytesMut};

/// Largest framed message accepted (compressed size).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest decompressed message accepted.
pub const MAX_DECOMPRESSED: usize = 64 << 20;

/// A map-stream message that must end the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("map message of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    #[error("map message does not decompress: {0}")]
    Zstd(String),
    #[error("map message decompresses to more than {MAX_DECOMPRESSED} bytes")]
    TooLarge,
}

/// Takes one message body off the front of `buf`; `Ok(None)` when more bytes are needed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Appends one framed message.
pub fn encode(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

/// Decompresses a zstd message body, refusing output over [`MAX_DECOMPRESSED`].
pub fn decompress(body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let decoder =
        zstd::stream::read::Decoder::new(body).map_err(|e| FrameError::Zstd(e.to_string()))?;
    let mut out = Vec::new();
    decoder
        .take(MAX_DECOMPRESSED as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| FrameError::Zstd(e.to_string()))?;
    if out.len() > MAX_DECOMPRESSED {
        return Err(FrameError::TooLarge);
    }
    Ok(out)
}

/// Compresses a message body (server side).
pub fn compress(body: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(body, 3).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefix_is_little_endian() {
        let mut out = Vec::new();
        encode(b"{\"KeepAlive\":true}", &mut out);
        assert_eq!(&out[..4], &[18, 0, 0, 0]);
        let mut buf = BytesMut::from(&out[..]);
        assert_eq!(
            &decode(&mut buf).unwrap().unwrap()[..],
            b"{\"KeepAlive\":true}"
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_and_oversize_frames() {
        let mut out = Vec::new();
        encode(&[7u8; 300], &mut out);
        for cut in 0..out.len() {
            let mut part = BytesMut::from(&out[..cut]);
            assert_eq!(decode(&mut part).unwrap(), None);
            assert_eq!(part.len(), cut);
        }
        // 0x01000001 little-endian = 16 MiB + 1.
        let mut big = BytesMut::from(&[0x01, 0x00, 0x00, 0x01][..]);
        assert_eq!(decode(&mut big), Err(FrameError::TooLong(0x0100_0001)));
    }

    #[test]
    fn zstd_round_trip_and_garbage() {
        let json = br#"{"Peers":[{"ID":1}],"KeepAlive":false}"#;
        let c = compress(json);
        assert_eq!(&c[..4], &[0x28, 0xB5, 0x2F, 0xFD], "a standard zstd frame");
        assert_eq!(decompress(&c).unwrap(), json);
        assert!(decompress(b"not zstd").is_err());
    }
}
