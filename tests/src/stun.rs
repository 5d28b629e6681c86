//! A minimal STUN (RFC 5389) binding codec and responder for the lab.
//!
//! The responder answers every binding request with the sender's address in
//! XOR-MAPPED-ADDRESS (and MAPPED-ADDRESS, for old clients); that is all miniupnpd's
//! "am I behind NAT?" check and a NAT-mapping test need. The client half
//! ([`binding_request`], [`parse_binding_response`], [`query`]) lets tests see a socket's
//! public address. Not a full STUN implementation: no authentication, no other methods.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

/// The fixed magic cookie of RFC 5389.
pub const MAGIC_COOKIE: u32 = 0x2112_a442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const HEADER_LEN: usize = 20;

/// A binding request with transaction id `txid`.
pub fn binding_request(txid: [u8; 12]) -> [u8; 20] {
    let mut msg = [0u8; 20];
    msg[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    msg[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    msg[8..20].copy_from_slice(&txid);
    msg
}

/// If `msg` is a binding request, its transaction id.
pub fn parse_binding_request(msg: &[u8]) -> Option<[u8; 12]> {
    if msg.len() < HEADER_LEN
        || u16::from_be_bytes([msg[0], msg[1]]) != BINDING_REQUEST
        || u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]) != MAGIC_COOKIE
    {
        return None;
    }
    msg[8..20].try_into().ok()
}

/// The address part of a (XOR-)MAPPED-ADDRESS attribute, XORed when `xor`.
fn encode_address(addr: SocketAddr, txid: &[u8; 12], xor: bool) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&cookie);
    mask[4..].copy_from_slice(txid);
    let port_mask = if xor { (MAGIC_COOKIE >> 16) as u16 } else { 0 };
    let mut v = vec![0u8];
    match addr.ip() {
        IpAddr::V4(ip) => {
            v.push(1);
            v.extend_from_slice(&(addr.port() ^ port_mask).to_be_bytes());
            for (i, b) in ip.octets().iter().enumerate() {
                v.push(if xor { b ^ mask[i] } else { *b });
            }
        }
        IpAddr::V6(ip) => {
            v.push(2);
            v.extend_from_slice(&(addr.port() ^ port_mask).to_be_bytes());
            for (i, b) in ip.octets().iter().enumerate() {
                v.push(if xor { b ^ mask[i] } else { *b });
            }
        }
    }
    v
}

fn decode_address(value: &[u8], txid: &[u8; 12], xor: bool) -> Option<SocketAddr> {
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(txid);
    let port_mask = if xor { (MAGIC_COOKIE >> 16) as u16 } else { 0 };
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ port_mask;
    let unmask = |i: usize, b: u8| if xor { b ^ mask[i] } else { b };
    match value.get(1)? {
        1 => {
            let b: [u8; 4] = value.get(4..8)?.try_into().ok()?;
            let o: Vec<u8> = b.iter().enumerate().map(|(i, b)| unmask(i, *b)).collect();
            Some(SocketAddr::new(
                Ipv4Addr::new(o[0], o[1], o[2], o[3]).into(),
                port,
            ))
        }
        2 => {
            let b: [u8; 16] = value.get(4..20)?.try_into().ok()?;
            let mut o = [0u8; 16];
            for (i, x) in b.iter().enumerate() {
                o[i] = unmask(i, *x);
            }
            Some(SocketAddr::new(Ipv6Addr::from(o).into(), port))
        }
        _ => None,
    }
}

/// The success response to a binding request `txid` from `from`.
pub fn binding_response(txid: [u8; 12], from: SocketAddr) -> Vec<u8> {
    let mut attrs = Vec::new();
    for (kind, xor) in [
        (ATTR_XOR_MAPPED_ADDRESS, true),
        (ATTR_MAPPED_ADDRESS, false),
    ] {
        let value = encode_address(from, &txid, xor);
        attrs.extend_from_slice(&kind.to_be_bytes());
        attrs.extend_from_slice(&(value.len() as u16).to_be_bytes());
        attrs.extend_from_slice(&value);
    }
    let mut msg = Vec::with_capacity(HEADER_LEN + attrs.len());
    msg.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    msg.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    msg.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    msg.extend_from_slice(&txid);
    msg.extend_from_slice(&attrs);
    msg
}

