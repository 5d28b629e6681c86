//! WireGuard for one peer, behind our own small interface. The only file that knows
//! boringtun: a maintained fork, or another implementation, replaces it here and nowhere
//! else. Like boringtun's `noise::Tunn` it is a value, not a device: packets in, packets
//! out, timers driven by the caller; it never touches a socket.

use std::net::IpAddr;

use boringtun::noise::{
    errors::WireGuardError, handshake::parse_handshake_anon, Packet, Tunn, TunnResult,
};
use boringtun::x25519;
use proto::{NodePrivate, NodePublic};

/// Largest WireGuard overhead over the inner packet: 16 header + 16 tag (+ padding to 16).
pub const OVERHEAD: usize = 32 + 16;
/// Smallest output buffer boringtun accepts (a handshake initiation is 148 bytes).
pub const MIN_BUF: usize = 148;

/// What to do with the result of a WireGuard operation.
#[derive(Debug, PartialEq, Eq)]
pub enum WgAction<'a> {
    /// Nothing to send or deliver.
    None,
    /// Send this datagram to the peer (on the current path).
    Send(&'a [u8]),
    /// Deliver this decrypted IP packet to the TUN device.
    Deliver(&'a [u8]),
    /// The packet was dropped; the reason is for counters and logs.
    Drop(&'static str),
}

fn reason(e: &WireGuardError) -> &'static str {
    match e {
        WireGuardError::DuplicateCounter => "replayed packet",
        WireGuardError::InvalidCounter => "counter out of window",
        WireGuardError::InvalidMac => "bad MAC",
        WireGuardError::InvalidAeadTag => "decryption failed",
        WireGuardError::NoCurrentSession => "no session",
        WireGuardError::WrongKey | WireGuardError::WrongIndex => "wrong peer",
        WireGuardError::ConnectionExpired => "session expired",
        WireGuardError::UnderLoad => "handshake rate limited",
        WireGuardError::InvalidPacket => "malformed",
        _ => "handshake failed",
    }
}

fn action(r: TunnResult<'_>) -> WgAction<'_> {
    match r {
        TunnResult::Done => WgAction::None,
        TunnResult::Err(WireGuardError::ConnectionExpired) => WgAction::None,
        TunnResult::Err(e) => WgAction::Drop(reason(&e)),
        TunnResult::WriteToNetwork(b) => WgAction::Send(b),
        TunnResult::WriteToTunnelV4(b, _) | TunnResult::WriteToTunnelV6(b, _) => {
            WgAction::Deliver(b)
        }
    }
}

fn secret(k: &NodePrivate) -> x25519::StaticSecret {
    x25519::StaticSecret::from(k.to_bytes())
}

/// The WireGuard session with one peer.
pub struct WgPeer {
    tunn: Tunn,
}

impl std::fmt::Debug for WgPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgPeer").finish_non_exhaustive()
    }
}

impl WgPeer {
    /// A session with `peer`; `index` (24 bits) is ours to pick and must be unique among
    /// our peers: it comes back in every packet the peer sends us.
    pub fn new(me: &NodePrivate, peer: &NodePublic, index: u32) -> Self {
        WgPeer {
            tunn: Tunn::new(
                secret(me),
                x25519::PublicKey::from(*peer.as_bytes()),
                None,
                None,
                index & 0x00FF_FFFF,
                None,
            ),
        }
    }

    /// Encrypts an IP packet from the TUN device (or starts a handshake and queues it).
    pub fn encapsulate<'a>(&mut self, packet: &[u8], out: &'a mut [u8]) -> WgAction<'a> {
        action(self.tunn.encapsulate(packet, out))
    }

    /// Handles a datagram from the peer. After a `Send`, call [`WgPeer::flush`] until it
    /// returns `None`: queued packets go out once a handshake completes.
    pub fn decapsulate<'a>(
        &mut self,
        from: Option<IpAddr>,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> WgAction<'a> {
        if datagram.is_empty() {
            return WgAction::Drop("empty");
        }
        action(self.tunn.decapsulate(from, datagram, out))
    }

    /// Sends what a completed handshake released (call repeatedly until `None`).
    pub fn flush<'a>(&mut self, out: &'a mut [u8]) -> WgAction<'a> {
        action(self.tunn.decapsulate(None, &[], out))
    }

    /// Drives the WireGuard timers (rekey, keepalive, handshake retries); call about
    /// every 250 ms.
    pub fn tick<'a>(&mut self, out: &'a mut [u8]) -> WgAction<'a> {
        action(self.tunn.update_timers(out))
    }

    /// Whether there is no session yet: nothing has completed a handshake.
    pub fn no_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_none()
    }

    /// A fresh handshake initiation, now, even if one is in flight (it may have been
    /// lost on a path that did not work yet).
    pub fn initiate<'a>(&mut self, out: &'a mut [u8]) -> WgAction<'a> {
        action(self.tunn.format_handshake_initiation(out, true))
    }

    /// Time since the last completed handshake, bytes sent and received.
    pub fn stats(&self) -> (Option<std::time::Duration>, usize, usize) {
        let (t, tx, rx, _, _) = self.tunn.stats();
        (t, tx, rx)
    }
}

