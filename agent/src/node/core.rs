//! The node: the data plane's decisions for all peers. It takes IP packets from the host,
//! datagrams from the socket and from relays, network maps and the passing of time, and
//! puts what must happen into its [`Outbox`]: datagrams to send directly or through a
//! relay, packets for the host, answers for the local API. The shell (`crate::engine`)
//! feeds it and carries out the outbox after every input.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::tailcfg::Node as NetmapNode;
use proto::{DiscoPrivate, DiscoPublic, NodePrivate, NodePublic, RegionId};

use super::demux::{classify, Kind};
use super::filter::{Deny, PacketFilter};
use super::outbox::Outbox;
use super::peer::{DiscoDrop, PeerEvent, Via};
use super::peers::{MapChange, PeerTable, SourceCheck};
use super::routes;
use super::wg::{self, WgAction, WgRoute};

/// Largest datagram handled (and the size of the node's work buffer).
pub const MAX_DATAGRAM: usize = 65_535;

/// Counters of everything the node (and the shell around it) drops or does, by reason.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub tun_no_route: u64,
    pub tun_bad_packet: u64,
    pub udp_unknown: u64,
    pub wg_unknown_peer: u64,
    pub wg_drop: BTreeMap<&'static str, u64>,
    pub disco_unknown_sender: u64,
    pub disco_bad: u64,
    pub disco_key_conflicts: u64,
    pub disco_cmm_not_via_relay: u64,
    pub send_no_path: u64,
    pub stalled_dropped: u64,
    pub udp_send_errors: u64,
    pub tun_write_errors: u64,
    pub relay_packets_in: u64,
    pub peers_over_limit: u64,
    /// IPv6 tunnel packets to or from peers on a host without IPv6.
    pub ipv6_off_dropped: u64,
    /// Times the TUN device disappeared and was made again.
    pub tun_recreated: u64,
    /// Quick reports asked for because a direct path went quiet.
    pub restun_quiet_path: u64,
    /// Entries of peers' `Addresses`/`AllowedIPs` that were not IP prefixes.
    pub rejected_prefixes: u64,
    /// Inbound packets the packet filter refused, by reason.
    pub filter_denied: netbase::reasons::Counts<Deny>,
    /// Packets from the host for a peer whose key has expired.
    pub send_peer_expired: u64,
}

impl Counters {
    /// Every counter by name.
    pub fn named(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        [
            ("tun_no_route", self.tun_no_route),
            ("tun_bad_packet", self.tun_bad_packet),
            ("udp_unknown", self.udp_unknown),
            ("wg_unknown_peer", self.wg_unknown_peer),
            ("disco_unknown_sender", self.disco_unknown_sender),
            ("disco_bad", self.disco_bad),
            ("disco_key_conflicts", self.disco_key_conflicts),
            ("disco_cmm_not_via_relay", self.disco_cmm_not_via_relay),
            ("send_no_path", self.send_no_path),
            ("stalled_dropped", self.stalled_dropped),
            ("udp_send_errors", self.udp_send_errors),
            ("tun_write_errors", self.tun_write_errors),
            ("relay_packets_in", self.relay_packets_in),
            ("peers_over_limit", self.peers_over_limit),
            ("ipv6_off_dropped", self.ipv6_off_dropped),
            ("tun_recreated", self.tun_recreated),
            ("restun_quiet_path", self.restun_quiet_path),
            ("rejected_prefixes", self.rejected_prefixes),
            ("send_peer_expired", self.send_peer_expired),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(
            self.wg_drop
                .iter()
                .map(|(reason, n)| (format!("wg_drop: {reason}"), *n)),
        )
        .chain(
            self.filter_denied
                .iter()
                .map(|(reason, n)| (format!("filter_denied: {reason}"), n)),
        )
    }

    fn wg_dropped(&mut self, reason: &'static str) {
        *self.wg_drop.entry(reason).or_default() += 1;
    }
}

/// Why an `agentctl ping` could not be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiPingError {
    NoSuchPeer,
    NoDiscoKey,
    NoPath,
}

