//! STUN as netcheck uses it: the 40-byte binding request in Tailscale's form (SOFTWARE
//! `tailnode` + FINGERPRINT, without which real derpers stay silent) and the parser of
//! binding responses. Encoding and decoding go through `stun-rs`; this module only adds
//! the checks a client needs (success class, our transaction ID) and the non-standard
//! 0x8020 address attribute some servers send. It never panics on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use stun_rs::attributes::stun::{Fingerprint, Software};
use stun_rs::methods::BINDING;
use stun_rs::{
    DecoderContextBuilder, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder,
    StunMessageBuilder, TransactionId,
};

/// The SOFTWARE value derpers require.
pub const SOFTWARE: &str = "tailnode";
/// Length of the request: 20-byte header + SOFTWARE (4 + 8) + FINGERPRINT (4 + 4).
pub const REQUEST_LEN: usize = 40;

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// XOR-MAPPED-ADDRESS as some old servers number it (comprehension-optional range).
const XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;

/// A STUN transaction ID.
pub type TxId = [u8; 12];

/// Why a datagram was not a usable binding response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("not a STUN message")]
    NotStun,
    #[error("malformed STUN message")]
    Malformed,
    #[error("STUN message is not a binding success response")]
    NotSuccess,
    #[error("STUN response carries no mapped address")]
    NoAddress,
}

/// A fresh random transaction ID.
pub fn new_tx_id() -> TxId {
    rand::random()
}

/// The binding request for `tx`, exactly as tailscaled sends it.
pub fn request(tx: TxId) -> Vec<u8> {
    let mut out = vec![0u8; REQUEST_LEN];
    let n = Software::new(SOFTWARE)
        .ok()
        .and_then(|software| {
            let msg = StunMessageBuilder::new(BINDING, MessageClass::Request)
                .with_transaction_id(TransactionId::from(tx))
                .with_attribute(software)
                .with_attribute(Fingerprint::default())
                .build();
            MessageEncoderBuilder::default()
                .build()
                .encode(&mut out, &msg)
                .ok()
        })
        .unwrap_or(0);
    out.truncate(n);
    out
}

/// Cheap check, before any parsing, that `pkt` looks like a STUN binding response: the
/// demultiplexer of a shared UDP socket uses it (docs/protocols.md §2.2).
pub fn looks_like_response(pkt: &[u8]) -> bool {
    pkt.len() >= 20 && pkt[0] & 0xC0 == 0 && pkt[1] == 0x01 && pkt[4..8] == MAGIC_COOKIE
}

/// Parses a binding success response: its transaction ID and the address the server saw.
pub fn parse_response(pkt: &[u8]) -> Result<(TxId, SocketAddr), StunError> {
    if !looks_like_response(pkt) {
        return Err(StunError::NotStun);
    }
    let ctx = DecoderContextBuilder::default().with_unknown_data().build();
    let (msg, _) = MessageDecoderBuilder::default()
        .with_context(ctx)
        .build()
        .decode(pkt)
        .map_err(|_| StunError::Malformed)?;
    if msg.method() != BINDING || msg.class() != MessageClass::SuccessResponse {
        return Err(StunError::NotSuccess);
    }
    let tx = *msg.transaction_id().as_bytes();
    let mut mapped = None;
    let mut plain = None;
    for attr in msg.attributes() {
        if let Ok(a) = attr.as_xor_mapped_address() {
            mapped = Some(*a.socket_address());
            break;
        }
        if let Ok(a) = attr.as_mapped_address() {
            plain = plain.or(Some(*a.socket_address()));
        } else if let Ok(u) = attr.as_unknown() {
            if u.attribute_type().as_u16() == XOR_MAPPED_ADDRESS_ALT && mapped.is_none() {
                mapped = u.attribute_data().and_then(|d| xor_address(d, &tx));
            }
        }
    }
    mapped
        .or(plain)
        // A server on a dual-stack socket may answer an IPv4 client with `::ffff:a.b.c.d`.
        .map(|a| (tx, SocketAddr::new(a.ip().to_canonical(), a.port())))
        .ok_or(StunError::NoAddress)
}