/// Which of our peers a WireGuard datagram belongs to, without decrypting its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgRoute {
    /// A handshake initiation from this node key.
    Initiation(NodePublic),
    /// A packet for the session with our peer index (`receiver >> 8`).
    Index(u32),
    /// Not a WireGuard packet we can place.
    Unknown,
}

/// Places a datagram: initiations are opened far enough to learn the sender's static key
/// (with our private key); other packets name our index.
pub fn route(me: &NodePrivate, datagram: &[u8]) -> WgRoute {
    match Tunn::parse_incoming_packet(datagram) {
        Ok(Packet::HandshakeInit(init)) => {
            let s = secret(me);
            let p = x25519::PublicKey::from(&s);
            match parse_handshake_anon(&s, &p, &init) {
                Ok(half) => WgRoute::Initiation(NodePublic::from_bytes(half.peer_static_public)),
                Err(_) => WgRoute::Unknown,
            }
        }
        Ok(Packet::HandshakeResponse(r)) => WgRoute::Index(r.receiver_idx >> 8),
        Ok(Packet::PacketCookieReply(r)) => WgRoute::Index(r.receiver_idx >> 8),
        Ok(Packet::PacketData(d)) => WgRoute::Index(d.receiver_idx >> 8),
        Err(_) => WgRoute::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two peers complete a handshake and carry a packet each way, and the router places
    /// every datagram on the right session.
    #[test]
    fn handshake_then_data_both_ways_and_routing() {
        let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
        let mut a = WgPeer::new(&ka, &kb.public(), 7);
        let mut b = WgPeer::new(&kb, &ka.public(), 9);
        let ip_packet = {
            // A minimal IPv4 header (20 bytes) + 4 bytes, 100.64.0.1 → 100.64.0.2.
            let mut p = vec![
                0x45, 0, 0, 24, 0, 0, 0, 0, 64, 17, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2,
            ];
            p.extend_from_slice(b"ping");
            p
        };
        let mut buf_a = vec![0u8; 2048];
        let mut buf_b = vec![0u8; 2048];
        let WgAction::Send(init) = a.encapsulate(&ip_packet, &mut buf_a) else {
            panic!("expected a handshake initiation")
        };
        let init = init.to_vec();
        assert_eq!(route(&kb, &init), WgRoute::Initiation(ka.public()));
        let WgAction::Send(resp) = b.decapsulate(None, &init, &mut buf_b) else {
            panic!("expected a handshake response")
        };
        let resp = resp.to_vec();
        assert_eq!(route(&ka, &resp), WgRoute::Index(7));
        // The response completes the handshake; the queued packet goes out on flush.
        let mut out = Vec::new();
        match a.decapsulate(None, &resp, &mut buf_a) {
            WgAction::Send(p) => out.push(p.to_vec()),
            WgAction::None => {}
            other => panic!("{other:?}"),
        }
        while let WgAction::Send(p) = a.flush(&mut buf_a) {
            out.push(p.to_vec());
        }
        let data = out
            .iter()
            .find(|p| p.len() > 32)
            .expect("queued data packet");
        assert_eq!(route(&kb, data), WgRoute::Index(9));
        match b.decapsulate(None, data, &mut buf_b) {
            WgAction::Deliver(p) => assert_eq!(p, &ip_packet[..]),
            other => panic!("{other:?}"),
        }
        // Garbage and foreign packets are dropped, not panicked on.
        assert_eq!(route(&kb, b"garbage"), WgRoute::Unknown);
        assert!(matches!(
            b.decapsulate(None, &[4, 0, 0, 0, 1, 2, 3], &mut buf_b),
            WgAction::Drop(_)
        ));
    }
}