/// The data plane's state and decisions.
#[derive(Debug)]
pub struct Node {
    me: NodePrivate,
    me_pub: NodePublic,
    disco: DiscoPrivate,
    disco_pub: DiscoPublic,
    /// Places incoming WireGuard datagrams (checks handshake MACs and rates first).
    router: wg::Router,
    /// When the handshake rate limit starts a new second.
    rate_reset: Instant,
    /// When a packet last went to or came from a peer (WireGuard or disco).
    last_packet: Instant,
    peers: PeerTable,
    /// Which packets from peers may reach the host.
    filter: PacketFilter,
    /// Our endpoints, as told to peers in call-me-maybe.
    endpoints: Vec<SocketAddr>,
    /// Relay regions of the current relay map (a peer's home region outside it is no
    /// path).
    relay_regions: BTreeSet<RegionId>,
    /// Whether the tunnel carries IPv6 (off on hosts without it).
    ipv6: bool,
    /// Whether there is a socket for IPv6 destinations.
    udp6: bool,
    /// Peers whose disco state changed since the last [`Node::drive_peers`].
    dirty: BTreeSet<NodePublic>,
    /// The earliest disco timer of any peer, as of the last [`Node::drive_peers`].
    next_peer_wake: Option<Instant>,
    /// Peers holding packets until they have a path.
    stalled: BTreeSet<NodePublic>,
    /// A direct path went quiet: our endpoints should be measured again.
    restun_wanted: bool,
    pub counters: Counters,
    /// Work buffer for encryption and decryption.
    buf: Vec<u8>,
    /// What the shell must carry out.
    pub out: Outbox,
}

impl Node {
    pub fn new(me: NodePrivate, disco: DiscoPrivate, now: Instant) -> Self {
        let me_pub = me.public();
        let disco_pub = disco.public();
        Node {
            router: wg::Router::new(&me),
            me,
            me_pub,
            disco,
            disco_pub,
            rate_reset: now,
            last_packet: now,
            peers: PeerTable::default(),
            filter: PacketFilter::default(),
            endpoints: Vec::new(),
            relay_regions: BTreeSet::new(),
            ipv6: true,
            udp6: false,
            dirty: BTreeSet::new(),
            next_peer_wake: None,
            stalled: BTreeSet::new(),
            restun_wanted: false,
            counters: Counters::default(),
            // Room for WireGuard's header and tag around the largest packet.
            buf: vec![0u8; MAX_DATAGRAM + 64],
            out: Outbox::default(),
        }
    }

    pub fn public_key(&self) -> NodePublic {
        self.me_pub
    }

    pub fn disco_public(&self) -> DiscoPublic {
        self.disco_pub
    }

    pub fn peers(&self) -> &PeerTable {
        &self.peers
    }

    /// When a packet last went to or came from a peer.
    pub fn last_packet(&self) -> Instant {
        self.last_packet
    }

    /// The earliest disco timer of any peer (call [`Node::drive_peers`] then).
    pub fn next_peer_wake(&self) -> Option<Instant> {
        self.next_peer_wake
    }

    /// Whether a direct path went quiet since the last call (our NAT may have moved us:
    /// measure our endpoints again).
    pub fn take_restun_wanted(&mut self) -> bool {
        std::mem::take(&mut self.restun_wanted)
    }

    /// Whether the tunnel carries IPv6, and whether there is a socket for IPv6
    /// destinations.
    pub fn set_ipv6(&mut self, tunnel: bool, socket: bool) {
        self.ipv6 = tunnel;
        self.udp6 = socket;
    }

    /// Whether there is a socket for datagrams to `to`: IPv6 needs the IPv6 socket
    /// (`udp6`). A function of the field, not of `self`, so it can be asked while a peer
    /// is borrowed.
    fn reachable(udp6: bool, to: SocketAddr) -> bool {
        to.is_ipv4() || udp6
    }

