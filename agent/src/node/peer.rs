//! One peer as the engine sees it: its WireGuard session, its disco key and sealing box,
//! and its path-selection state (from the `disco` crate), plus what the netmap says about
//! it (addresses, endpoints, home region). It turns disco decisions into datagrams to
//! send; the engine does the sending.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

pub use disco::path::Via;
use disco::path::{Action, PathState};
use disco::{DiscoBox, Message};
use proto::tailcfg::Node;
use proto::{DiscoPrivate, DiscoPublic, NodePrivate, NodePublic, RegionId};

use super::wg::{WgAction, WgPeer};

/// Something the engine must send for this peer.
#[derive(Debug)]
pub enum PeerEvent {
    SendUdp {
        to: SocketAddr,
        packet: Vec<u8>,
    },
    /// Through this relay region.
    SendRelay {
        region: RegionId,
        packet: Vec<u8>,
    },
}

/// Why a disco message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoDrop {
    Bad,
    CallMeMaybeNotViaRelay,
}

/// Replies waiting to be sent (pongs), bounded.
const MAX_PENDING: usize = 64;
/// A handshake initiation is repeated early (on a new direct path) only this long after
/// the last one.
const REINITIATE_AFTER: std::time::Duration = std::time::Duration::from_millis(200);
/// WireGuard datagrams held while the peer has no path at all (no home region known
/// yet, no direct address): sent as soon as one appears. A handshake initiation and a
/// few packets behind it are all that is worth keeping.
pub const MAX_STALLED: usize = 16;

pub struct Peer {
    key: NodePublic,
    index: u32,
    wg: WgPeer,
    disco_key: Option<DiscoPublic>,
    disco_box: Option<DiscoBox>,
    path: PathState,
    allowed_ips: Vec<proto::IpNet>,
    /// The peer's home relay region, if it has one yet.
    home_region: Option<RegionId>,
    name: String,
    /// Pongs to send, and where.
    pending: VecDeque<(Via, Message)>,
    /// Transaction IDs of pings sent for the local API (`agentctl ping`), bounded.
    api_pings: std::collections::BTreeSet<disco::TxId>,
    /// Their answers, for the engine to collect.
    api_pongs: VecDeque<(disco::TxId, Via)>,
    /// When we last sent a WireGuard handshake initiation.
    last_initiation: Option<Instant>,
    /// Path selection just found a direct path.
    went_direct: bool,
    /// The trusted direct path went quiet since the engine last looked: it measures
    /// our public endpoints again (a NAT rebinding moves them).
    path_quiet: bool,
    /// Datagrams waiting for a path (bounded by [`MAX_STALLED`]).
    stalled: VecDeque<bytes::Bytes>,
    /// The control server marked the peer's key expired: nothing goes to or comes from
    /// it.
    expired: bool,
    /// Packets from this peer the packet filter refused.
    denied: u64,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("key", &self.key.short())
            .field("home_region", &self.home_region)
            .finish_non_exhaustive()
    }
}

fn endpoints(node: &Node) -> Vec<SocketAddr> {
    node.endpoints
        .iter()
        .filter_map(|e| e.parse::<SocketAddr>().ok())
        // `[::ffff:a.b.c.d]:p` is an IPv4 endpoint: it goes out on the IPv4 socket.
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .collect()
}

impl Peer {
    pub fn new(
        node: &Node,
        me: &NodePrivate,
        disco: &DiscoPrivate,
        index: u32,
        now: Instant,
    ) -> Self {
        let mut path = PathState::new(rand::random(), now);
        path.set_endpoints(&endpoints(node), now);
        path.set_relay(node.home_region().is_some());
        Peer {
            key: node.key,
            index,
            wg: WgPeer::new(me, &node.key, index),
            disco_key: node.disco_key,
            disco_box: node.disco_key.map(|d| DiscoBox::new(disco, &d)),
            path,
            allowed_ips: node.routes().to_vec(),
            home_region: node.home_region(),
            name: node.name.clone(),
            pending: VecDeque::new(),
            stalled: VecDeque::new(),
            last_initiation: None,
            went_direct: false,
            path_quiet: false,
            api_pings: Default::default(),
            api_pongs: VecDeque::new(),
            expired: node.expired,
            denied: 0,
        }
    }

