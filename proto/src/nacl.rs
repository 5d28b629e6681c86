//! The NaCl box (X25519 + XSalsa20-Poly1305) as DERP and disco use it.
//!
//! Sealed layout, as Go's `nacl/box` and libsodium's `crypto_box_easy` produce it:
//! `nonce[24] ‖ tag[16] ‖ ciphertext`. The tag comes *before* the ciphertext; this module
//! writes it explicitly with detached encryption so the layout never depends on a crate's
//! default. Not for: anything beyond sealing and opening one message.

use crypto_box::aead::AeadInPlace;
use crypto_box::{Nonce, SalsaBox, Tag};
use rand::rngs::OsRng;
use rand::RngCore as _;

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed message adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// The box could not be opened: too short, wrong keys or tampered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sealed box does not open with these keys")]
pub struct OpenError;

/// A precomputed box between one private key and one peer public key
/// (`crypto_box_beforenm`): seal to the peer, open what the peer sealed to us.
pub struct SharedBox(SalsaBox);

impl std::fmt::Debug for SharedBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedBox(<secret>)")
    }
}

impl SharedBox {
    /// `private` is our raw private key, `peer` the other side's raw public key.
    pub fn new(private: &[u8; 32], peer: &[u8; 32]) -> Self {
        let sk = crypto_box::SecretKey::from_bytes(*private);
        let pk = crypto_box::PublicKey::from_bytes(*peer);
        SharedBox(SalsaBox::new(&pk, &sk))
    }

    /// Seal with a fresh random nonce.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        self.seal_with_nonce(&nonce, plaintext)
    }

    /// Seal with a caller's nonce (tests and golden vectors; never reuse a nonce).
    pub fn seal_with_nonce(&self, nonce: &[u8; NONCE_LEN], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.extend_from_slice(nonce);
        out.extend_from_slice(&[0u8; TAG_LEN]);
        out.extend_from_slice(plaintext);
        let (head, body) = out.split_at_mut(OVERHEAD);
        // Encryption with a 24-byte nonce and in-memory buffer cannot fail.
        if let Ok(tag) = self
            .0
            .encrypt_in_place_detached(Nonce::from_slice(nonce), b"", body)
        {
            head[NONCE_LEN..].copy_from_slice(&tag);
        }
        out
    }

    /// Open `nonce ‖ tag ‖ ciphertext`.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < OVERHEAD {
            return Err(OpenError);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (tag, ct) = rest.split_at(TAG_LEN);
        let mut buf = ct.to_vec();
        self.0
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                b"",
                &mut buf,
                Tag::from_slice(tag),
            )
            .map_err(|_| OpenError)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodePrivate;

    /// Produced by Go's `golang.org/x/crypto/nacl/box.Seal` (what derper and tailscaled use)
    /// with private key a = 01..20, peer private key b = 80..9f and nonce 40..57.
    #[test]
    fn seal_matches_go_nacl_box_bytes() {
        let a: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
        let b: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
        let nonce: [u8; 24] = std::array::from_fn(|i| 0x40 + i as u8);
        let b_pub = NodePrivate::from_bytes(b).public();
        assert_eq!(
            b_pub.untyped_hex(),
            "493e82fc74464a59268817623d2053c5eb8e2cc4a988b4fee179ec6b010d531d"
        );
        let sealed = SharedBox::new(&a, b_pub.as_bytes())
            .seal_with_nonce(&nonce, br#"{"version":2,"CanAckPings":true}"#);
        assert_eq!(
            hex::encode(&sealed),
            "404142434445464748494a4b4c4d4e4f5051525354555657\
             a60f44b786d2109bf4a20d9f2c19c939\
             aabff780ce9e4399be2b0042aa107cb5c04b6a089c5d18dfbec1528c3c0387ee"
        );
        let a_pub = NodePrivate::from_bytes(a).public();
        let opened = SharedBox::new(&b, a_pub.as_bytes()).open(&sealed).unwrap();
        assert_eq!(opened, br#"{"version":2,"CanAckPings":true}"#);
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let a = NodePrivate::generate();
        let b = NodePrivate::generate();
        let ab = SharedBox::new(&a.to_bytes(), b.public().as_bytes());
        let ba = SharedBox::new(&b.to_bytes(), a.public().as_bytes());
        let sealed = ab.seal(b"hello");
        assert_eq!(sealed.len(), 5 + OVERHEAD);
        assert_eq!(ba.open(&sealed).unwrap(), b"hello");
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert_eq!(ba.open(&bad), Err(OpenError));
        assert_eq!(ba.open(&sealed[..OVERHEAD - 1]), Err(OpenError));
    }
}
