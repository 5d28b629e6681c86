//! Curve25519 keys with Tailscale's typed text forms.
//!
//! Public keys print as `<prefix><64 lowercase hex>` (`nodekey:`, `discokey:`, `mkey:`);
//! node and machine private keys as `privkey:<64 hex>` and only through serde (for the
//! state file) — their `Debug` is redacted and they have no `Display`, so a private key
//! cannot reach a log line or an error message by accident.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};

/// Length of every key in this module.
pub const KEY_LEN: usize = 32;

/// Why a key's text form could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyParseError {
    #[error("key must start with {expected:?}")]
    MissingPrefix { expected: &'static str },
    #[error("key must be 64 hex characters after the prefix")]
    BadHex,
}

fn parse_hex32(s: &str) -> Result<[u8; KEY_LEN], KeyParseError> {
    let mut out = [0u8; KEY_LEN];
    if s.len() != KEY_LEN * 2 {
        return Err(KeyParseError::BadHex);
    }
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyParseError::BadHex)?;
    Ok(out)
}

fn parse_prefixed(s: &str, prefix: &'static str) -> Result<[u8; KEY_LEN], KeyParseError> {
    let rest = s
        .strip_prefix(prefix)
        .ok_or(KeyParseError::MissingPrefix { expected: prefix })?;
    parse_hex32(rest)
}

/// `[` + first five characters of the standard base64 of the key + `]`, as Tailscale logs keys.
fn short_form(bytes: &[u8; KEY_LEN]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("[{}]", &b64[..5])
}

/// Random private scalar, clamped as Curve25519 expects (what Go's `key.New*` stores).
fn random_clamped() -> [u8; KEY_LEN] {
    let mut b = [0u8; KEY_LEN];
    OsRng.fill_bytes(&mut b);
    b[0] &= 248;
    b[31] = (b[31] & 127) | 64;
    b
}