    /// A newer netmap entry for this peer: the WireGuard session is kept.
    pub fn update(&mut self, node: &Node, disco: &DiscoPrivate, now: Instant) {
        if node.disco_key != self.disco_key {
            // A restarted peer: new disco key, so old paths and pings mean nothing.
            self.disco_key = node.disco_key;
            self.disco_box = node.disco_key.map(|d| DiscoBox::new(disco, &d));
            self.path = PathState::new(rand::random(), now);
        }
        let eps = endpoints(node);
        let known = self.path.candidates();
        let changed = node.home_region() != self.home_region
            || eps.iter().any(|e| !known.iter().any(|(a, _)| a == e));
        self.path.set_endpoints(&eps, now);
        self.path.set_relay(node.home_region().is_some());
        self.allowed_ips = node.routes().to_vec();
        self.home_region = node.home_region();
        if changed {
            // A new way to reach the peer: look for a direct path again at once.
            self.path.rediscover(now);
        }
        self.name = node.name.clone();
        self.expired = node.expired;
    }

    /// Whether the control server marked the peer's key expired.
    pub fn expired(&self) -> bool {
        self.expired
    }

    /// A packet from this peer was refused by the packet filter.
    pub fn note_denied(&mut self) {
        self.denied += 1;
    }

    /// How many packets from this peer the packet filter refused.
    pub fn denied(&self) -> u64 {
        self.denied
    }

    pub fn key(&self) -> &NodePublic {
        &self.key
    }

    /// Our session index for this peer (the receiver index its packets carry).
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn disco_key(&self) -> Option<DiscoPublic> {
        self.disco_key
    }

    /// The addresses and routes the peer owns.
    pub fn allowed_ips(&self) -> &[proto::IpNet] {
        &self.allowed_ips
    }

    pub fn home_region(&self) -> Option<RegionId> {
        self.home_region
    }

    /// The peer's name from the netmap (a fully qualified name ending in a dot).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path selection's state, to read (status, counters).
    pub fn path(&self) -> &PathState {
        &self.path
    }

    /// WireGuard statistics: time since the last handshake, bytes sent and received.
    pub fn wg_stats(&self) -> (Option<std::time::Duration>, usize, usize) {
        self.wg.stats()
    }