/// Decodes an XOR-MAPPED-ADDRESS value (RFC 5389 §15.2) by hand, for the 0x8020 variant.
fn xor_address(d: &[u8], tx: &TxId) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([*d.get(2)?, *d.get(3)?]) ^ 0x2112;
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(tx);
    let ip = match d.get(1)? {
        1 => {
            let b = d.get(4..8)?;
            IpAddr::V4(Ipv4Addr::new(
                b[0] ^ key[0],
                b[1] ^ key[1],
                b[2] ^ key[2],
                b[3] ^ key[3],
            ))
        }
        2 => {
            let b = d.get(4..20)?;
            let mut a = [0u8; 16];
            for (o, (x, k)) in a.iter_mut().zip(b.iter().zip(key.iter())) {
                *o = x ^ k;
            }
            IpAddr::V6(Ipv6Addr::from(a))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn request_is_tailscales_40_bytes() {
        let tx = [9u8; 12];
        let r = request(tx);
        assert_eq!(r.len(), REQUEST_LEN);
        assert_eq!(&r[0..4], &[0x00, 0x01, 0x00, 0x14]);
        assert_eq!(&r[4..8], &MAGIC_COOKIE);
        assert_eq!(&r[8..20], &tx);
        assert_eq!(&r[20..24], &[0x80, 0x22, 0x00, 0x08]);
        assert_eq!(&r[24..32], b"tailnode");
        assert_eq!(&r[32..36], &[0x80, 0x28, 0x00, 0x04]);
        let crc = crc32(&r[..32]) ^ 0x5354_554E;
        assert_eq!(&r[36..40], &crc.to_be_bytes());
    }

    /// A response built by hand: header + one attribute (type, value).
    fn response(tx: TxId, attr_type: u16, value: &[u8]) -> Vec<u8> {
        let mut r = vec![0x01, 0x01];
        let len = (4 + value.len().div_ceil(4) * 4) as u16;
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(&MAGIC_COOKIE);
        r.extend_from_slice(&tx);
        r.extend_from_slice(&attr_type.to_be_bytes());
        r.extend_from_slice(&(value.len() as u16).to_be_bytes());
        r.extend_from_slice(value);
        while r.len() % 4 != 0 {
            r.push(0);
        }
        r
    }

    fn xor_v4(addr: SocketAddr) -> Vec<u8> {
        let SocketAddr::V4(a) = addr else {
            unreachable!()
        };
        let mut v = vec![0, 1];
        v.extend_from_slice(&(a.port() ^ 0x2112).to_be_bytes());
        for (i, b) in a.ip().octets().iter().enumerate() {
            v.push(b ^ MAGIC_COOKIE[i]);
        }
        v
    }

    #[test]
    fn parses_xor_mapped_v4_v6_plain_mapped_and_the_0x8020_variant() {
        let tx = [3u8; 12];
        let a: SocketAddr = "203.0.113.7:41641".parse().unwrap();
        assert_eq!(
            parse_response(&response(tx, 0x0020, &xor_v4(a))),
            Ok((tx, a))
        );
        assert_eq!(
            parse_response(&response(tx, 0x8020, &xor_v4(a))),
            Ok((tx, a))
        );
        // MAPPED-ADDRESS, not XORed.
        let mut m = vec![0, 1, 0xA2, 0xA9];
        m.extend_from_slice(&[203, 0, 113, 7]);
        assert_eq!(parse_response(&response(tx, 0x0001, &m)), Ok((tx, a)));
        // IPv6 via the relay's own STUN encoder.
        let v6: SocketAddr = "[2001:db8::5]:3478".parse().unwrap();
        let msg = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(TransactionId::from(tx))
            .with_attribute(stun_rs::attributes::stun::XorMappedAddress::from(v6))
            .build();
        let mut buf = vec![0u8; 64];
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &msg)
            .unwrap();
        assert_eq!(parse_response(&buf[..n]), Ok((tx, v6)));
        // An IPv4 address in IPv6 clothing (::ffff:a.b.c.d) is read as the IPv4 address.
        let mapped: SocketAddr = "[::ffff:203.0.113.7]:41641".parse().unwrap();
        let msg = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(TransactionId::from(tx))
            .with_attribute(stun_rs::attributes::stun::XorMappedAddress::from(mapped))
            .build();
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &msg)
            .unwrap();
        assert_eq!(parse_response(&buf[..n]), Ok((tx, a)));
    }

    #[test]
    fn rejects_requests_errors_garbage_and_addressless_responses() {
        let tx = [4u8; 12];
        assert_eq!(parse_response(&request(tx)), Err(StunError::NotSuccess));
        assert_eq!(parse_response(b"hello"), Err(StunError::NotStun));
        // Error response class (0x0111).
        let mut e = response(tx, 0x0020, &xor_v4("192.0.2.1:1".parse().unwrap()));
        e[0] = 0x01;
        e[1] = 0x11;
        assert!(parse_response(&e).is_err());
        // Only a SOFTWARE attribute.
        assert_eq!(
            parse_response(&response(tx, 0x8022, b"abcd")),
            Err(StunError::NoAddress)
        );
        // Attribute length running past the end.
        let mut bad = response(tx, 0x0020, &xor_v4("192.0.2.1:1".parse().unwrap()));
        bad[22] = 0x40;
        assert_eq!(parse_response(&bad), Err(StunError::Malformed));
        // Garbage address family.
        let mut fam = xor_v4("192.0.2.1:1".parse().unwrap());
        fam[1] = 9;
        assert!(parse_response(&response(tx, 0x8020, &fam)).is_err());
    }

    #[test]
    fn no_input_panics() {
        let tx = [5u8; 12];
        let good = response(tx, 0x0020, &xor_v4("192.0.2.1:9".parse().unwrap()));
        for cut in 0..good.len() {
            let _ = parse_response(&good[..cut]);
        }
        let mut seed = 0x1234_5678u32;
        for _ in 0..20_000 {
            let mut p = good.clone();
            for _ in 0..3 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let i = (seed as usize >> 8) % p.len();
                p[i] = (seed >> 16) as u8;
            }
            let _ = parse_response(&p);
        }
    }
}
