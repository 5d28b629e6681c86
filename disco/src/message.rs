//! Disco messages and their sealing, byte for byte as tailscaled speaks them
//! (docs/protocols.md §2): `magic "TS💬" ‖ sender disco key ‖ nonce ‖ tag ‖ ciphertext`,
//! the plaintext being `type ‖ version ‖ body`. Parsing never panics: short, oversize,
//! wrongly sealed or unknown messages come back as errors or [`Message::Unknown`].

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use proto::nacl::SharedBox;
use proto::{DiscoPrivate, DiscoPublic, NodePublic};

/// The six bytes every disco packet starts with: "TS" and the speech-balloon emoji.
pub const MAGIC: [u8; 6] = [0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
/// Magic + sender key.
pub const HEADER_LEN: usize = 6 + 32;
/// Magic + sender key + nonce: the smallest possible wrapper (Tailscale's
/// `LooksLikeDiscoWrapper`).
pub const MIN_WRAPPER_LEN: usize = HEADER_LEN + 24;
/// Largest disco packet we open (pings padded for path-MTU probing stay below this).
pub const MAX_PACKET: usize = 10_000;

const TYPE_PING: u8 = 0x01;
const TYPE_PONG: u8 = 0x02;
const TYPE_CALL_ME_MAYBE: u8 = 0x03;
const VERSION: u8 = 0;

/// A transaction ID of a ping and its pong.
pub type TxId = [u8; 12];

/// A disco message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// "Are you there?" sent to a candidate path; `node_key` lets the receiver bind the
    /// path to our node; `padding` zero bytes make it bigger (path-MTU probes).
    Ping {
        tx_id: TxId,
        node_key: Option<NodePublic>,
        padding: usize,
    },
    /// The answer, on the path the ping came by, with the address the ping came from.
    Pong { tx_id: TxId, src: SocketAddr },
    /// "Ping me at these addresses" — only ever sent through a relay.
    CallMeMaybe { endpoints: Vec<SocketAddr> },
    /// A message type this implementation does not handle (ignored, not an error).
    Unknown { kind: u8 },
}

/// Why a packet was not a usable disco message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiscoError {
    #[error("too short for a disco packet")]
    TooShort,
    #[error("larger than any disco packet")]
    TooLong,
    #[error("no disco magic")]
    BadMagic,
    #[error("does not open with this peer's key")]
    OpenFailed,
    #[error("malformed disco message")]
    Malformed,
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 16] = b.get(..16)?.try_into().ok()?;
    let port = u16::from_be_bytes([*b.get(16)?, *b.get(17)?]);
    let ip = Ipv6Addr::from(ip);
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    };
    Some(SocketAddr::new(ip, port))
}