    /// Encrypts an IP packet for the peer into `out`.
    pub fn encapsulate<'a>(&mut self, packet: &[u8], out: &'a mut [u8]) -> WgAction<'a> {
        self.wg.encapsulate(packet, out)
    }

    /// Decrypts a datagram from the peer (`from`: its address when it came directly).
    pub fn decapsulate<'a>(
        &mut self,
        from: Option<std::net::IpAddr>,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> WgAction<'a> {
        self.wg.decapsulate(from, datagram, out)
    }

    /// The next queued WireGuard datagram (after a handshake completes).
    pub fn flush<'a>(&mut self, out: &'a mut [u8]) -> WgAction<'a> {
        self.wg.flush(out)
    }

    /// WireGuard's timers: a keepalive, a handshake retry, or nothing.
    pub fn tick<'a>(&mut self, out: &'a mut [u8]) -> WgAction<'a> {
        self.wg.tick(out)
    }

    /// Notes a WireGuard datagram on its way to the peer (a handshake initiation is
    /// remembered, for [`Peer::reinitiation`]).
    pub fn note_sent(&mut self, datagram: &[u8], now: Instant) {
        if datagram.first() == Some(&1) {
            self.last_initiation = Some(now);
        }
    }

    /// A fresh handshake initiation when a direct path just appeared while ours is
    /// still unanswered: the first was probably lost (the peer's relay connection was
    /// not up yet, say), and the path that works now need not wait out WireGuard's 5 s
    /// retry. At most once per direct path found.
    pub fn reinitiation<'a>(&mut self, now: Instant, out: &'a mut [u8]) -> Option<&'a [u8]> {
        let due = std::mem::take(&mut self.went_direct)
            && self.wg.no_session()
            && self
                .last_initiation
                .is_some_and(|t| now.saturating_duration_since(t) >= REINITIATE_AFTER);
        if !due {
            return None;
        }
        match self.wg.initiate(out) {
            WgAction::Send(b) => Some(b),
            _ => None,
        }
    }

    /// Whether the direct path went quiet (or was lost) since the last call.
    pub fn take_path_quiet(&mut self) -> bool {
        std::mem::take(&mut self.path_quiet)
    }

    /// Answers to `agentctl ping`s that arrived since the last call.
    pub fn take_api_pongs(&mut self) -> Vec<(disco::TxId, Via)> {
        self.api_pongs.drain(..).collect()
    }

    pub fn has_api_pongs(&self) -> bool {
        !self.api_pongs.is_empty()
    }

    /// Look for a direct path again at once (the network changed).
    pub fn rediscover(&mut self, now: Instant) {
        self.path.rediscover(now);
    }

    /// Our endpoints changed: tell the peer (call-me-maybe) and ping again.
    pub fn our_endpoints_changed(&mut self, now: Instant) {
        self.path.our_endpoints_changed(now);
    }

    /// An authentic WireGuard datagram came directly: the direct path is alive.
    pub fn on_heard_direct(&mut self, now: Instant) {
        self.path.on_heard_direct(now);
    }

    /// Whether datagrams are held for a path.
    pub fn has_stalled(&self) -> bool {
        !self.stalled.is_empty()
    }

    /// The held datagrams, to send now that a path exists.
    pub fn take_stalled(&mut self) -> VecDeque<bytes::Bytes> {
        std::mem::take(&mut self.stalled)
    }

    /// Holds a datagram that found no path; false (and nothing held) when full.
    pub fn stall(&mut self, datagram: bytes::Bytes) -> bool {
        if self.stalled.len() >= MAX_STALLED {
            return false;
        }
        self.stalled.push_back(datagram);
        true
    }

    /// Whether the peer's disco has something to send now (see `PathState::on_data_sent`).
    pub fn on_data_sent(&mut self, now: Instant) -> bool {
        self.path.on_data_sent(now)
    }

    /// Where a datagram goes now: (UDP address, also via relay).
    pub fn send_targets(&self, now: Instant) -> (Option<SocketAddr>, bool) {
        let t = self.path.send_targets(now);
        (t.udp, t.relay || t.udp.is_none())
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.path.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.path.handle_timeout(now);
    }

    /// Opens and handles a disco message from this peer.
    pub fn handle_disco(
        &mut self,
        pkt: &[u8],
        via: Via,
        relay_src: Option<NodePublic>,
        now: Instant,
    ) -> Result<(), DiscoDrop> {
        let Some(bx) = &self.disco_box else {
            return Err(DiscoDrop::Bad);
        };
        let msg = bx.open(pkt).map_err(|_| DiscoDrop::Bad)?;
        tracing::debug!(peer = %self.key.short(), ?via, ?msg, "disco received");
        match msg {
            Message::Ping { tx_id, .. } => {
                let src = match via {
                    Via::Udp(a) => a,
                    // Over a relay the "source" is the relay's magic address.
                    Via::Relay(r) => {
                        SocketAddr::from(([127, 3, 3, 40], u16::try_from(r.get()).unwrap_or(0)))
                    }
                };
                // The pong goes back the way the ping came.
                if self.pending.len() < MAX_PENDING {
                    self.pending.push_back((via, Message::Pong { tx_id, src }));
                }
                self.path.on_ping(via, tx_id, now);
            }
            Message::Pong { tx_id, src } => {
                if self.api_pings.remove(&tx_id) {
                    // An answer to `agentctl ping`: the engine reports it.
                    if self.api_pongs.len() < MAX_PENDING {
                        self.api_pongs.push_back((tx_id, via));
                    }
                } else if let Via::Udp(from) = via {
                    self.path.on_pong(from, tx_id, src, now);
                }
            }
            Message::CallMeMaybe { endpoints } => {
                // Honoured only over a relay, from the node that owns this disco key.
                if !matches!(via, Via::Relay(_)) || relay_src != Some(self.key) {
                    return Err(DiscoDrop::CallMeMaybeNotViaRelay);
                }
                self.path.on_call_me_maybe(&endpoints, now);
            }
            _ => {}
        }
        Ok(())
    }

    /// A sealed disco ping with `tx_id` (for `agentctl ping`); None without a disco key.
    pub fn seal_ping(
        &mut self,
        my_disco: &DiscoPublic,
        my_node: &NodePublic,
        tx_id: disco::TxId,
    ) -> Option<Vec<u8>> {
        let bx = self.disco_box.as_ref()?;
        if self.api_pings.len() >= MAX_PENDING {
            // Oldest-first is not tracked; a full set means pings went unanswered.
            self.api_pings.clear();
        }
        self.api_pings.insert(tx_id);
        Some(bx.seal(
            my_disco,
            &Message::Ping {
                tx_id,
                node_key: Some(*my_node),
                padding: 0,
            },
        ))
    }

    /// The next datagram to send for this peer: pongs first, then what path selection
    /// asks for (pings, call-me-maybe).
    pub fn poll_event(
        &mut self,
        my_disco: &DiscoPublic,
        my_node: &NodePublic,
        my_endpoints: &[SocketAddr],
    ) -> Option<PeerEvent> {
        let bx = self.disco_box.as_ref()?;
        if let Some((via, msg)) = self.pending.pop_front() {
            let packet = bx.seal(my_disco, &msg);
            return Some(match via {
                Via::Udp(to) => PeerEvent::SendUdp { to, packet },
                Via::Relay(region) => PeerEvent::SendRelay { region, packet },
            });
        }
        loop {
            match self.path.poll_action()? {
                Action::SendPing { to, tx_id } => {
                    let msg = Message::Ping {
                        tx_id,
                        node_key: Some(*my_node),
                        padding: 0,
                    };
                    return Some(PeerEvent::SendUdp {
                        to,
                        packet: bx.seal(my_disco, &msg),
                    });
                }
                Action::SendCallMeMaybe => {
                    // Through the peer's home relay; path selection asks only when
                    // there is one (`set_relay`).
                    let Some(region) = self.home_region else {
                        continue;
                    };
                    let msg = Message::CallMeMaybe {
                        endpoints: my_endpoints.to_vec(),
                    };
                    return Some(PeerEvent::SendRelay {
                        region,
                        packet: bx.seal(my_disco, &msg),
                    });
                }
                Action::DirectPathQuiet => self.path_quiet = true,
                Action::PathChanged(p) => {
                    self.went_direct |= matches!(p, disco::path::Path::Direct(_));
                    // A direct path lost (however it was found out) may be our NAT
                    // having moved us, as a quiet one may.
                    self.path_quiet |= p == disco::path::Path::Relay;
                    tracing::info!(peer = %self.key.short(), name = %self.name, path = %p, "path changed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: i32) -> RegionId {
        RegionId::new(id).expect("a region ID is positive")
    }

    struct Pair {
        me: NodePrivate,
        my_disco: DiscoPrivate,
        them: NodePrivate,
        their_disco: DiscoPrivate,
    }

    fn pair() -> Pair {
        Pair {
            me: NodePrivate::generate(),
            my_disco: DiscoPrivate::generate(),
            them: NodePrivate::generate(),
            their_disco: DiscoPrivate::generate(),
        }
    }

    fn node(p: &Pair, endpoints: &[&str], home: i32, with_disco: bool) -> Node {
        Node {
            key: p.them.public(),
            disco_key: with_disco.then(|| p.their_disco.public()),
            addresses: vec!["100.64.0.2/32".parse().unwrap()].into(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            home_derp: home,
            name: "bob.agentd.internal.".into(),
            ..Default::default()
        }
    }

    /// What the peer sends, opened with the peer's own box.
    fn sent(
        p: &Pair,
        peer: &mut Peer,
        eps: &[SocketAddr],
    ) -> Vec<(Option<SocketAddr>, Option<RegionId>, Message)> {
        let their_box = DiscoBox::new(&p.their_disco, &p.my_disco.public());
        let mut out = Vec::new();
        while let Some(e) = peer.poll_event(&p.my_disco.public(), &p.me.public(), eps) {
            let (to, region, packet) = match e {
                PeerEvent::SendUdp { to, packet } => (Some(to), None, packet),
                PeerEvent::SendRelay { region, packet } => (None, Some(region), packet),
            };
            out.push((to, region, their_box.open(&packet).expect("opens")));
        }
        out
    }

    fn from_them(p: &Pair, msg: &Message) -> Vec<u8> {
        DiscoBox::new(&p.their_disco, &p.my_disco.public()).seal(&p.their_disco.public(), msg)
    }

    #[test]
    fn a_ping_is_answered_the_way_it_came() {
        let p = pair();
        let now = Instant::now();
        let mut peer = Peer::new(&node(&p, &[], 901, true), &p.me, &p.my_disco, 1, now);
        let ping = Message::Ping {
            tx_id: [5; 12],
            node_key: Some(p.them.public()),
            padding: 0,
        };
        let from: SocketAddr = "198.51.100.7:41641".parse().unwrap();
        peer.handle_disco(&from_them(&p, &ping), Via::Udp(from), None, now)
            .unwrap();
        let out = sent(&p, &mut peer, &[]);
        assert_eq!(
            out[0],
            (
                Some(from),
                None,
                Message::Pong {
                    tx_id: [5; 12],
                    src: from
                }
            )
        );
        // The pinging address became a candidate: with traffic, it is pinged back.
        assert!(peer.path.candidates().iter().any(|(a, _)| *a == from));

        // Through a relay: the pong goes back through that region, with the relay's
        // magic address as the source.
        peer.handle_disco(
            &from_them(&p, &ping),
            Via::Relay(region(902)),
            Some(p.them.public()),
            now,
        )
        .unwrap();
        let out = sent(&p, &mut peer, &[]);
        assert_eq!(
            out,
            vec![(
                None,
                Some(region(902)),
                Message::Pong {
                    tx_id: [5; 12],
                    src: "127.3.3.40:902".parse().unwrap()
                }
            )]
        );
    }

    #[test]
    fn call_me_maybe_counts_only_through_a_relay_from_its_owner() {
        let p = pair();
        let now = Instant::now();
        let mut peer = Peer::new(&node(&p, &[], 901, true), &p.me, &p.my_disco, 1, now);
        peer.on_data_sent(now);
        sent(&p, &mut peer, &[]);
        let ep: SocketAddr = "203.0.113.9:41641".parse().unwrap();
        let cmm = from_them(
            &p,
            &Message::CallMeMaybe {
                endpoints: vec![ep],
            },
        );
        assert_eq!(
            peer.handle_disco(&cmm, Via::Udp(ep), None, now),
            Err(DiscoDrop::CallMeMaybeNotViaRelay)
        );
        let stranger = NodePrivate::generate().public();
        assert_eq!(
            peer.handle_disco(&cmm, Via::Relay(region(901)), Some(stranger), now),
            Err(DiscoDrop::CallMeMaybeNotViaRelay)
        );
        assert!(sent(&p, &mut peer, &[]).is_empty(), "nothing pinged");
        peer.handle_disco(&cmm, Via::Relay(region(901)), Some(p.them.public()), now)
            .unwrap();
        let out = sent(&p, &mut peer, &[]);
        assert!(
            out.iter()
                .any(|(to, _, m)| *to == Some(ep) && matches!(m, Message::Ping { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn garbage_and_peers_without_a_disco_key_are_refused() {
        let p = pair();
        let now = Instant::now();
        let mut peer = Peer::new(&node(&p, &[], 901, true), &p.me, &p.my_disco, 1, now);
        let from = Via::Udp("198.51.100.7:41641".parse().unwrap());
        let ping = Message::Ping {
            tx_id: [1; 12],
            node_key: None,
            padding: 0,
        };
        assert_eq!(
            peer.handle_disco(b"TS\xf0\x9f\x92\xac", from, None, now),
            Err(DiscoDrop::Bad)
        );
        // Sealed by someone else under the peer's name.
        let forged = DiscoBox::new(&DiscoPrivate::generate(), &p.my_disco.public())
            .seal(&p.their_disco.public(), &ping);
        assert_eq!(
            peer.handle_disco(&forged, from, None, now),
            Err(DiscoDrop::Bad)
        );
        assert!(sent(&p, &mut peer, &[]).is_empty());

        let mut keyless = Peer::new(&node(&p, &[], 901, false), &p.me, &p.my_disco, 2, now);
        assert_eq!(
            keyless.handle_disco(&from_them(&p, &ping), from, None, now),
            Err(DiscoDrop::Bad)
        );
        assert!(keyless
            .seal_ping(&p.my_disco.public(), &p.me.public(), [1; 12])
            .is_none());
    }

    #[test]
    fn an_api_pong_goes_to_the_api_not_to_path_selection() {
        let p = pair();
        let now = Instant::now();
        let ep: SocketAddr = "198.51.100.7:41641".parse().unwrap();
        let mut peer = Peer::new(&node(&p, &[], 901, true), &p.me, &p.my_disco, 1, now);
        peer.seal_ping(&p.my_disco.public(), &p.me.public(), [9; 12])
            .unwrap();
        let pong = from_them(
            &p,
            &Message::Pong {
                tx_id: [9; 12],
                src: ep,
            },
        );
        peer.handle_disco(&pong, Via::Udp(ep), None, now).unwrap();
        assert_eq!(peer.api_pongs.pop_front(), Some(([9; 12], Via::Udp(ep))));
        assert_eq!(peer.path.counters.unknown_pongs, 0);
        // An unknown pong is path selection's to count.
        let stray = from_them(
            &p,
            &Message::Pong {
                tx_id: [8; 12],
                src: ep,
            },
        );
        peer.handle_disco(&stray, Via::Udp(ep), None, now).unwrap();
        assert_eq!(peer.path.counters.unknown_pongs, 1);
    }

    #[test]
    fn no_path_means_the_relay_and_stalled_datagrams_are_bounded() {
        let p = pair();
        let now = Instant::now();
        let mut peer = Peer::new(&node(&p, &[], 0, true), &p.me, &p.my_disco, 1, now);
        assert_eq!(peer.send_targets(now), (None, true));
        for i in 0..MAX_STALLED {
            assert!(
                peer.stall(bytes::Bytes::from(vec![i as u8])),
                "datagram {i}"
            );
        }
        assert!(!peer.stall(bytes::Bytes::from_static(b"one too many")));
        assert_eq!(peer.stalled.len(), MAX_STALLED);
    }

    #[test]
    fn mapped_ipv4_endpoints_become_ipv4_and_junk_is_skipped() {
        let p = pair();
        let now = Instant::now();
        let peer = Peer::new(
            &node(
                &p,
                &[
                    "[::ffff:198.51.100.7]:41641",
                    "not an address",
                    "[2001:db8::1]:41641",
                ],
                901,
                true,
            ),
            &p.me,
            &p.my_disco,
            1,
            now,
        );
        let cands: Vec<SocketAddr> = peer.path.candidates().into_iter().map(|(a, _)| a).collect();
        assert_eq!(
            cands,
            vec![
                "198.51.100.7:41641".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:41641".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_new_disco_key_starts_path_selection_over_but_keeps_the_session() {
        let mut p = pair();
        let now = Instant::now();
        let ep = "198.51.100.7:41641";
        let mut peer = Peer::new(&node(&p, &[ep], 901, true), &p.me, &p.my_disco, 7, now);
        peer.on_data_sent(now);
        let pings: Vec<_> = sent(&p, &mut peer, &[]);
        assert!(!pings.is_empty());
        // The peer restarted: new disco key. Its old box no longer opens our messages.
        p.their_disco = DiscoPrivate::generate();
        peer.update(&node(&p, &[ep], 901, true), &p.my_disco, now);
        assert_eq!(peer.index, 7);
        assert_eq!(peer.path.counters.pings_sent, 0, "fresh path state");
        peer.on_data_sent(now);
        let out = sent(&p, &mut peer, &[]);
        assert!(out
            .iter()
            .any(|(to, _, _)| to.map(|a| a.to_string()) == Some(ep.into())));
    }

    #[test]
    fn a_lost_initiation_is_sent_again_once_when_a_direct_path_appears() {
        let p = pair();
        let t0 = Instant::now();
        let mut peer = Peer::new(&node(&p, &[], 901, true), &p.me, &p.my_disco, 1, t0);
        let mut buf = vec![0u8; 2048];
        // No initiation sent yet: nothing to repeat.
        peer.went_direct = true;
        assert!(peer.reinitiation(t0, &mut buf).is_none());

        let first = match peer.encapsulate(&[0x45; 40], &mut buf) {
            WgAction::Send(b) => b.to_vec(),
            other => panic!("expected a handshake initiation, got {other:?}"),
        };
        assert_eq!(first[0], 1, "WireGuard message type 1");
        peer.note_sent(&first, t0);
        // Too soon after the first one.
        peer.went_direct = true;
        let soon = t0 + REINITIATE_AFTER / 2;
        assert!(peer.reinitiation(soon, &mut buf).is_none());
        // Later, with a direct path just found and still no session: once.
        peer.went_direct = true;
        let later = t0 + REINITIATE_AFTER;
        let again = peer.reinitiation(later, &mut buf).expect("sent again");
        assert_eq!(again[0], 1);
        assert!(
            peer.reinitiation(later, &mut buf).is_none(),
            "once per path found"
        );
    }

    #[test]
    fn held_datagrams_are_bounded_and_handed_back_in_order() {
        let p = pair();
        let now = Instant::now();
        let mut peer = Peer::new(&node(&p, &[], 0, true), &p.me, &p.my_disco, 1, now);
        for i in 0..MAX_STALLED {
            assert!(peer.stall(bytes::Bytes::from(vec![i as u8])));
        }
        assert!(!peer.stall(bytes::Bytes::from_static(b"x")), "full");
        assert!(peer.has_stalled());
        let held: Vec<u8> = peer.take_stalled().iter().map(|b| b[0]).collect();
        assert_eq!(held, (0..MAX_STALLED as u8).collect::<Vec<_>>());
        assert!(!peer.has_stalled());
        assert!(peer.stall(bytes::Bytes::from_static(b"y")), "room again");
    }
}