/// The mapped address in a binding success response for `txid` (XOR-MAPPED-ADDRESS
/// preferred), or `None` if `msg` is not one.
pub fn parse_binding_response(msg: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if msg.len() < HEADER_LEN
        || u16::from_be_bytes([msg[0], msg[1]]) != BINDING_SUCCESS
        || u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]) != MAGIC_COOKIE
        || &msg[8..20] != txid
    {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
    let body = msg.get(HEADER_LEN..HEADER_LEN + len)?;
    let mut plain = None;
    let mut at = 0;
    while at + 4 <= body.len() {
        let kind = u16::from_be_bytes([body[at], body[at + 1]]);
        let alen = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
        let value = body.get(at + 4..at + 4 + alen)?;
        match kind {
            ATTR_XOR_MAPPED_ADDRESS => return decode_address(value, txid, true),
            ATTR_MAPPED_ADDRESS => plain = decode_address(value, txid, false),
            _ => {}
        }
        at += 4 + alen.div_ceil(4) * 4;
    }
    plain
}

/// Asks STUN server `server` for `socket`'s public address (three tries within `timeout`).
/// Other datagrams arriving meanwhile are discarded.
pub fn query(socket: &UdpSocket, server: SocketAddr, timeout: Duration) -> io::Result<SocketAddr> {
    let old_timeout = socket.read_timeout()?;
    let per_try = (timeout / 3).max(Duration::from_millis(10));
    let result = (|| {
        for attempt in 0..3u8 {
            let mut txid = [0u8; 12];
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            txid[..8].copy_from_slice(&(nanos as u64).to_le_bytes());
            txid[8] = attempt;
            socket.send_to(&binding_request(txid), server)?;
            let deadline = std::time::Instant::now() + per_try;
            let mut buf = [0u8; 1500];
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                socket.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                match crate::recv_from(socket, &mut buf) {
                    Ok((n, _)) => {
                        if let Some(addr) = parse_binding_response(&buf[..n], &txid) {
                            return Ok(addr);
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no STUN answer from {server} within {timeout:?}"),
        ))
    })();
    socket.set_read_timeout(old_timeout)?;
    result
}

/// Answers binding requests on `socket` until `stop` is set (checked every read timeout).
pub(crate) fn serve(socket: &UdpSocket, stop: &std::sync::atomic::AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Ok((n, from)) = crate::recv_from(socket, &mut buf) else {
            continue;
        };
        if let Some(txid) = parse_binding_request(&buf[..n]) {
            let _ = socket.send_to(&binding_response(txid, from), from);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_round_trips_v4_and_v6_addresses() {
        let txid = *b"abcdefghijkl";
        for from in ["198.51.100.7:40000", "[2001:db8::5]:3478"] {
            let from: SocketAddr = from.parse().unwrap();
            let msg = binding_response(txid, from);
            assert_eq!(parse_binding_response(&msg, &txid), Some(from));
            assert_eq!(parse_binding_response(&msg, b"xxxxxxxxxxxx"), None);
        }
    }

    #[test]
    fn request_is_recognised_and_other_bytes_are_not() {
        let txid = [7u8; 12];
        assert_eq!(parse_binding_request(&binding_request(txid)), Some(txid));
        assert_eq!(parse_binding_request(b"hello, this is not stun"), None);
    }

    #[test]
    fn xor_mapped_address_matches_rfc5769_vector() {
        // RFC 5769 2.2: 192.0.2.1:32853, txid b7e7a701bc34d686fa87dfae.
        let txid = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let value = encode_address("192.0.2.1:32853".parse().unwrap(), &txid, true);
        assert_eq!(value, [0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]);
    }

    #[test]
    fn query_gets_the_mapped_address_over_loopback() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let server_addr = server.local_addr().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| serve(&server, &stop));
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mapped = query(&client, server_addr, Duration::from_secs(2)).unwrap();
            assert_eq!(mapped, client.local_addr().unwrap());
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
}