    /// The relay regions that exist (from the relay map).
    pub fn set_relay_regions(&mut self, regions: impl IntoIterator<Item = RegionId>) {
        self.relay_regions = regions.into_iter().collect();
    }

    /// Our endpoints changed: every peer hears of them (call-me-maybe) and is pinged
    /// again, not only once control has passed them on (after a NAT rebinding the
    /// peers' packets to our old endpoint are being dropped).
    pub fn set_endpoints(&mut self, endpoints: Vec<SocketAddr>, now: Instant) {
        for (k, p) in self.peers.iter_mut() {
            p.our_endpoints_changed(now);
            self.dirty.insert(*k);
        }
        self.endpoints = endpoints;
    }

    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.endpoints
    }

    /// The network changed: look for direct paths to every peer again.
    pub fn rediscover_all(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            p.rediscover(now);
        }
        self.dirty.extend(self.peers.keys().copied());
    }

    /// A relay connection to `region` came up: call-me-maybe may have been lost while it
    /// was down, so the peers at home there look for direct paths again.
    pub fn relay_connected(&mut self, region: RegionId, now: Instant) {
        for (k, p) in self
            .peers
            .iter_mut()
            .filter(|(_, p)| p.home_region() == Some(region))
        {
            p.rediscover(now);
            self.dirty.insert(*k);
        }
    }

    /// Makes the peers match a network map's `nodes`.
    pub fn apply_netmap<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = &'a NetmapNode>,
        now: Instant,
    ) -> MapChange {
        let change = self.peers.apply(nodes, &self.me, &self.disco, now);
        self.dirty
            .extend(change.added.iter().chain(&change.updated).copied());
        self.counters.peers_over_limit += change.over_limit;
        self.counters.disco_key_conflicts += change.disco_conflicts;
        self.counters.rejected_prefixes += change.rejected_prefixes;
        change
    }

    /// The control server's packet filter (`None` or null keeps the one in force) and
    /// what inbound packets may be addressed to: this device's addresses and the routes
    /// it serves. Returns how many rules were skipped as unreadable when the filter
    /// changed.
    pub fn set_filter(
        &mut self,
        wire: Option<&serde_json::Value>,
        local: Vec<proto::IpNet>,
    ) -> Option<usize> {
        self.filter.set_local(local);
        self.filter.set_rules(wire)
    }

    pub fn filter(&self) -> &PacketFilter {
        &self.filter
    }

    /// An IP packet from the host: encrypted for the peer that owns its destination.
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant) {
        let Some(dst) = routes::destination(packet) else {
            self.counters.tun_bad_packet += 1;
            return;
        };
        let Some(key) = self.peers.route(dst) else {
            self.counters.tun_no_route += 1;
            return;
        };
        if dst.is_ipv6() && !self.ipv6 {
            self.counters.ipv6_off_dropped += 1;
            return;
        }
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        if p.expired() {
            self.counters.send_peer_expired += 1;
            return;
        }
        self.last_packet = now;
        // Its replies may come in (UDP flows).
        self.filter.note_outbound(packet, now);
        // Encrypted into the work buffer (taken out for the call, so the datagram can be
        // handed on without another copy).
        let mut buf = std::mem::take(&mut self.buf);
        let base = buf.as_ptr() as usize;
        let sealed = match p.encapsulate(packet, &mut buf) {
            WgAction::Send(b) => Some((b.as_ptr() as usize - base, b.len())),
            WgAction::Drop(r) => {
                self.counters.wg_dropped(r);
                None
            }
            _ => None,
        };
        // Only when disco has something to send: a trusted path needs no pass per packet.
        if p.on_data_sent(now) {
            self.dirty.insert(key);
        }
        if let Some((at, n)) = sealed {
            self.send_to_peer(key, &buf[at..at + n], now);
        }
        self.buf = buf;
    }

    /// Sends a WireGuard datagram to `key` on the path its disco state says
    /// (docs/protocols.md §3.3): directly, through its home relay, or both while a direct
    /// path is unconfirmed; held when there is no path yet.
    fn send_to_peer(&mut self, key: NodePublic, datagram: &[u8], now: Instant) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        p.note_sent(datagram, now);
        let (udp, relay) = p.send_targets(now);
        let region = p.home_region().filter(|r| self.relay_regions.contains(r));
        let mut sent = false;
        if let Some(addr) = udp {
            if Self::reachable(self.udp6, addr) {
                self.out.udp.push(addr, datagram);
                sent = true;
            } else {
                self.counters.udp_send_errors += 1;
            }
        }
        if let Some(region) = region.filter(|_| relay || !sent) {
            self.out
                .relay
                .push_back((region, key, Bytes::copy_from_slice(datagram)));
            sent = true;
        }
        if !sent {
            self.counters.send_no_path += 1;
            let held = p.stall(Bytes::copy_from_slice(datagram));
            if held {
                self.stalled.insert(key);
            } else {
                self.counters.stalled_dropped += 1;
            }
            tracing::debug!(peer = %key.short(), ?region, held, "no path to peer yet");
        }
    }

    /// Sends what was held for peers that now have a path (only peers holding packets are
    /// looked at).
    pub fn flush_stalled(&mut self, now: Instant) {
        if self.stalled.is_empty() {
            return;
        }
        let mut ready = Vec::new();
        let peers = &self.peers;
        let regions = &self.relay_regions;
        self.stalled.retain(|k| {
            let Some(p) = peers.get(k).filter(|p| p.has_stalled()) else {
                return false; // gone, or its packets went another way
            };
            let has_path = p.path().send_targets(now).udp.is_some()
                || p.home_region().is_some_and(|r| regions.contains(&r));
            if has_path {
                ready.push(*k);
            }
            !has_path
        });
        for k in ready {
            let held = self
                .peers
                .get_mut(&k)
                .map(|p| p.take_stalled())
                .unwrap_or_default();
            tracing::debug!(peer = %k.short(), n = held.len(), "sending held packets");
            for d in held {
                self.send_to_peer(k, &d, now);
            }
        }
    }

    /// A datagram from the socket.
    pub fn handle_udp(&mut self, datagram: &[u8], from: SocketAddr, now: Instant) {
        match classify(datagram) {
            Kind::Disco => self.handle_disco(datagram, Via::Udp(from), None, now),
            Kind::WireGuard => self.handle_wireguard(datagram, Some(from), None, now),
            Kind::Stun => {}
            Kind::Unknown => self.counters.udp_unknown += 1,
        }
    }

    /// A datagram from peer `src` through a relay of `region`.
    pub fn handle_relay(
        &mut self,
        region: RegionId,
        src: NodePublic,
        datagram: &[u8],
        now: Instant,
    ) {
        self.counters.relay_packets_in += 1;
        match classify(datagram) {
            Kind::Disco => self.handle_disco(datagram, Via::Relay(region), Some(src), now),
            Kind::WireGuard => self.handle_wireguard(datagram, None, Some(src), now),
            _ => self.counters.udp_unknown += 1,
        }
    }

    fn handle_wireguard(
        &mut self,
        datagram: &[u8],
        from: Option<SocketAddr>,
        relay_src: Option<NodePublic>,
        now: Instant,
    ) {
        let key = match relay_src {
            Some(k) => Some(k),
            None => {
                let mut reply = [0u8; 64];
                match self
                    .router
                    .route(from.map(|a| a.ip()), datagram, &mut reply)
                {
                    WgRoute::Initiation(k) => Some(k),
                    WgRoute::Index(i) => self.peers.by_index(i),
                    WgRoute::Cookie(c) => {
                        if let Some(a) = from.filter(|a| Self::reachable(self.udp6, *a)) {
                            self.out.direct.push_back((a, c.to_vec()));
                        }
                        self.counters.wg_dropped("handshake flood: cookie sent");
                        return;
                    }
                    WgRoute::Drop(reason) => {
                        self.counters.wg_dropped(reason);
                        return;
                    }
                    WgRoute::Unknown => None,
                }
            }
        };
        let Some((key, (p, sources))) =
            key.and_then(|k| Some((k, self.peers.get_mut_with_sources(&k)?)))
        else {
            self.counters.wg_unknown_peer += 1;
            return;
        };
        let mut send: Vec<Bytes> = Vec::new();
        match p.decapsulate(from.map(|a| a.ip()), datagram, &mut self.buf) {
            WgAction::Deliver(d) => {
                // Only packets from the addresses this peer owns reach the host.
                match sources.check(d) {
                    SourceCheck::Allowed(src) if src.is_ipv6() && !self.ipv6 => {
                        self.counters.ipv6_off_dropped += 1;
                    }
                    SourceCheck::Allowed(_) => {
                        let verdict = if p.expired() {
                            Err(Deny::PeerExpired)
                        } else {
                            self.filter.check_inbound(d, now)
                        };
                        match verdict {
                            Ok(()) => self.out.tun.push(d.to_vec()),
                            Err(reason) => {
                                self.counters.filter_denied.add(reason);
                                p.note_denied();
                            }
                        }
                    }
                    SourceCheck::NotAllowed | SourceCheck::Malformed => {
                        self.counters.wg_dropped("source not allowed");
                    }
                }
            }
            WgAction::Send(b) => {
                send.push(Bytes::copy_from_slice(b));
                while let WgAction::Send(b) = p.flush(&mut self.buf) {
                    send.push(Bytes::copy_from_slice(b));
                }
            }
            WgAction::Drop(r) => {
                self.counters.wg_dropped(r);
                return;
            }
            WgAction::None => {}
        }
        if relay_src.is_none() && from.is_some() {
            // Authentic and direct: the direct path is alive (disco's silence check).
            p.on_heard_direct(now);
        }
        self.last_packet = now;
        for b in send {
            self.send_to_peer(key, &b, now);
        }
    }

    fn handle_disco(
        &mut self,
        datagram: &[u8],
        via: Via,
        relay_src: Option<NodePublic>,
        now: Instant,
    ) {
        let Some(sender) = disco::sender_key(datagram) else {
            self.counters.disco_bad += 1;
            return;
        };
        let Some(key) = self.peers.by_disco(&sender) else {
            self.counters.disco_unknown_sender += 1;
            tracing::debug!(sender = %sender.short(), ?via, "disco from a key not in the netmap");
            return;
        };
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        match p.handle_disco(datagram, via, relay_src, now) {
            Ok(()) => {
                if p.has_api_pongs() {
                    for (tx_id, via) in p.take_api_pongs() {
                        self.out.api_pongs.push_back((key, tx_id, via));
                    }
                }
            }
            Err(DiscoDrop::Bad) => {
                self.counters.disco_bad += 1;
                tracing::debug!(peer = %key.short(), ?via, "disco message did not open");
            }
            Err(DiscoDrop::CallMeMaybeNotViaRelay) => self.counters.disco_cmm_not_via_relay += 1,
        }
        self.drive_peer(key, now);
    }

    /// Drives the peers something happened to since the last pass, and those whose
    /// timers are due, and notes the earliest timer left: one walk over the peers per
    /// pass (not each peer driven every pass: with thousands of peers that would cost
    /// more than the packets).
    pub fn drive_peers(&mut self, now: Instant) {
        let mut keys = std::mem::take(&mut self.dirty);
        let mut next: Option<Instant> = None;
        for (k, p) in self.peers.iter() {
            match p.poll_timeout() {
                Some(t) if t <= now => {
                    keys.insert(*k);
                }
                Some(t) => next = Some(next.map_or(t, |n| n.min(t))),
                None => {}
            }
        }
        for k in &keys {
            self.drive_peer(*k, now);
        }
        // The peers just driven have new timers.
        for t in keys
            .iter()
            .filter_map(|k| self.peers.get(k).and_then(|p| p.poll_timeout()))
        {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        self.next_peer_wake = next;
    }

    /// Runs a peer's disco timers and puts what it asks for in the outbox.
    fn drive_peer(&mut self, key: NodePublic, now: Instant) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        p.handle_timeout(now);
        let mut out: Vec<PeerEvent> = Vec::new();
        while let Some(e) = p.poll_event(&self.disco_pub, &self.me_pub, &self.endpoints) {
            out.push(e);
        }
        let reinit = p
            .reinitiation(now, &mut self.buf)
            .map(Bytes::copy_from_slice);
        if p.take_path_quiet() {
            self.restun_wanted = true;
        }
        for e in out {
            match e {
                PeerEvent::SendUdp { to, packet } => {
                    tracing::debug!(peer = %key.short(), %to, "disco ping");
                    if Self::reachable(self.udp6, to) {
                        self.out.direct.push_back((to, packet));
                    }
                }
                PeerEvent::SendRelay { region, packet } => {
                    tracing::debug!(peer = %key.short(), %region, "disco via relay");
                    self.out.relay.push_back((region, key, Bytes::from(packet)));
                }
            }
        }
        if let Some(b) = reinit {
            tracing::debug!(peer = %key.short(), "direct path found: handshake sent again");
            self.send_to_peer(key, &b, now);
        }
    }

    /// WireGuard's timers for every peer (keepalives, handshake retries), and the
    /// handshake rate limit's second.
    pub fn tick_wireguard(&mut self, now: Instant) {
        if now >= self.rate_reset {
            self.router.reset_count();
            self.rate_reset = now + Duration::from_secs(1);
        }
        let keys: Vec<NodePublic> = self.peers.keys().copied().collect();
        for k in keys {
            let mut send = None;
            if let Some(p) = self.peers.get_mut(&k) {
                if let WgAction::Send(b) = p.tick(&mut self.buf) {
                    send = Some(Bytes::copy_from_slice(b));
                }
            }
            if let Some(b) = send {
                self.send_to_peer(k, &b, now);
            }
        }
    }

    /// `agentctl ping`: one disco ping with `tx_id` on the path data would take now
    /// (directly when there is a direct path, through the peer's relay otherwise; both
    /// while the direct path is unconfirmed). Counts as traffic, so it also starts path
    /// discovery.
    pub fn api_ping(
        &mut self,
        key: &NodePublic,
        tx_id: disco::TxId,
        now: Instant,
    ) -> Result<(), ApiPingError> {
        let (me_disco, me_node) = (self.disco_pub, self.me_pub);
        let p = self.peers.get_mut(key).ok_or(ApiPingError::NoSuchPeer)?;
        let packet = p
            .seal_ping(&me_disco, &me_node, tx_id)
            .ok_or(ApiPingError::NoDiscoKey)?;
        p.on_data_sent(now);
        let (udp, relay) = p.send_targets(now);
        let relay_region = p
            .home_region()
            .filter(|r| relay && self.relay_regions.contains(r));
        self.dirty.insert(*key);
        let udp = udp.filter(|a| Self::reachable(self.udp6, *a));
        if udp.is_none() && relay_region.is_none() {
            return Err(ApiPingError::NoPath);
        }
        if let Some(addr) = udp {
            self.out.direct.push_back((addr, packet.clone()));
        }
        if let Some(region) = relay_region {
            self.out
                .relay
                .push_back((region, *key, Bytes::from(packet)));
        }
        Ok(())
    }
}
