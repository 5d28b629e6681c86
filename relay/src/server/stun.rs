//! The STUN server: answers binding requests with the sender's address in
//! XOR-MAPPED-ADDRESS. Both Tailscale's 40-byte request (SOFTWARE `tailnode` +
//! FINGERPRINT) and a plain RFC 5389 binding request are answered; anything else is
//! counted and ignored. Parsing and encoding go through `stun-rs`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use stun_rs::attributes::stun::XorMappedAddress;
use stun_rs::methods::BINDING;
use stun_rs::{MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder};
use tokio::net::UdpSocket;

use super::Shared;

/// The binding response for `request` received from `from`, or `None` if it is not a
/// STUN binding request.
pub fn binding_response(request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    // Cheap checks before the decoder: header size, top bits, magic cookie, Binding Request.
    if request.len() < 20
        || request[0] & 0xC0 != 0
        || request[4..8] != [0x21, 0x12, 0xA4, 0x42]
        || request[0..2] != [0x00, 0x01]
    {
        return None;
    }
    let (msg, _) = MessageDecoderBuilder::default()
        .build()
        .decode(request)
        .ok()?;
    if msg.method() != BINDING || msg.class() != MessageClass::Request {
        return None;
    }
    // On a dual-stack socket (the default `[::]:3478`) an IPv4 client shows up as
    // `::ffff:a.b.c.d`; it must hear back its IPv4 address, in the IPv4 family.
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let resp = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(*msg.transaction_id())
        .with_attribute(XorMappedAddress::from(from))
        .build();
    let mut out = vec![0u8; 64];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut out, &resp)
        .ok()?;
    out.truncate(n);
    Some(out)
}

pub(crate) async fn serve(shared: Arc<Shared>, sock: UdpSocket) {
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "STUN receive error");
                continue;
            }
        };
        match binding_response(&buf[..n], from) {
            Some(resp) => {
                shared.metrics.stun_requests.fetch_add(1, Ordering::Relaxed);
                let _ = sock.send_to(&resp, from).await;
            }
            None => {
                shared.metrics.stun_bad.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tailscale_request(txid: [u8; 12]) -> Vec<u8> {
        // Header (length 20) + SOFTWARE "tailnode" + FINGERPRINT, as Tailscale sends it.
        let mut r = vec![0x00, 0x01, 0x00, 0x14, 0x21, 0x12, 0xA4, 0x42];
        r.extend_from_slice(&txid);
        r.extend_from_slice(&[0x80, 0x22, 0x00, 0x08]);
        r.extend_from_slice(b"tailnode");
        let crc = crc32(&r) ^ 0x5354_554E;
        r.extend_from_slice(&[0x80, 0x28, 0x00, 0x04]);
        r.extend_from_slice(&crc.to_be_bytes());
        r
    }

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
    fn answers_tailscale_request_with_xor_mapped_address() {
        let txid = [7u8; 12];
        let req = tailscale_request(txid);
        assert_eq!(req.len(), 40);
        let from: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let resp = binding_response(&req, from).unwrap();
        assert_eq!(&resp[0..2], &[0x01, 0x01]);
        assert_eq!(&resp[8..20], &txid);
        // XOR-MAPPED-ADDRESS: type 0x0020, len 8, family 1, port ^ 0x2112, ip ^ cookie.
        assert_eq!(&resp[20..24], &[0x00, 0x20, 0x00, 0x08]);
        assert_eq!(resp[25], 0x01);
        assert_eq!(u16::from_be_bytes([resp[26], resp[27]]), 32853 ^ 0x2112);
        assert_eq!(&resp[28..32], &[192 ^ 0x21, 0x12, 2 ^ 0xA4, 1 ^ 0x42]);
    }

    #[test]
    fn ipv4_client_on_a_dual_stack_socket_hears_its_ipv4_address() {
        let req = tailscale_request([9u8; 12]);
        let from: SocketAddr = "[::ffff:192.0.2.1]:32853".parse().unwrap();
        let resp = binding_response(&req, from).unwrap();
        // Family 1 (IPv4), 8 bytes: not ::ffff:192.0.2.1 in the IPv6 family.
        assert_eq!(&resp[20..24], &[0x00, 0x20, 0x00, 0x08]);
        assert_eq!(resp[25], 0x01);
        assert_eq!(&resp[28..32], &[192 ^ 0x21, 0x12, 2 ^ 0xA4, 1 ^ 0x42]);
    }

    #[test]
    fn answers_plain_rfc5389_binding_request_over_ipv6() {
        let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        req.extend_from_slice(&[1u8; 12]);
        let from: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let resp = binding_response(&req, from).unwrap();
        assert_eq!(&resp[20..24], &[0x00, 0x20, 0x00, 0x14]);
        assert_eq!(resp[25], 0x02);
    }

    #[test]
    fn ignores_non_requests() {
        let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(binding_response(b"", from).is_none());
        assert!(binding_response(&[0u8; 40], from).is_none());
        let mut resp = tailscale_request([1; 12]);
        resp[1] = 0x01;
        resp[0] = 0x01; // a success response, not a request
        assert!(binding_response(&resp, from).is_none());
    }
}
