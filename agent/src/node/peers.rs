//! The peer table: every peer of the network map with its session index, its disco key
//! and the addresses it owns, and the three rules that keep one peer from acting as
//! another — a cap on the number of peers, a disco key claimed by two peers belonging to
//! neither, and a decrypted packet entering the host only from an address its sender
//! owns. Pure: the time comes in as an argument.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use proto::tailcfg::Node;
use proto::{DiscoPrivate, DiscoPublic, NodePrivate, NodePublic};

use super::peer::Peer;
use super::routes::{self, RouteTable};

/// The most peers kept; more in a network map are skipped and counted (a map that big is
/// a misconfiguration or an attack, and each peer costs memory and timers).
pub const MAX_PEERS: usize = 10_000;

/// Session indexes are 24 bits (the top 8 bits of a WireGuard index are boringtun's).
const INDEX_MASK: u32 = 0x00FF_FFFF;

/// What applying a network map changed, for the caller's logs and counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MapChange {
    /// Peers new in this map.
    pub added: Vec<NodePublic>,
    /// Peers that were already known (their entry was refreshed).
    pub updated: Vec<NodePublic>,
    /// Peers gone from the map.
    pub removed: Vec<NodePublic>,
    /// New peers skipped because the table was full.
    pub over_limit: u64,
    /// Disco keys claimed by more than one peer (ignored for all of them).
    pub disco_conflicts: u64,
    /// Entries of peers' `Addresses`/`AllowedIPs` that were not IP prefixes.
    pub rejected_prefixes: u64,
}

/// Whether a decrypted packet from a peer may enter the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceCheck {
    /// Its source address belongs to the peer that sent it.
    Allowed(IpAddr),
    /// Its source address is another peer's, or nobody's.
    NotAllowed,
    /// It is not an IP packet with a source address.
    Malformed,
}

/// The source-address check for the packets of one peer.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    routes: &'a RouteTable,
    peer: NodePublic,
}

impl Sources<'_> {
    /// Whether `packet`, decrypted from this peer, may enter the host.
    pub fn check(&self, packet: &[u8]) -> SourceCheck {
        match routes::source(packet) {
            None => SourceCheck::Malformed,
            Some(src) if self.routes.lookup(src) == Some(self.peer) => SourceCheck::Allowed(src),
            Some(_) => SourceCheck::NotAllowed,
        }
    }
}

/// The peers of the current network map and the indexes over them.
#[derive(Debug)]
pub struct PeerTable {
    peers: BTreeMap<NodePublic, Peer>,
    by_index: BTreeMap<u32, NodePublic>,
    by_disco: BTreeMap<DiscoPublic, NodePublic>,
    routes: RouteTable,
    next_index: u32,
    max_peers: usize,
}

impl Default for PeerTable {
    fn default() -> Self {
        PeerTable::with_limit(MAX_PEERS)
    }
}

impl PeerTable {
    /// An empty table that keeps at most `max_peers` peers.
    pub fn with_limit(max_peers: usize) -> Self {
        PeerTable {
            peers: BTreeMap::new(),
            by_index: BTreeMap::new(),
            by_disco: BTreeMap::new(),
            routes: RouteTable::default(),
            next_index: 1,
            max_peers,
        }
    }

