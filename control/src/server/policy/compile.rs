//! A parsed policy compiled for the current nodes: each node's packet filter and the
//! peers it may see.
//!
//! Facts followed (juanfont/headscale `hscontrol/policy/v2/filter.go`, `compiled.go` and
//! `hscontrol/policy/policyutil/reduce.go`; tailscale/tailscale `tailcfg/tailcfg.go`):
//! - a node receives only the rules whose destinations include it, each destination list
//!   reduced to that node; here every `DstPorts` entry (also for `*`, which Headscale keeps
//!   as `*`) is narrowed to the node's own addresses, the same thing for a node that
//!   routes no subnets, and agentd's nodes route none;
//! - `SrcIPs` lists the source nodes' addresses, CIDRs and hosts as written, `*` alone
//!   when the sources include `*`;
//! - a grant's `app` becomes a rule with one `CapGrant` whose `Dsts` are the destination
//!   node's addresses as /32 and /128 prefixes;
//! - `autogroup:self` gives each untagged node a rule of its own whose sources are the
//!   rule's sources among its user's untagged nodes;
//! - a rule whose sources resolve to no address is dropped (Headscale drops such network
//!   rules; for `app` it keeps one with empty `SrcIPs`, which grants nobody anything);
//! - two nodes see each other when any rule lets one reach the other.
//!
//! Source lists are built once per rule and shared by the nodes' rules (`FilterRule`s
//! are only built in [`Compiled::filter_for`]); peer sets are bitsets, one OR of
//! nodes/64 words per source or destination node of a rule.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use proto::tailcfg::{CapGrant, FilterRule, NetPortRange, PortRange};
use serde_json::Value;

use super::parse::{Alias, Model};
use super::Identity;

/// Per node: its packet filter and its visible peers.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    /// Node id → its position in the compiled nodes (the first node with the id).
    index: BTreeMap<i64, usize>,
    rules: Vec<Vec<NodeRule>>,
    peers: Vec<BTreeSet<i64>>,
    none: BTreeSet<i64>,
}

impl Compiled {
    /// The `PacketFilter` for node `id`, in policy order; empty (deny all inbound) for a
    /// node nothing may reach or an unknown id.
    pub fn filter_for(&self, id: i64) -> Vec<FilterRule> {
        let Some(&i) = self.index.get(&id) else {
            return Vec::new();
        };
        self.rules[i].iter().map(NodeRule::to_filter_rule).collect()
    }

    /// The nodes `id` may see as peers: those it may reach or that may reach it by any
    /// rule, on any port or protocol or by capability. Never itself.
    pub fn peers_of(&self, id: i64) -> &BTreeSet<i64> {
        self.index.get(&id).map_or(&self.none, |&i| &self.peers[i])
    }

    /// Whether nodes `a` and `b` may see each other.
    pub fn may_see(&self, a: i64, b: i64) -> bool {
        self.peers_of(a).contains(&b)
    }
}

/// What a rule gives its destinations.
#[derive(Debug, Clone)]
enum Grant {
    /// Network access over these protocols (empty: the default set).
    Ip(Vec<i64>),
    /// Capabilities.
    App(Arc<BTreeMap<String, Vec<Value>>>),
}

/// One rule as one node receives it.
#[derive(Debug, Clone)]
struct NodeRule {
    src: Arc<[String]>,
    grant: Grant,
    /// The node's addresses this rule opens, with ports (`ANY` for capabilities).
    dst: Vec<(IpAddr, PortRange)>,
}

impl NodeRule {
    fn to_filter_rule(&self) -> FilterRule {
        let mut rule = FilterRule {
            src_ips: self.src.to_vec(),
            ..FilterRule::default()
        };
        match &self.grant {
            Grant::Ip(proto) => {
                rule.ip_proto = proto.clone();
                rule.dst_ports = self
                    .dst
                    .iter()
                    .map(|(ip, ports)| NetPortRange {
                        ip: ip.to_string(),
                        bits: None,
                        ports: *ports,
                    })
                    .collect();
            }
            Grant::App(caps) => {
                // Capabilities carry `ANY` ports, so each address is here once.
                rule.cap_grant = vec![CapGrant {
                    dsts: self
                        .dst
                        .iter()
                        .map(|(ip, _)| IpNet::from(*ip).to_string())
                        .collect(),
                    cap_map: (**caps).clone(),
                    ..CapGrant::default()
                }];
            }
        }
        rule
    }
}