impl Message {
    /// The plaintext: `type ‖ version ‖ body`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Message::Ping {
                tx_id,
                node_key,
                padding,
            } => {
                out.extend_from_slice(&[TYPE_PING, VERSION]);
                out.extend_from_slice(tx_id);
                if let Some(k) = node_key {
                    out.extend_from_slice(k.as_bytes());
                }
                out.resize(out.len() + padding, 0);
            }
            Message::Pong { tx_id, src } => {
                out.extend_from_slice(&[TYPE_PONG, VERSION]);
                out.extend_from_slice(tx_id);
                put_addr(&mut out, src);
            }
            Message::CallMeMaybe { endpoints } => {
                out.extend_from_slice(&[TYPE_CALL_ME_MAYBE, VERSION]);
                for e in endpoints {
                    put_addr(&mut out, e);
                }
            }
            Message::Unknown { kind } => out.extend_from_slice(&[*kind, VERSION]),
        }
        out
    }

    /// Parses a plaintext. Trailing bytes are ignored, as tailscaled does.
    pub fn parse(p: &[u8]) -> Result<Message, DiscoError> {
        let (&kind, rest) = p.split_first().ok_or(DiscoError::Malformed)?;
        let (&version, body) = rest.split_first().ok_or(DiscoError::Malformed)?;
        match kind {
            TYPE_PING => {
                let tx_id: TxId = body
                    .get(..12)
                    .and_then(|b| b.try_into().ok())
                    .ok_or(DiscoError::Malformed)?;
                let after = &body[12..];
                let (node_key, padding) = if after.len() >= 32 {
                    (NodePublic::from_slice(&after[..32]), after.len() - 32)
                } else {
                    (None, after.len())
                };
                Ok(Message::Ping {
                    tx_id,
                    node_key,
                    padding,
                })
            }
            TYPE_PONG => {
                if body.len() < 30 {
                    return Err(DiscoError::Malformed);
                }
                let tx_id: TxId = body[..12].try_into().map_err(|_| DiscoError::Malformed)?;
                let src = get_addr(&body[12..30]).ok_or(DiscoError::Malformed)?;
                Ok(Message::Pong { tx_id, src })
            }
            TYPE_CALL_ME_MAYBE => {
                // Wrong length or version: an empty list, as tailscaled treats it.
                if version != VERSION || body.is_empty() || body.len() % 18 != 0 {
                    return Ok(Message::CallMeMaybe {
                        endpoints: Vec::new(),
                    });
                }
                let endpoints = body.chunks_exact(18).filter_map(get_addr).collect();
                Ok(Message::CallMeMaybe { endpoints })
            }
            other => Ok(Message::Unknown { kind: other }),
        }
    }
}

/// Whether a datagram on the shared socket is disco (§2.2: the magic, and at least the
/// magic and a sender key).
pub fn looks_like_disco(pkt: &[u8]) -> bool {
    pkt.len() >= HEADER_LEN && pkt[..6] == MAGIC
}

/// The sender's disco key, read before any cryptography so packets from keys not in the
/// netmap can be dropped cheaply.
pub fn sender_key(pkt: &[u8]) -> Option<DiscoPublic> {
    if !looks_like_disco(pkt) {
        return None;
    }
    DiscoPublic::from_slice(&pkt[6..HEADER_LEN])
}

/// The precomputed box between our disco key and one peer's: seals what we send it and
/// opens what it sends us.
pub struct DiscoBox(SharedBox);

impl std::fmt::Debug for DiscoBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiscoBox")
    }
}

impl DiscoBox {
    pub fn new(me: &DiscoPrivate, peer: &DiscoPublic) -> Self {
        DiscoBox(SharedBox::new(&me.to_bytes(), peer.as_bytes()))
    }

    fn wrap(sender: &DiscoPublic, sealed: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(sender.as_bytes());
        out.extend_from_slice(&sealed);
        out
    }

    /// The packet carrying `msg`, from `sender` (our public disco key), random nonce.
    pub fn seal(&self, sender: &DiscoPublic, msg: &Message) -> Vec<u8> {
        Self::wrap(sender, self.0.seal(&msg.encode()))
    }

    /// Seals an already encoded message.
    pub fn seal_plaintext(&self, sender: &DiscoPublic, plaintext: &[u8]) -> Vec<u8> {
        Self::wrap(sender, self.0.seal(plaintext))
    }

    /// As [`DiscoBox::seal`] with a chosen nonce (for golden-byte tests).
    pub fn seal_with_nonce(
        &self,
        sender: &DiscoPublic,
        nonce: &[u8; 24],
        msg: &Message,
    ) -> Vec<u8> {
        Self::wrap(sender, self.0.seal_with_nonce(nonce, &msg.encode()))
    }