    /// Makes the table match the map's `nodes` (`me` is skipped): new peers are added
    /// (while there is room), known ones refreshed with their WireGuard sessions kept,
    /// missing ones removed; then the disco and route indexes are rebuilt.
    pub fn apply<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = &'a Node>,
        me: &NodePrivate,
        disco: &DiscoPrivate,
        now: Instant,
    ) -> MapChange {
        let me_pub = me.public();
        let mut change = MapChange::default();
        let nodes: Vec<&Node> = nodes.into_iter().filter(|n| n.key != me_pub).collect();
        // Peers gone from the map leave first, so that their places are free for the
        // newcomers of the same map.
        let wanted: std::collections::BTreeSet<NodePublic> = nodes.iter().map(|n| n.key).collect();
        let gone: Vec<NodePublic> = self
            .peers
            .keys()
            .filter(|k| !wanted.contains(*k))
            .copied()
            .collect();
        for k in gone {
            if let Some(p) = self.peers.remove(&k) {
                self.by_index.remove(&p.index());
                change.removed.push(k);
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for node in nodes {
            if !seen.insert(node.key) {
                continue; // the same key twice in one map: the first entry counts
            }
            change.rejected_prefixes += node.rejected_prefixes() as u64;
            if let Some(p) = self.peers.get_mut(&node.key) {
                p.update(node, disco, now);
                change.updated.push(node.key);
                continue;
            }
            if self.peers.len() >= self.max_peers {
                change.over_limit += 1;
                continue;
            }
            let index = self.free_index();
            self.by_index.insert(index, node.key);
            self.peers
                .insert(node.key, Peer::new(node, me, disco, index, now));
            change.added.push(node.key);
        }
        change.disco_conflicts = self.index_disco_keys();
        self.routes = RouteTable::build(self.peers.iter().map(|(k, p)| (*k, p.allowed_ips())));
        change
    }

    /// The next session index not in use (the counter wraps after 16 million peers
    /// added; an index still held is skipped).
    fn free_index(&mut self) -> u32 {
        let mut index = self.next_index;
        while self.by_index.contains_key(&index) {
            index = (index + 1) & INDEX_MASK;
        }
        self.next_index = (index + 1) & INDEX_MASK;
        index
    }

    /// Rebuilds the disco-key index. A disco key claimed by two peers belongs to
    /// neither: otherwise one node could take over another's path discovery by
    /// advertising its key. Returns how many keys were withheld.
    fn index_disco_keys(&mut self) -> u64 {
        let mut owners: BTreeMap<DiscoPublic, Option<NodePublic>> = BTreeMap::new();
        for (k, p) in &self.peers {
            if let Some(d) = p.disco_key() {
                owners
                    .entry(d)
                    .and_modify(|owner| *owner = None)
                    .or_insert(Some(*k));
            }
        }
        let claimed = owners.len();
        self.by_disco = owners
            .into_iter()
            .filter_map(|(d, k)| k.map(|k| (d, k)))
            .collect();
        (claimed - self.by_disco.len()) as u64
    }

    pub fn get(&self, key: &NodePublic) -> Option<&Peer> {
        self.peers.get(key)
    }

    pub fn get_mut(&mut self, key: &NodePublic) -> Option<&mut Peer> {
        self.peers.get_mut(key)
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &NodePublic> {
        self.peers.keys()
    }

    pub fn values(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.peers.values_mut()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&NodePublic, &Peer)> {
        self.peers.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&NodePublic, &mut Peer)> {
        self.peers.iter_mut()
    }

    /// The peer whose WireGuard session has this receiver index.
    pub fn by_index(&self, index: u32) -> Option<NodePublic> {
        self.by_index.get(&index).copied()
    }

    /// The one peer that claims this disco key (none when two claim it).
    pub fn by_disco(&self, disco: &DiscoPublic) -> Option<NodePublic> {
        self.by_disco.get(disco).copied()
    }

    /// The peer that owns `ip` (its own address or a route it serves).
    pub fn route(&self, ip: IpAddr) -> Option<NodePublic> {
        self.routes.lookup(ip)
    }

    /// Whether a packet `from` decrypted may enter the host: only from an address
    /// `from` owns, so one peer cannot pose as another (or as a host of a route it
    /// does not serve).
    pub fn check_source(&self, from: &NodePublic, packet: &[u8]) -> SourceCheck {
        Sources {
            routes: &self.routes,
            peer: *from,
        }
        .check(packet)
    }

    /// A peer to work on together with the check of what it sends (the peer decrypts
    /// into a buffer, the check looks at the result, without a second lookup).
    pub fn get_mut_with_sources(&mut self, key: &NodePublic) -> Option<(&mut Peer, Sources<'_>)> {
        let peer = self.peers.get_mut(key)?;
        Some((
            peer,
            Sources {
                routes: &self.routes,
                peer: *key,
            },
        ))
    }

    /// A peer by tunnel address, full name, or first name label.
    pub fn find(&self, target: &str) -> Option<NodePublic> {
        if let Ok(ip) = target.parse::<IpAddr>() {
            return self.route(ip);
        }
        let t = target.trim_end_matches('.');
        self.peers
            .iter()
            .find(|(_, p)| {
                let n = p.name().trim_end_matches('.');
                n == t || n.split('.').next() == Some(t)
            })
            .map(|(k, _)| *k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Keys {
        me: NodePrivate,
        disco: DiscoPrivate,
    }

    fn keys() -> Keys {
        Keys {
            me: NodePrivate::generate(),
            disco: DiscoPrivate::generate(),
        }
    }

    /// A peer node `n` with address 100.64.0.n, an optional disco key and extra routes.
    fn node(n: u8, disco: Option<DiscoPublic>, routes: &[&str]) -> Node {
        let mut addrs = vec![format!("100.64.0.{n}/32")];
        addrs.extend(routes.iter().map(|r| r.to_string()));
        Node {
            id: n.into(),
            key: NodePrivate::generate().public(),
            name: format!("host{n}.example.ts.net."),
            disco_key: disco,
            addresses: vec![format!("100.64.0.{n}/32").parse().unwrap()].into(),
            allowed_ips: Some(addrs.iter().map(|a| a.parse().unwrap()).collect()),
            home_derp: 901,
            ..Default::default()
        }
    }

    /// An IPv4 packet header from `src` to 100.64.0.100.
    fn packet_from(src: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&[100, 64, 0, 100]);
        p
    }

    #[test]
    fn peers_come_and_go_with_the_map_and_keep_their_sessions() {
        let k = keys();
        let now = Instant::now();
        let mut t = PeerTable::default();
        let (a, b) = (node(1, None, &[]), node(2, None, &[]));
        let c = t.apply([&a, &b], &k.me, &k.disco, now);
        assert_eq!(c.added.len(), 2);
        let index_a = t.get(&a.key).unwrap().index();
        assert_eq!(t.by_index(index_a), Some(a.key));

        // b leaves, a stays with its session index; its replacement gets a new index.
        let d = node(3, None, &[]);
        let c = t.apply([&a, &d], &k.me, &k.disco, now);
        assert_eq!((c.updated, c.removed), (vec![a.key], vec![b.key]));
        assert_eq!(t.get(&a.key).unwrap().index(), index_a);
        let index_d = t.get(&d.key).unwrap().index();
        assert_ne!(index_d, index_a);
        assert_eq!(t.by_index(index_d), Some(d.key));
        assert_eq!(t.len(), 2);
        assert_eq!(t.route("100.64.0.2".parse().unwrap()), None);
        assert_eq!(t.find("host3"), Some(d.key));
        assert_eq!(t.find("100.64.0.1"), Some(a.key));
    }

    #[test]
    fn our_own_node_is_not_a_peer() {
        let k = keys();
        let mut me = node(1, None, &[]);
        me.key = k.me.public();
        let mut t = PeerTable::default();
        let c = t.apply([&me], &k.me, &k.disco, Instant::now());
        assert!(c.added.is_empty() && t.is_empty());
    }

    #[test]
    fn a_disco_key_claimed_twice_belongs_to_neither() {
        let k = keys();
        let now = Instant::now();
        let shared = DiscoPrivate::generate().public();
        let own = DiscoPrivate::generate().public();
        let (a, b, c) = (
            node(1, Some(shared), &[]),
            node(2, Some(shared), &[]),
            node(3, Some(own), &[]),
        );
        let mut t = PeerTable::default();
        let change = t.apply([&a, &b, &c], &k.me, &k.disco, now);
        assert_eq!(change.disco_conflicts, 1);
        assert_eq!(t.by_disco(&shared), None);
        assert_eq!(t.by_disco(&own), Some(c.key));
        // When one of the claimants leaves, the key is the other's again.
        let change = t.apply([&a, &c], &k.me, &k.disco, now);
        assert_eq!(change.disco_conflicts, 0);
        assert_eq!(t.by_disco(&shared), Some(a.key));
    }

    #[test]
    fn a_full_table_skips_new_peers_and_keeps_known_ones() {
        let k = keys();
        let now = Instant::now();
        let nodes: Vec<Node> = (1..=5).map(|n| node(n, None, &[])).collect();
        let mut t = PeerTable::with_limit(3);
        let c = t.apply(&nodes, &k.me, &k.disco, now);
        assert_eq!((c.added.len(), c.over_limit), (3, 2));
        assert_eq!(t.len(), 3);
        // The skipped peers own no addresses: nothing is routed to them.
        assert_eq!(t.route("100.64.0.5".parse().unwrap()), None);
        // The same map again: the kept peers stay, the others are still skipped.
        let kept: Vec<NodePublic> = t.keys().copied().collect();
        let c = t.apply(&nodes, &k.me, &k.disco, now);
        assert_eq!((c.updated.len(), c.over_limit), (3, 2));
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), kept);
        // One leaves: room for one more.
        let rest: Vec<&Node> = nodes.iter().skip(1).collect();
        let c = t.apply(rest, &k.me, &k.disco, now);
        assert_eq!(
            (c.removed, c.added.len(), c.over_limit),
            (vec![nodes[0].key], 1, 1)
        );
        assert_eq!(t.len(), 3);
        assert_eq!(MAX_PEERS, PeerTable::default().max_peers);
    }

    #[test]
    fn decrypted_packets_enter_only_from_the_senders_own_addresses() {
        let k = keys();
        let (a, b) = (node(1, None, &["10.1.0.0/16"]), node(2, None, &[]));
        let mut t = PeerTable::default();
        t.apply([&a, &b], &k.me, &k.disco, Instant::now());
        let ok = |ip: [u8; 4]| SourceCheck::Allowed(IpAddr::from(ip));
        assert_eq!(
            t.check_source(&a.key, &packet_from([100, 64, 0, 1])),
            ok([100, 64, 0, 1])
        );
        // From a host of the subnet a routes.
        assert_eq!(
            t.check_source(&a.key, &packet_from([10, 1, 2, 3])),
            ok([10, 1, 2, 3])
        );
        // b posing as a, or as a host of a's subnet, or as nobody's address.
        for src in [[100, 64, 0, 1], [10, 1, 2, 3], [192, 0, 2, 1]] {
            assert_eq!(
                t.check_source(&b.key, &packet_from(src)),
                SourceCheck::NotAllowed
            );
        }
        assert_eq!(
            t.check_source(&b.key, &[0x45, 0, 0]),
            SourceCheck::Malformed
        );
        // A peer not in the table owns nothing.
        let stranger = NodePrivate::generate().public();
        assert_eq!(
            t.check_source(&stranger, &packet_from([100, 64, 0, 1])),
            SourceCheck::NotAllowed
        );
    }

    #[test]
    fn bad_prefixes_are_counted() {
        let k = keys();
        let mut a = node(1, None, &[]);
        a.allowed_ips = Some(
            serde_json::from_str(r#"["100.64.0.1/32", "not a prefix", "10.0.0.0/99"]"#).unwrap(),
        );
        let mut t = PeerTable::default();
        let c = t.apply([&a], &k.me, &k.disco, Instant::now());
        assert_eq!(c.rejected_prefixes, 2);
        assert_eq!(t.route("100.64.0.1".parse().unwrap()), Some(a.key));
    }

    #[test]
    fn session_indexes_wrap_and_skip_the_ones_in_use() {
        let mut t = PeerTable {
            next_index: INDEX_MASK,
            ..Default::default()
        };
        t.by_index
            .insert(INDEX_MASK, NodePublic::from_bytes([1; 32]));
        t.by_index.insert(0, NodePublic::from_bytes([2; 32]));
        assert_eq!(t.free_index(), 1);
        assert_eq!(t.free_index(), 2);
    }
}
