//! The ts2021 transport record layer.
//!
//! Each record is `0x04 ‖ ciphertext length (BE u16) ‖ ChaCha20-Poly1305 ciphertext`,
//! at most 4096 bytes in all, so at most 4077 bytes of plaintext. The 12-byte nonce is four
//! zero bytes followed by a per-direction 64-bit counter written **big-endian**. That
//! differs from the Noise specification (little-endian), which is why this layer is written
//! here and not taken from the Noise library.

use bytes::{Buf, BytesMut};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};

/// Record type byte of transport data.
pub const RECORD_TYPE: u8 = 0x04;
/// Type byte + length.
pub const HEADER_LEN: usize = 3;
/// Largest record, header included.
pub const MAX_RECORD_LEN: usize = 4096;
/// Largest ciphertext in one record.
pub const MAX_CIPHERTEXT_LEN: usize = MAX_RECORD_LEN - HEADER_LEN;
const TAG_LEN: usize = 16;
/// Largest plaintext in one record.
pub const MAX_PLAINTEXT_LEN: usize = MAX_CIPHERTEXT_LEN - TAG_LEN;

/// A record that must end the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record type {0:#04x} where transport data (0x04) was expected")]
    UnexpectedType(u8),
    #[error("record of {0} bytes is over the 4096-byte limit")]
    TooLong(usize),
    #[error("record is shorter than its authentication tag")]
    TooShort,
    #[error("record does not decrypt")]
    Decrypt,
    #[error("nonce counter exhausted")]
    NonceExhausted,
}

/// One direction: a key and its record counter.
struct CipherState {
    aead: ChaCha20Poly1305,
    counter: u64,
}

impl CipherState {
    fn new(key: &[u8; 32]) -> Self {
        CipherState {
            aead: ChaCha20Poly1305::new(Key::from_slice(key)),
            counter: 0,
        }
    }

    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.counter == u64::MAX {
            return Err(RecordError::NonceExhausted);
        }
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Ok(*Nonce::from_slice(&n))
    }
}

/// Both directions of an established ts2021 connection.
pub struct Transport {
    send: CipherState,
    recv: CipherState,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Transport(sent={}, received={})",
            self.send.counter, self.recv.counter
        )
    }
}

impl Transport {
    /// From the keys the handshake's split produced.
    pub fn new(send_key: &[u8; 32], recv_key: &[u8; 32]) -> Self {
        Transport {
            send: CipherState::new(send_key),
            recv: CipherState::new(recv_key),
        }
    }

    /// Encrypts `plaintext` into as many records as it needs and appends them to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in plaintext.chunks(MAX_PLAINTEXT_LEN) {
            let nonce = self.send.next_nonce()?;
            let start = out.len();
            out.push(RECORD_TYPE);
            out.extend_from_slice(&((chunk.len() + TAG_LEN) as u16).to_be_bytes());
            out.extend_from_slice(chunk);
            let body = &mut out[start + HEADER_LEN..];
            let tag = self
                .send
                .aead
                .encrypt_in_place_detached(&nonce, b"", body)
                .map_err(|_| RecordError::Decrypt)?;
            out.extend_from_slice(&tag);
        }
        Ok(())
    }

    /// Takes one whole record off the front of `buf` and returns its plaintext;
    /// `Ok(None)` when more bytes are needed. The length limit is checked as soon as the
    /// header is in.
    pub fn open(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<u8>>, RecordError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if buf[0] != RECORD_TYPE {
            return Err(RecordError::UnexpectedType(buf[0]));
        }
        let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
        if len > MAX_CIPHERTEXT_LEN {
            return Err(RecordError::TooLong(HEADER_LEN + len));
        }
        if len < TAG_LEN {
            return Err(RecordError::TooShort);
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let record = buf.split_to(len);
        let (ct, tag) = record.split_at(len - TAG_LEN);
        let mut plain = ct.to_vec();
        let nonce = self.recv.next_nonce()?;
        self.recv
            .aead
            .decrypt_in_place_detached(&nonce, b"", &mut plain, Tag::from_slice(tag))
            .map_err(|_| RecordError::Decrypt)?;
        Ok(Some(plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> [u8; 32] {
        std::array::from_fn(|i| i as u8 + 1)
    }

    /// Produced with Go's `golang.org/x/crypto/chacha20poly1305` (what Tailscale uses), key
    /// 01..20, nonces 4 zero bytes ‖ big-endian counter 0 and 1.
    const RECORD0: &str = "0400150befbb7a08c1128094b11c8c59148cd009f21704e5";
    const RECORD1: &str = "040015633308c7ec9c485931429ddcb70595185802e8e13a";

    #[test]
    fn records_match_known_vectors_including_big_endian_second_nonce() {
        let mut t = Transport::new(&key(), &[9; 32]);
        let mut out = Vec::new();
        t.seal(b"hello", &mut out).unwrap();
        assert_eq!(hex::encode(&out), RECORD0);
        out.clear();
        t.seal(b"world", &mut out).unwrap();
        assert_eq!(hex::encode(&out), RECORD1, "counter 1 must be big-endian");

        let mut rx = Transport::new(&[9; 32], &key());
        let mut buf = BytesMut::from(&hex::decode(format!("{RECORD0}{RECORD1}")).unwrap()[..]);
        assert_eq!(rx.open(&mut buf).unwrap().unwrap(), b"hello");
        assert_eq!(rx.open(&mut buf).unwrap().unwrap(), b"world");
        assert!(buf.is_empty());
    }

    #[test]
    fn little_endian_counter_would_not_decrypt_the_second_record() {
        // Counter 0 is the same either way; counter 1 is where implementations differ.
        let mut rx = Transport::new(&[9; 32], &key());
        rx.recv.counter = 1u64.swap_bytes();
        let mut buf = BytesMut::from(&hex::decode(RECORD1).unwrap()[..]);
        assert_eq!(rx.open(&mut buf), Err(RecordError::Decrypt));
    }

    #[test]
    fn large_writes_split_into_full_records() {
        let mut a = Transport::new(&[1; 32], &[2; 32]);
        let mut b = Transport::new(&[2; 32], &[1; 32]);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        a.seal(&data, &mut wire).unwrap();
        assert_eq!(wire.len(), 10_000 + 3 * (HEADER_LEN + TAG_LEN));
        assert_eq!(
            &wire[..3],
            &[0x04, 0x0f, 0xfd],
            "first record is exactly 4096 bytes"
        );
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire {
            buf.extend_from_slice(&[byte]);
            while let Some(p) = b.open(&mut buf).unwrap() {
                got.extend_from_slice(&p);
            }
        }
        assert_eq!(got, data);
    }

    #[test]
    fn bad_records_are_errors() {
        let mut rx = Transport::new(&[9; 32], &key());
        let mut over = BytesMut::from(&[0x04, 0x0f, 0xfe][..]);
        assert_eq!(rx.open(&mut over), Err(RecordError::TooLong(4097)));
        let mut wrong_type = BytesMut::from(&[0x02, 0x00, 0x30][..]);
        assert_eq!(
            rx.open(&mut wrong_type),
            Err(RecordError::UnexpectedType(2))
        );
        let mut short = BytesMut::from(&[0x04, 0x00, 0x05, 1, 2, 3, 4, 5][..]);
        assert_eq!(rx.open(&mut short), Err(RecordError::TooShort));
        let mut tampered = BytesMut::from(&hex::decode(RECORD0).unwrap()[..]);
        tampered[5] ^= 1;
        assert_eq!(rx.open(&mut tampered), Err(RecordError::Decrypt));
    }
}
