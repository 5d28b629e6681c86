//! `agentctl status` and `agentctl whois`: the local API's view of the device, rendered
//! from the node, the network map, the relay connections and the control session's state.
//! Reads only; the engine gathers what it needs into a [`View`].

use std::collections::BTreeMap;
use std::time::Instant;

use control::session::SessionState;
use netcheck::Report;
use proto::localapi::{
    BackendState, ControlState, FilterStatus, PeerPath, PeerStatus, SelfStatus, Status,
};
use proto::netmap::NetMap;
use proto::relaymap::RelayMap;
use proto::{NodePublic, RegionId};

use crate::ipv6::Ipv6Support;
use crate::node::core::Node;
use crate::node::peer::Peer;
use crate::relays::Relays;

/// Everything status is rendered from, borrowed from the engine.
pub struct View<'a> {
    pub node: &'a Node,
    pub netmap: Option<&'a NetMap>,
    pub relays: &'a Relays,
    pub control_url: &'a str,
    pub control_state: &'a SessionState,
    /// Up (a control session exists), not held down by `agentctl down`.
    pub running: bool,
    pub last_report: Option<&'a Report>,
    pub tun: Option<&'a str>,
    pub ipv6: &'a Ipv6Support,
}

impl std::fmt::Debug for View<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("running", &self.running)
            .field("peers", &self.node.peers().len())
            .finish_non_exhaustive()
    }
}

/// A region's display name (its code when it has no name).
pub fn region_name(map: &RelayMap, region: RegionId) -> Option<String> {
    map.regions.get(&region.get()).map(|r| {
        if r.region_name.is_empty() {
            r.region_code.clone()
        } else {
            r.region_name.clone()
        }
    })
}

/// Prefixes in their text form.
fn prefix_strings(p: &[proto::IpNet]) -> Vec<String> {
    p.iter().map(|n| n.to_string()).collect()
}

impl View<'_> {
    fn region_name(&self, region: RegionId) -> Option<String> {
        region_name(self.relays.map(), region)
    }

    /// The netmap entries by node key (one pass, not one per peer).
    fn nodes_by_key(&self) -> BTreeMap<NodePublic, &proto::tailcfg::Node> {
        self.netmap
            .map(|nm| nm.peers.values().map(|n| (n.key, n)).collect())
            .unwrap_or_default()
    }

    /// One peer as status shows it.
    pub fn peer(&self, p: &Peer, now: Instant) -> PeerStatus {
        let node = self.netmap.and_then(|nm| nm.peer_by_key(p.key()));
        self.peer_with(p, node, now)
    }

    fn peer_with(&self, p: &Peer, node: Option<&proto::tailcfg::Node>, now: Instant) -> PeerStatus {
        let (hs, tx, rx) = p.wg_stats();
        let targets = p.path().send_targets(now);
        let path = match (targets.udp, p.home_region().is_some()) {
            (Some(_), _) => PeerPath::Direct,
            (None, true) => PeerPath::Relay,
            (None, false) => PeerPath::None,
        };
        let mut reason = p.path().reason(now).describe(now);
        if path == PeerPath::None {
            reason = "no path: the peer has no home relay yet and no direct path".into();
        }
        PeerStatus {
            name: p.name().trim_end_matches('.').to_string(),
            node_key: p.key().to_string(),
            addresses: node
                .map(|n| prefix_strings(&n.addresses))
                .unwrap_or_default(),
            os: node
                .and_then(|n| n.hostinfo.as_ref())
                .map(|h| h.os.clone())
                .unwrap_or_default(),
            online: node.and_then(|n| n.online),
            path,
            direct: targets.udp.map(|a| a.to_string()),
            relay_region: p.home_region().map(RegionId::get),
            relay_region_name: p.home_region().and_then(|r| self.region_name(r)),
            reason,
            last_handshake_secs: hs.map(|d| d.as_secs_f64()),
            rx_bytes: rx as u64,
            tx_bytes: tx as u64,
            denied: p.denied(),
            expired: p.expired(),
        }
    }

    /// The whole status.
    pub fn render(&self, now: Instant) -> Status {
        let nodes = self.nodes_by_key();
        let me = self.netmap.and_then(|nm| nm.self_node.as_ref());
        let home = self.relays.home();
        let (state, auth_url) = match self.control_state {
            _ if !self.running => (BackendState::Stopped, None),
            SessionState::NeedsLogin { url } => (BackendState::NeedsLogin, Some(url.clone())),
            _ if self.netmap.is_some() => (BackendState::Running, None),
            _ => (BackendState::Starting, None),
        };
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            state,
            auth_url,
            control_url: self.control_url.to_string(),
            control_connected: matches!(self.control_state, SessionState::Connected),
            control_state: match self.control_state {
                _ if !self.running => ControlState::Stopped,
                SessionState::Connecting => ControlState::Connecting,
                SessionState::Connected => ControlState::Connected,
                SessionState::NeedsLogin { .. } => ControlState::NeedsLogin,
                SessionState::Retrying { .. } => ControlState::Retrying,
                SessionState::Refused { .. } => ControlState::Refused,
            },
            control_error: match self.control_state {
                SessionState::Retrying { error } => Some(error.clone()),
                SessionState::Refused { reason } => Some(reason.clone()),
                _ => None,
            },
            me: SelfStatus {
                name: me
                    .map(|n| n.name.trim_end_matches('.').to_string())
                    .unwrap_or_default(),
                node_key: self.node.public_key().to_string(),
                addresses: me.map(|n| prefix_strings(&n.addresses)).unwrap_or_default(),
                os: std::env::consts::OS.into(),
                endpoints: self
                    .node
                    .endpoints()
                    .iter()
                    .map(|e| e.to_string())
                    .collect(),
                home_region: home.map(RegionId::get),
                home_region_name: home.and_then(|h| self.region_name(h)),
                home_latency_ms: home.and_then(|h| {
                    self.last_report
                        .and_then(|r| r.region_latency.get(&h.get()))
                        .map(|d| d.as_secs_f64() * 1000.0)
                }),
                tun: self.tun.map(str::to_string),
                ipv6_off: match self.ipv6 {
                    Ipv6Support::On => None,
                    Ipv6Support::Off(why) => Some(why.to_string()),
                },
            },
            counters: {
                let mut m: BTreeMap<String, u64> = self
                    .node
                    .counters
                    .named()
                    .chain(self.relays.counters.named())
                    .collect();
                // Path selection's counters, summed over the current peers.
                for p in self.node.peers().values() {
                    for (name, n) in p.path().counters.named() {
                        *m.entry(format!("disco_{name}")).or_default() += n;
                    }
                }
                m
            },
            peers: self
                .node
                .peers()
                .values()
                .map(|p| self.peer_with(p, nodes.get(p.key()).copied(), now))
                .collect(),
        }
    }
}

/// The packet filter in force, for `agentctl debug filter`.
pub fn filter(node: &Node) -> FilterStatus {
    let f = node.filter();
    let (rules, skipped) = f.rule_count();
    FilterStatus {
        received: rules.is_some(),
        rules: f.describe(),
        skipped,
        local: prefix_strings(f.local()),
        flows: f.flow_count(),
        flows_evicted: f.evicted,
        denied: node
            .counters
            .filter_denied
            .iter()
            .map(|(r, n)| (r.to_string(), n))
            .collect(),
    }
}