    /// Opens a packet from this peer.
    pub fn open(&self, pkt: &[u8]) -> Result<Message, DiscoError> {
        if pkt.len() > MAX_PACKET {
            return Err(DiscoError::TooLong);
        }
        if pkt.len() < MIN_WRAPPER_LEN {
            return Err(if pkt.len() >= 6 && pkt[..6] != MAGIC {
                DiscoError::BadMagic
            } else {
                DiscoError::TooShort
            });
        }
        if pkt[..6] != MAGIC {
            return Err(DiscoError::BadMagic);
        }
        let plain = self
            .0
            .open(&pkt[HEADER_LEN..])
            .map_err(|_| DiscoError::OpenFailed)?;
        Message::parse(&plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (DiscoPrivate, DiscoPrivate) {
        (
            DiscoPrivate::from_bytes([1; 32]),
            DiscoPrivate::from_bytes([2; 32]),
        )
    }

    #[test]
    fn ping_plaintext_golden_bytes() {
        let m = Message::Ping {
            tx_id: [0xAA; 12],
            node_key: Some(NodePublic::from_bytes([0x11; 32])),
            padding: 0,
        };
        let mut want = vec![0x01, 0x00];
        want.extend_from_slice(&[0xAA; 12]);
        want.extend_from_slice(&[0x11; 32]);
        assert_eq!(m.encode(), want);
        assert_eq!(Message::parse(&want).unwrap(), m);
        // Old clients send no node key; padding is counted.
        let mut old = vec![0x01, 0x00];
        old.extend_from_slice(&[0xBB; 12]);
        assert_eq!(
            Message::parse(&old).unwrap(),
            Message::Ping {
                tx_id: [0xBB; 12],
                node_key: None,
                padding: 0
            }
        );
        let padded = Message::Ping {
            tx_id: [1; 12],
            node_key: Some(NodePublic::from_bytes([3; 32])),
            padding: 100,
        };
        assert_eq!(padded.encode().len(), 2 + 12 + 32 + 100);
        assert_eq!(Message::parse(&padded.encode()).unwrap(), padded);
    }

    #[test]
    fn pong_plaintext_golden_bytes_v4_mapped_and_v6() {
        let m = Message::Pong {
            tx_id: [0x01; 12],
            src: "198.51.100.7:41641".parse().unwrap(),
        };
        let mut want = vec![0x02, 0x00];
        want.extend_from_slice(&[0x01; 12]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 198, 51, 100, 7]);
        want.extend_from_slice(&41641u16.to_be_bytes());
        assert_eq!(m.encode(), want);
        assert_eq!(Message::parse(&want).unwrap(), m);
        let v6 = Message::Pong {
            tx_id: [2; 12],
            src: "[2001:db8::9]:7".parse().unwrap(),
        };
        assert_eq!(Message::parse(&v6.encode()).unwrap(), v6);
        // Trailing bytes are ignored.
        let mut longer = want.clone();
        longer.extend_from_slice(b"future");
        assert_eq!(Message::parse(&longer).unwrap(), m);
        assert_eq!(Message::parse(&want[..31]), Err(DiscoError::Malformed));
    }

    #[test]
    fn call_me_maybe_golden_bytes_and_bad_lengths() {
        let eps: Vec<SocketAddr> = vec![
            "203.0.113.5:41641".parse().unwrap(),
            "[2001:db8::1]:41641".parse().unwrap(),
        ];
        let m = Message::CallMeMaybe {
            endpoints: eps.clone(),
        };
        let enc = m.encode();
        assert_eq!(enc.len(), 2 + 18 * 2);
        assert_eq!(&enc[..2], &[0x03, 0x00]);
        assert_eq!(
            &enc[2..18],
            &"::ffff:203.0.113.5".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(Message::parse(&enc).unwrap(), m);
        let empty = Message::CallMeMaybe { endpoints: vec![] };
        assert_eq!(Message::parse(&enc[..enc.len() - 1]).unwrap(), empty);
        assert_eq!(Message::parse(&[0x03, 0x00]).unwrap(), empty);
        let mut v1 = enc.clone();
        v1[1] = 1;
        assert_eq!(Message::parse(&v1).unwrap(), empty);
    }

    #[test]
    fn sealed_sizes_and_layout_match_tailscale() {
        let (a, b) = keys();
        let bx = DiscoBox::new(&a, &b.public());
        let ping = Message::Ping {
            tx_id: [7; 12],
            node_key: Some(NodePublic::from_bytes([9; 32])),
            padding: 0,
        };
        let nonce = [0x42; 24];
        let pkt = bx.seal_with_nonce(&a.public(), &nonce, &ping);
        assert_eq!(pkt.len(), 124);
        assert_eq!(&pkt[..6], &MAGIC);
        assert_eq!(&pkt[6..38], a.public().as_bytes());
        assert_eq!(&pkt[38..62], &nonce);
        assert_eq!(sender_key(&pkt), Some(a.public()));
        let pong = Message::Pong {
            tx_id: [7; 12],
            src: "192.0.2.1:1".parse().unwrap(),
        };
        assert_eq!(bx.seal(&a.public(), &pong).len(), 110);
        let cmm = Message::CallMeMaybe {
            endpoints: vec!["192.0.2.1:1".parse().unwrap(); 3],
        };
        assert_eq!(bx.seal(&a.public(), &cmm).len(), 80 + 18 * 3);
        // The peer opens it with its own box.
        let back = DiscoBox::new(&b, &a.public());
        assert_eq!(back.open(&pkt).unwrap(), ping);
        assert_eq!(back.open(&bx.seal(&a.public(), &pong)).unwrap(), pong);
    }

    /// Produced by Tailscale's own `disco` package (v1.102.3: `AppendMarshal`) and sealed
    /// with Go's `golang.org/x/crypto/nacl/box` (`SealAfterPrecomputation`, as tailscaled
    /// does): keys [1; 32] → [2; 32], nonce 0x42…; tx 3… for the pongs, tx 7… and node
    /// key 9… for the pings. Each row: our message, Go's plaintext, Go's sealed packet.
    fn go_vectors() -> Vec<(Message, &'static str, &'static str)> {
        vec![
            (
                Message::Ping {
                    tx_id: [7; 12],
                    node_key: Some(NodePublic::from_bytes([9; 32])),
                    padding: 0,
                },
                "01000707070707070707070707070909090909090909090909090909090909090909090909090909090909090909",
                "5453f09f92aca4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209424242424242424242424242424242424242424242424242b48fdb2d3b715366dba8dd25314f67bc1c4d38c5c6b863a6508edd71611609d2d9d71741c233bf67f99946a49c64a55337a25f32bf9275d616ff6866d2d8",
            ),
            (
                Message::Ping {
                    tx_id: [7; 12],
                    node_key: Some(NodePublic::from_bytes([9; 32])),
                    padding: 16,
                },
                "0100070707070707070707070707090909090909090909090909090909090909090909090909090909090909090900000000000000000000000000000000",
                "5453f09f92aca4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209424242424242424242424242424242424242424242424242fbfa6d68c235696a5e7920340ec849261c4d38c5c6b863a6508edd71611609d2d9d71741c233bf67f99946a49c64a55337a25f32bf9275d616ff6866d2d8c3041add344f519d8b9f2612d46e0673",
            ),
            (
                Message::Pong {
                    tx_id: [3; 12],
                    src: "198.51.100.7:41641".parse().unwrap(),
                },
                "020003030303030303030303030300000000000000000000ffffc6336407a2a9",
                "5453f09f92aca4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a2094242424242424242424242424242424242424242424242425f3349159aef73342e2e84f7df356a351f4d3cc1c2bc67a2548ad975651200dbd0de1e48cb3ab66e0f6f899ef16a0ef3",
            ),
            (
                Message::Pong {
                    tx_id: [3; 12],
                    src: "[2001:db8::9]:41641".parse().unwrap(),
                },
                "020003030303030303030303030320010db8000000000000000000000009a2a9",
                "5453f09f92aca4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a2094242424242424242424242424242424242424242424242426be5cafa2a5286b6d4fa17cdfc17a5b61f4d3cc1c2bc67a2548ad975651220dadd661e48cb3ab66ef0904fad95640ef3",
            ),
            (
                Message::CallMeMaybe {
                    endpoints: vec![
                        "203.0.113.5:41641".parse().unwrap(),
                        "[2001:db8::1]:41641".parse().unwrap(),
                    ],
                },
                "030000000000000000000000ffffcb007105a2a920010db8000000000000000000000001a2a9",
                "5453f09f92aca4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a20942424242424242424242424242424242424242424242424203ae18e4645d016848dc2c9aef7505261e4d3fc2c1bf64a15789da7699eecbdba1dbbce1eb3bbbd6f0904fad956dac5a3eab563a1432",
            ),
        ]
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn every_message_matches_go_byte_for_byte_plain_and_sealed() {
        let (a, b) = keys();
        let ours_box = DiscoBox::new(&a, &b.public());
        let their_box = DiscoBox::new(&b, &a.public());
        for (msg, plain, sealed) in go_vectors() {
            let (plain, sealed) = (unhex(plain), unhex(sealed));
            assert_eq!(msg.encode(), plain, "{msg:?}: plaintext");
            assert_eq!(Message::parse(&plain).unwrap(), msg, "{msg:?}: parse");
            assert_eq!(
                ours_box.seal_with_nonce(&a.public(), &[0x42; 24], &msg),
                sealed,
                "{msg:?}: sealed"
            );
            assert_eq!(their_box.open(&sealed).unwrap(), msg, "{msg:?}: open");
        }
    }

    #[test]
    fn bad_packets_are_rejected_without_panics() {
        let (a, b) = keys();
        let c = DiscoPrivate::from_bytes([3; 32]);
        let bx = DiscoBox::new(&a, &b.public());
        let back = DiscoBox::new(&b, &a.public());
        let pkt = bx.seal(
            &a.public(),
            &Message::Ping {
                tx_id: [1; 12],
                node_key: None,
                padding: 0,
            },
        );
        // Truncated at every length.
        for n in 0..pkt.len() {
            assert!(back.open(&pkt[..n]).is_err(), "length {n}");
        }
        // Oversize.
        let mut big = pkt.clone();
        big.resize(MAX_PACKET + 1, 0);
        assert_eq!(back.open(&big), Err(DiscoError::TooLong));
        // Wrong magic.
        let mut m = pkt.clone();
        m[0] = b'X';
        assert_eq!(back.open(&m), Err(DiscoError::BadMagic));
        assert_eq!(sender_key(&m), None);
        // Sealed for someone else.
        let other = DiscoBox::new(&c, &a.public());
        assert_eq!(other.open(&pkt), Err(DiscoError::OpenFailed));
        // Tampered tag and ciphertext.
        for i in [62, 70, pkt.len() - 1] {
            let mut t = pkt.clone();
            t[i] ^= 1;
            assert_eq!(back.open(&t), Err(DiscoError::OpenFailed));
        }
        // Unknown type that decrypts fine: not an error.
        let unk = bx.seal_plaintext(&a.public(), &[0x7F, 0, 1, 2, 3]);
        assert_eq!(back.open(&unk), Ok(Message::Unknown { kind: 0x7F }));
        // Empty plaintext.
        let empty = bx.seal_plaintext(&a.public(), &[]);
        assert_eq!(back.open(&empty), Err(DiscoError::Malformed));
        // Random garbage after a valid header never panics.
        let mut seed = 99u32;
        for len in 0..300 {
            let mut g = MAGIC.to_vec();
            g.extend_from_slice(a.public().as_bytes());
            for _ in 0..len {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                g.push((seed >> 16) as u8);
            }
            let _ = back.open(&g);
            let _ = Message::parse(&g[HEADER_LEN..]);
        }
    }

    #[test]
    fn classification() {
        assert!(!looks_like_disco(b"TS"));
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&[0; 32]);
        assert!(looks_like_disco(&p));
        // WireGuard never starts with 'T'.
        assert!(!looks_like_disco(&[1, 0, 0, 0, 0x54, 0x53]));
    }
}