/// A set of node positions.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }

    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    fn or(&mut self, other: &Bits) {
        self.0.iter_mut().zip(&other.0).for_each(|(a, b)| *a |= b);
    }

    fn and(&self, other: &Bits) -> Bits {
        Bits(self.0.iter().zip(&other.0).map(|(a, b)| a & b).collect())
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(k, &w)| {
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| k * 64 + b)
        })
    }
}

/// The nodes, indexed for resolving aliases.
struct Tailnet<'a> {
    nodes: &'a [Identity],
    groups: &'a BTreeMap<String, Vec<String>>,
    /// Positions of the nodes compiled (the first of each id).
    live: Vec<usize>,
    /// User name → that user's untagged nodes.
    by_user: BTreeMap<&'a str, Bits>,
    by_tag: BTreeMap<&'a str, Bits>,
}

impl Tailnet<'_> {
    fn empty(&self) -> Bits {
        Bits::new(self.nodes.len())
    }

    /// Adds the nodes `a` names to `into` (`autogroup:self` names none by itself).
    fn members(&self, a: &Alias, into: &mut Bits) {
        let mut add_if = |keep: &dyn Fn(&Identity) -> bool| {
            for &i in &self.live {
                if keep(&self.nodes[i]) {
                    into.set(i);
                }
            }
        };
        match a {
            Alias::Any => add_if(&|_| true),
            Alias::Member => add_if(&|n| n.tags.is_empty()),
            Alias::Tagged => add_if(&|n| !n.tags.is_empty()),
            Alias::Net(net) => add_if(&|n| n.addresses.iter().any(|ip| net.contains(ip))),
            Alias::SelfDevices => {}
            Alias::User(u) => {
                if let Some(b) = self.by_user.get(u.as_str()) {
                    into.or(b);
                }
            }
            Alias::Tag(t) => {
                if let Some(b) = self.by_tag.get(t.as_str()) {
                    into.or(b);
                }
            }
            Alias::Group(g) => {
                for u in self.groups.get(g).into_iter().flatten() {
                    if let Some(b) = self.by_user.get(u.as_str()) {
                        into.or(b);
                    }
                }
            }
        }
    }

    /// The addresses of node `i` that `a` covers.
    fn addrs<'s>(&'s self, a: &'s Alias, i: usize) -> impl Iterator<Item = IpAddr> + 's {
        self.nodes[i]
            .addresses
            .iter()
            .copied()
            .filter(move |ip| !matches!(a, Alias::Net(n) if !n.contains(ip)))
    }

    /// `SrcIPs`: the addresses of the `whole` nodes, and the `nets` as written, or
    /// (`within`) only the addresses of those nodes inside the nets.
    fn src_ips(&self, whole: &Bits, nets: &[IpNet], within: Option<&Bits>) -> Arc<[String]> {
        let mut set: BTreeSet<IpNet> = whole
            .ones()
            .flat_map(|i| self.nodes[i].addresses.iter().map(|ip| IpNet::from(*ip)))
            .collect();
        match within {
            None => set.extend(nets),
            Some(w) => {
                for i in w.ones() {
                    let inside = self.nodes[i]
                        .addresses
                        .iter()
                        .filter(|ip| nets.iter().any(|n| n.contains(*ip)));
                    set.extend(inside.map(|ip| IpNet::from(*ip)));
                }
            }
        }
        set.iter()
            .map(|n| match n.prefix_len() == n.max_prefix_len() {
                true => n.addr().to_string(),
                false => n.to_string(),
            })
            .collect()
    }
}

/// Makes `a` and `b` visible to each other, both ways.
fn connect(peers: &mut [Bits], a: &Bits, b: &Bits) {
    for i in a.ones() {
        peers[i].or(b);
    }
    for i in b.ones() {
        peers[i].or(a);
    }
}

/// Destinations with the ports each opens.
type Dsts<'a> = Vec<(&'a Alias, &'a [PortRange])>;

/// Drops repeated (address, ports) pairs, keeping the first of each.
fn dedup(mut list: Vec<(IpAddr, PortRange)>) -> Vec<(IpAddr, PortRange)> {
    let mut seen = BTreeSet::new();
    list.retain(|(ip, p)| seen.insert((*ip, p.first, p.last)));
    list
}

