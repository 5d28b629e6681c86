//! WireGuard for one peer, behind our own small interface. The only file that knows
//! boringtun: a maintained fork, or another implementation, replaces it here and nowhere
//! else. Like boringtun's `noise::Tunn` it is a value, not a device: packets in, packets
//! out, timers driven by the caller; it never touches a socket.

use std::net::IpAddr;

use boringtun::noise::{
    errors::WireGuardError, handshake::parse_handshake_anon, rate_limiter::RateLimiter, Packet,
    Tunn, TunnResult,
};
use boringtun::x25519;
use proto::{NodePrivate, NodePublic};

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
                me.static_secret(),
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
pub enum WgRoute<'a> {
    /// A handshake initiation from this node key.
    Initiation(NodePublic),
    /// A packet for the session with our peer index (`receiver >> 8`).
    Index(u32),
    /// We are under a handshake flood: send this cookie reply back to the sender.
    Cookie(&'a [u8]),
    /// Dropped before any key work, for this reason.
    Drop(&'static str),
    /// Not a WireGuard packet we can place.
    Unknown,
}

/// Handshake messages (initiations and responses from anyone) checked per second before
/// the router demands cookies (WireGuard's DoS defence; boringtun's device uses 100).
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Places incoming datagrams on sessions. An initiation is opened (with our private key)
/// far enough to learn its sender, but only after its mac1 checks out, and while the
/// handshake rate is above [`HANDSHAKE_RATE_LIMIT`] only with a valid cookie (mac2): a
/// flood of forged initiations costs a hash each, not a Diffie-Hellman.
pub struct Router {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    limiter: RateLimiter,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

impl Router {
    pub fn new(me: &NodePrivate) -> Self {
        let secret = me.static_secret();
        let public = x25519::PublicKey::from(&secret);
        Router {
            limiter: RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT),
            secret,
            public,
        }
    }

    /// Starts a new rate-limit second; call once a second.
    pub fn reset_count(&self) {
        self.limiter.reset_count();
    }

    /// Where `datagram` (from `from`, if it came over UDP) belongs. A cookie reply to send
    /// back is written to `out`.
    pub fn route<'a>(
        &self,
        from: Option<IpAddr>,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> WgRoute<'a> {
        let packet = match self.limiter.verify_packet(from, datagram, out) {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => return WgRoute::Cookie(cookie),
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => return WgRoute::Drop("bad mac1"),
            Err(TunnResult::Err(WireGuardError::UnderLoad)) => {
                return WgRoute::Drop("handshake flood (no address for a cookie)")
            }
            Err(_) => return WgRoute::Unknown,
        };
        match packet {
            Packet::HandshakeInit(init) => {
                match parse_handshake_anon(&self.secret, &self.public, &init) {
                    Ok(half) => {
                        WgRoute::Initiation(NodePublic::from_bytes(half.peer_static_public))
                    }
                    Err(_) => WgRoute::Unknown,
                }
            }
            Packet::HandshakeResponse(r) => WgRoute::Index(r.receiver_idx >> 8),
            Packet::PacketCookieReply(r) => WgRoute::Index(r.receiver_idx >> 8),
            Packet::PacketData(d) => WgRoute::Index(d.receiver_idx >> 8),
        }
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
        let (ra, rb) = (Router::new(&ka), Router::new(&kb));
        let mut scratch = [0u8; 256];
        assert_eq!(
            rb.route(None, &init, &mut scratch),
            WgRoute::Initiation(ka.public())
        );
        let WgAction::Send(resp) = b.decapsulate(None, &init, &mut buf_b) else {
            panic!("expected a handshake response")
        };
        let resp = resp.to_vec();
        assert_eq!(ra.route(None, &resp, &mut scratch), WgRoute::Index(7));
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
        assert_eq!(rb.route(None, data, &mut scratch), WgRoute::Index(9));
        match b.decapsulate(None, data, &mut buf_b) {
            WgAction::Deliver(p) => assert_eq!(p, &ip_packet[..]),
            other => panic!("{other:?}"),
        }
        // Garbage and foreign packets are dropped, not panicked on.
        assert_eq!(rb.route(None, b"garbage", &mut scratch), WgRoute::Unknown);
        // A forged initiation (wrong mac1) is dropped before any key work.
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let mut forged = init.clone();
        let n = forged.len();
        forged[n - 20] ^= 1;
        assert_eq!(
            rb.route(Some(ip), &forged, &mut scratch),
            WgRoute::Drop("bad mac1")
        );
        // A flood: past the rate limit, senders get cookie replies instead of a DH each;
        // a new second (boringtun's limiter resets at most once a second) lets
        // initiations through again.
        let cookies = (0..HANDSHAKE_RATE_LIMIT + 10)
            .filter(|_| matches!(rb.route(Some(ip), &init, &mut scratch), WgRoute::Cookie(_)))
            .count();
        assert!(cookies >= 9, "{cookies} cookie replies");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        rb.reset_count();
        assert_eq!(
            rb.route(Some(ip), &init, &mut scratch),
            WgRoute::Initiation(ka.public())
        );
        assert!(matches!(
            b.decapsulate(None, &[4, 0, 0, 0, 1, 2, 3], &mut buf_b),
            WgAction::Drop(_)
        ));
    }
}