macro_rules! public_key {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name([u8; KEY_LEN]);

        impl $name {
            /// Text prefix of this key type.
            pub const PREFIX: &'static str = $prefix;

            pub const fn from_bytes(b: [u8; KEY_LEN]) -> Self {
                Self(b)
            }
            /// Key from a slice that must be exactly 32 bytes (wire formats).
            pub fn from_slice(b: &[u8]) -> Option<Self> {
                <[u8; KEY_LEN]>::try_from(b).ok().map(Self)
            }
            pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
                &self.0
            }
            pub fn is_zero(&self) -> bool {
                self.0 == [0u8; KEY_LEN]
            }
            /// Bare 64-hex form without prefix (DERP `Derp-Public-Key` header).
            pub fn untyped_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// Short display form for logs: `[abcde]`.
            pub fn short(&self) -> String {
                short_form(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($prefix)?;
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = KeyParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_prefixed(s, $prefix).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

macro_rules! private_key {
    ($(#[$doc:meta])* $name:ident, $public:ident) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name(StaticSecret);

        impl $name {
            /// A new random key from the operating system's randomness.
            pub fn generate() -> Self {
                Self(StaticSecret::from(random_clamped()))
            }
            pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
                Self(StaticSecret::from(b))
            }
            /// The raw secret, wiped from memory when the returned value is dropped.
            /// Handle with care: never log it.
            pub fn to_bytes(&self) -> zeroize::Zeroizing<[u8; KEY_LEN]> {
                zeroize::Zeroizing::new(self.0.to_bytes())
            }
            /// The secret as x25519-dalek's type (what boringtun takes), without a raw
            /// copy left behind: the clone is wiped when dropped.
            pub fn static_secret(&self) -> StaticSecret {
                self.0.clone()
            }
            pub fn public(&self) -> $public {
                $public(DalekPublic::from(&self.0).to_bytes())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(public={})", stringify!($name), self.public().short())
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                *self.to_bytes() == *other.to_bytes()
            }
        }
        impl Eq for $name {}
    };
}

macro_rules! private_key_text {
    ($name:ident) => {
        impl $name {
            /// `privkey:<64 hex>`: the form stored in state files. Never log it.
            pub fn to_secret_text(&self) -> String {
                format!("privkey:{}", hex::encode(*self.to_bytes()))
            }
        }

        impl FromStr for $name {
            type Err = KeyParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_prefixed(s, "privkey:").map(Self::from_bytes)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_secret_text())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                // The error never echoes the input: it may be a secret.
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

public_key!(
    /// A node's public key: its WireGuard static key and its DERP identity.
    NodePublic,
    "nodekey:"
);
public_key!(
    /// A disco public key (fresh at every start of the agent).
    DiscoPublic,
    "discokey:"
);
public_key!(
    /// A machine's long-lived public key (ts2021 Noise identity).
    MachinePublic,
    "mkey:"
);

private_key!(
    /// A node's private key (WireGuard static private key; also signs DERP ClientInfo).
    NodePrivate,
    NodePublic
);
private_key!(
    /// A disco private key. Not serialisable: a new one is made at every start.
    DiscoPrivate,
    DiscoPublic
);
private_key!(
    /// A machine's private key (ts2021 Noise static key).
    MachinePrivate,
    MachinePublic
);
private_key_text!(NodePrivate);
private_key_text!(MachinePrivate);

/// The pre-shared key that grants DERP mesh privileges: 64 hex characters with no prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct MeshKey([u8; KEY_LEN]);

impl MeshKey {
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        Self(b)
    }
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
    /// Bare hex (the form in `ClientInfo.meshKey` and in `--mesh-psk-file`). A secret.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// Comparison that takes the same time wherever the keys differ.
    pub fn ct_eq(&self, other: &MeshKey) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl FromStr for MeshKey {
    type Err = KeyParseError;
    /// Parses 64 hex characters; surrounding whitespace (a trailing newline in a file) is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s.trim()).map(Self)
    }
}

impl fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_text_round_trips_with_prefix() {
        let k = NodePrivate::generate().public();
        let s = k.to_string();
        assert!(s.starts_with("nodekey:"));
        assert_eq!(s.len(), 8 + 64);
        assert_eq!(s.parse::<NodePublic>().unwrap(), k);
        // A disco key is not a node key.
        assert_eq!(
            s.replace("nodekey:", "discokey:").parse::<NodePublic>(),
            Err(KeyParseError::MissingPrefix {
                expected: "nodekey:"
            })
        );
    }

    #[test]
    fn zero_key_still_has_prefix_and_64_zeros() {
        let z = MachinePublic::default();
        assert_eq!(z.to_string(), format!("mkey:{}", "0".repeat(64)));
        assert!(z.is_zero());
    }

    #[test]
    fn public_from_private_matches_rfc7748_vector() {
        // RFC 7748 section 6.1, Alice.
        let sk: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        let pk = NodePrivate::from_bytes(sk).public();
        assert_eq!(
            pk.untyped_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn private_key_serde_uses_privkey_prefix_and_debug_hides_it() {
        let k = NodePrivate::generate();
        let json = serde_json::to_string(&k).unwrap();
        assert!(json.starts_with("\"privkey:"));
        let back: NodePrivate = serde_json::from_str(&json).unwrap();
        assert_eq!(back, k);
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&hex::encode(k.to_bytes())));
        assert!(dbg.contains(&k.public().short()));
        let bad = serde_json::from_str::<NodePrivate>("\"privkey:zz\"").unwrap_err();
        assert!(!bad.to_string().contains("zz"));
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = NodePrivate::generate().to_bytes();
        let b = NodePrivate::generate().to_bytes();
        assert_ne!(a, b);
        assert_eq!(a[0] & 7, 0);
        assert_eq!(a[31] & 0xc0, 0x40);
    }

    #[test]
    fn short_form_is_first_five_base64_chars() {
        let k = NodePublic::from_bytes([0u8; 32]);
        assert_eq!(k.short(), "[AAAAA]");
        let k = NodePublic::from_bytes([0xff; 32]);
        assert_eq!(k.short(), "[/////]");
    }

    #[test]
    fn mesh_key_trims_whitespace_and_rejects_prefixes() {
        let hexs = "ab".repeat(32);
        let k: MeshKey = format!("  {hexs}\n").parse().unwrap();
        assert_eq!(k.to_hex(), hexs);
        assert!(format!("nodekey:{hexs}").parse::<MeshKey>().is_err());
        assert!(!format!("{k:?}").contains("ab"));
        assert!(k.ct_eq(&hexs.parse().unwrap()));
        assert!(!k.ct_eq(&"cd".repeat(32).parse().unwrap()));
    }
}