pub(super) fn compile(model: &Model, nodes: &[Identity]) -> Compiled {
    let n = nodes.len();
    let mut index = BTreeMap::new();
    let mut live = Vec::new();
    let mut by_user: BTreeMap<&str, Bits> = BTreeMap::new();
    let mut by_tag: BTreeMap<&str, Bits> = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let Entry::Vacant(e) = index.entry(node.id) else {
            continue;
        };
        e.insert(i);
        live.push(i);
        if node.tags.is_empty() {
            by_user
                .entry(&node.user)
                .or_insert_with(|| Bits::new(n))
                .set(i);
        }
        for t in &node.tags {
            by_tag.entry(t).or_insert_with(|| Bits::new(n)).set(i);
        }
    }
    let net = Tailnet {
        nodes,
        groups: &model.groups,
        live,
        by_user,
        by_tag,
    };
    let mut rules: Vec<Vec<NodeRule>> = vec![Vec::new(); n];
    let mut seen = vec![net.empty(); n];
    for rule in &model.rules {
        let any_src = rule.src.contains(&Alias::Any);
        let nets: Vec<IpNet> = rule
            .src
            .iter()
            .filter_map(|a| match a {
                Alias::Net(n) => Some(*n),
                _ => None,
            })
            .collect();
        let (mut src, mut named) = (net.empty(), net.empty());
        for a in &rule.src {
            net.members(a, &mut src);
            if !matches!(a, Alias::Net(_)) {
                net.members(a, &mut named);
            }
        }
        let src_ips: Arc<[String]> = match any_src {
            true => Arc::from(vec!["*".to_string()]),
            false => net.src_ips(&named, &nets, None),
        };
        if src_ips.is_empty() {
            // Its users have no nodes (yet): nothing to send, nobody to see.
            continue;
        }
        let mut targets: Vec<(Grant, Dsts)> = rule
            .ip
            .iter()
            .map(|acc| {
                let dst = acc.dst.iter().map(|(a, p)| (a, p.as_slice())).collect();
                (Grant::Ip(acc.proto.clone()), dst)
            })
            .collect();
        if !rule.app.is_empty() {
            let dst = rule
                .app_dst
                .iter()
                .map(|a| (a, &[PortRange::ANY][..]))
                .collect();
            targets.push((Grant::App(Arc::new(rule.app.clone())), dst));
        }
        for (grant, dsts) in targets {
            let mut per_node: BTreeMap<usize, Vec<(IpAddr, PortRange)>> = BTreeMap::new();
            let mut dst = net.empty();
            let mut self_ports: Vec<PortRange> = Vec::new();
            for (a, ports) in dsts {
                if *a == Alias::SelfDevices {
                    self_ports.extend(ports);
                    continue;
                }
                let mut m = net.empty();
                net.members(a, &mut m);
                for d in m.ones() {
                    let list = per_node.entry(d).or_default();
                    for ip in net.addrs(a, d) {
                        for p in ports {
                            list.push((ip, *p));
                        }
                    }
                }
                dst.or(&m);
            }
            for (d, list) in per_node {
                rules[d].push(NodeRule {
                    src: src_ips.clone(),
                    grant: grant.clone(),
                    dst: dedup(list),
                });
            }
            connect(&mut seen, &src, &dst);
            if self_ports.is_empty() {
                continue;
            }
            // autogroup:self: per user, the sources among that user's untagged nodes.
            for own in net.by_user.values() {
                let from = src.and(own);
                if from.is_empty() {
                    continue;
                }
                let whole = if any_src { own.clone() } else { named.and(own) };
                let ips = net.src_ips(&whole, &nets, Some(own));
                for d in own.ones() {
                    let mut list = Vec::new();
                    for ip in &nodes[d].addresses {
                        for p in &self_ports {
                            list.push((*ip, *p));
                        }
                    }
                    rules[d].push(NodeRule {
                        src: ips.clone(),
                        grant: grant.clone(),
                        dst: dedup(list),
                    });
                }
                connect(&mut seen, &from, own);
            }
        }
    }
    let peers = seen
        .iter()
        .enumerate()
        .map(|(i, b)| b.ones().filter(|&j| j != i).map(|j| nodes[j].id).collect())
        .collect();
    Compiled {
        index,
        rules,
        peers,
        none: BTreeSet::new(),
    }
}
