//! What each node is told: the first full map response and the deltas between two
//! snapshots of the registry. Pure: snapshots in, map responses out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proto::relaymap::RelayMap;
use proto::tailcfg::{Hostinfo, MapResponse, Node};

use super::policy::{Identity, Policy};
use super::store::NodeRecord;

/// What each node may reach and see under the policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Access {
    /// Each node's `PacketFilter` (JSON rules).
    pub filters: BTreeMap<i64, Arc<serde_json::Value>>,
    /// The peers each node is shown.
    pub peers: BTreeMap<i64, BTreeSet<i64>>,
}

impl Access {
    /// Compiles `policy` for the nodes as it sees them.
    pub fn compile(policy: &Policy, nodes: &[Identity]) -> Access {
        let compiled = policy.compile(nodes);
        let mut access = Access::default();
        for n in nodes {
            let rules = compiled.filter_for(n.id);
            let json = serde_json::to_value(&rules).unwrap_or_else(|_| serde_json::json!([]));
            access.filters.insert(n.id, Arc::new(json));
            access.peers.insert(n.id, compiled.peers_of(n.id).clone());
        }
        access
    }
}

/// The registry at one moment: every node, which ones are streaming now, and their wire
/// form (built once per snapshot, shared by every stream).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub version: u64,
    /// The version this one was built from; `changed` is relative to it.
    pub prev_version: u64,
    pub nodes: BTreeMap<i64, Arc<NodeRecord>>,
    pub online: BTreeSet<i64>,
    /// Unix seconds when it was taken (decides expiry).
    pub now: i64,
    /// Shared with the previous snapshot wherever a node did not change, so keeping an
    /// old snapshot alive (a stream that lags) costs little.
    pub wire: BTreeMap<i64, Arc<Node>>,
    /// IDs whose wire form differs from the previous snapshot (added and removed too).
    pub changed: BTreeSet<i64>,
    /// Filters and visibility under the policy; None: no policy, everything allowed.
    pub access: Option<Arc<Access>>,
    /// What `access` was compiled from (the policy, and each node's owner, tags and
    /// addresses): a snapshot with the same inputs reuses it.
    access_inputs: Option<(Arc<Policy>, Vec<Identity>)>,
}

impl Snapshot {
    /// Builds the next snapshot after `prev`, reusing its entries for unchanged nodes,
    /// with the policy (if any) compiled for its nodes.
    pub fn build(
        nodes: BTreeMap<i64, NodeRecord>,
        online: BTreeSet<i64>,
        now: i64,
        domain: &str,
        policy: Option<(&Arc<Policy>, &BTreeMap<i64, String>)>,
        prev: &Snapshot,
    ) -> Snapshot {
        let mut records = BTreeMap::new();
        let mut wire = BTreeMap::new();
        let mut changed = BTreeSet::new();
        for (id, rec) in nodes {
            let same = prev.nodes.get(&id).is_some_and(|p| **p == rec)
                && prev.online.contains(&id) == online.contains(&id)
                && rec.is_expired(prev.now) == rec.is_expired(now);
            match (same, prev.nodes.get(&id), prev.wire.get(&id)) {
                (true, Some(r), Some(w)) => {
                    records.insert(id, r.clone());
                    wire.insert(id, w.clone());
                }
                _ => {
                    let node = to_node(&rec, online.contains(&id), now, domain);
                    if prev.wire.get(&id).map(|w| **w != node).unwrap_or(true) {
                        changed.insert(id);
                    }
                    records.insert(id, Arc::new(rec));
                    wire.insert(id, Arc::new(node));
                }
            }
        }
        changed.extend(prev.wire.keys().filter(|id| !wire.contains_key(id)));
        let mut access = None;
        let mut access_inputs = None;
        if let Some((p, users)) = policy {
            let inputs: Vec<Identity> = records
                .values()
                .map(|n| Identity {
                    id: n.id,
                    user: users.get(&n.user_id).cloned().unwrap_or_default(),
                    tags: n.tags.clone(),
                    addresses: vec![n.ipv4.into(), n.ipv6.into()],
                })
                .collect();
            let same_inputs = prev
                .access_inputs
                .as_ref()
                .is_some_and(|(pp, pi)| Arc::ptr_eq(pp, p) && *pi == inputs);
            access = match &prev.access {
                Some(old) if same_inputs => Some(old.clone()),
                old => {
                    let a = Access::compile(p, &inputs);
                    // Unchanged results keep the old allocation (streams compare by
                    // pointer first).
                    Some(match old {
                        Some(old) if **old == a => old.clone(),
                        _ => Arc::new(a),
                    })
                }
            };
            access_inputs = Some((p.clone(), inputs));
        }
        Snapshot {
            version: prev.version + 1,
            prev_version: prev.version,
            nodes: records,
            online,
            now,
            wire,
            changed,
            access,
            access_inputs,
        }
    }

    /// Whether nothing a node can see differs from `prev`.
    pub fn same_as(&self, prev: &Snapshot) -> bool {
        self.changed.is_empty() && self.wire.len() == prev.wire.len() && self.access == prev.access
    }

    /// The packet filter of node `id`.
    fn filter_for(&self, id: i64) -> serde_json::Value {
        match &self.access {
            None => allow_all_filter(),
            Some(a) => a
                .filters
                .get(&id)
                .map(|f| (**f).clone())
                .unwrap_or_else(|| serde_json::json!([])),
        }
    }

    /// Whether the policy lets `viewer` see `peer` (always, without a policy).
    fn allows(&self, viewer: i64, peer: i64) -> bool {
        self.access
            .as_ref()
            .is_none_or(|a| a.peers.get(&viewer).is_some_and(|p| p.contains(&peer)))
    }
}

/// Settings that shape every node's view.
#[derive(Debug, Clone)]
pub struct MapSettings {
    /// DNS suffix of node names (`<hostname>.<domain>.`).
    pub domain: String,
    pub relay_map: Arc<RelayMap>,
}

/// RFC 3339 UTC for unix seconds.
pub fn rfc3339(unix: i64) -> String {
    let secs = unix.max(0) as u64;
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// The wire form of a stored node.
pub fn to_node(n: &NodeRecord, online: bool, now: i64, domain: &str) -> Node {
    let addresses: proto::Prefixes = [
        proto::IpNet::from(std::net::IpAddr::V4(n.ipv4)),
        proto::IpNet::from(std::net::IpAddr::V6(n.ipv6)),
    ]
    .into_iter()
    .collect();
    Node {
        id: n.id,
        stable_id: format!("n{}", n.id),
        name: format!("{}.{}.", n.hostname, domain),
        user: n.user_id,
        key: n.node_key,
        key_expiry: n.expiry.map(rfc3339),
        machine: n.machine_key,
        disco_key: n.disco_key,
        allowed_ips: Some(addresses.clone()),
        addresses,
        endpoints: n.endpoints.clone(),
        home_derp: n.home_derp,
        legacy_derp: if n.home_derp > 0 {
            format!("127.3.3.40:{}", n.home_derp)
        } else {
            String::new()
        },
        hostinfo: Some(Hostinfo {
            hostname: n.hostname.clone(),
            os: n.os.clone(),
            ..Default::default()
        }),
        cap: 0,
        online: Some(online),
        last_seen: n.last_seen.map(rfc3339),
        machine_authorized: true,
        expired: n.is_expired(now),
        tags: n.tags.clone(),
    }
}

/// Allow-all packet filter (explicit, not nil): the filter without a policy.
pub fn allow_all_filter() -> serde_json::Value {
    serde_json::to_value(super::policy::allow_all()).unwrap_or_else(|_| serde_json::json!([]))
}

/// Whether `self_id` may see node `n` in `snap`: every other node that has not expired
/// and that the policy lets it reach or be reached by.
fn visible(snap: &Snapshot, self_id: i64, n: &Node) -> bool {
    n.id != self_id && !n.expired && snap.nodes.contains_key(&n.id) && snap.allows(self_id, n.id)
}

/// The first message of a stream: self, relay map, all peers, packet filter.
pub fn full_map(snap: &Snapshot, self_id: i64, settings: &MapSettings) -> Option<MapResponse> {
    let me = (**snap.wire.get(&self_id)?).clone();
    let peers: Vec<Node> = snap
        .wire
        .values()
        .filter(|n| visible(snap, self_id, n))
        .map(|n| (**n).clone())
        .collect();
    Some(MapResponse {
        node: Some(me),
        derp_map: Some((*settings.relay_map).clone()),
        peers,
        packet_filter: Some(snap.filter_for(self_id)),
        domain: settings.domain.clone(),
        ..Default::default()
    })
}

/// What changed for `self_id` between two snapshots; `None` when nothing did. When `new`
/// was built directly from `old`, only the changed IDs are examined.
pub fn delta(old: &Snapshot, new: &Snapshot, self_id: i64) -> Option<MapResponse> {
    let mut r = MapResponse::default();
    let (old_access, new_access) = (
        old.access.as_ref().and_then(|a| a.peers.get(&self_id)),
        new.access.as_ref().and_then(|a| a.peers.get(&self_id)),
    );
    let same_view = old.access.is_none() == new.access.is_none() && old_access == new_access;
    let ids: Box<dyn Iterator<Item = i64> + '_> = if new.prev_version == old.version && same_view {
        Box::new(new.changed.iter().copied())
    } else {
        Box::new(
            old.wire
                .keys()
                .chain(new.wire.keys())
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter(),
        )
    };
    for id in ids {
        let before = old
            .wire
            .get(&id)
            .filter(|n| id == self_id || visible(old, self_id, n));
        let after = new
            .wire
            .get(&id)
            .filter(|n| id == self_id || visible(new, self_id, n));
        if before == after {
            continue;
        }
        if id == self_id {
            if let Some(me) = after {
                r.node = Some((**me).clone());
            }
            continue;
        }
        match (before, after) {
            (Some(_), None) => r.peers_removed.push(id),
            (Some(prev), Some(now)) if only_online_differs(prev, now) => {
                r.online_change.insert(id, now.online.unwrap_or(false));
            }
            (_, Some(now)) => r.peers_changed.push((**now).clone()),
            (None, None) => {}
        }
    }
    let filter_changed = match (&old.access, &new.access) {
        (None, None) => false,
        (Some(a), Some(b)) => {
            !Arc::ptr_eq(a, b) && a.filters.get(&self_id) != b.filters.get(&self_id)
        }
        _ => true,
    };
    if filter_changed {
        r.packet_filter = Some(new.filter_for(self_id));
    }
    if r == MapResponse::default() {
        None
    } else {
        Some(r)
    }
}

fn only_online_differs(a: &Node, b: &Node) -> bool {
    let mut a = a.clone();
    a.online = b.online;
    a.last_seen = b.last_seen.clone();
    a == *b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{MachinePrivate, NodePrivate};

    fn rec(id: i64) -> NodeRecord {
        NodeRecord {
            id,
            user_id: 1,
            machine_key: MachinePrivate::generate().public(),
            node_key: NodePrivate::generate().public(),
            disco_key: None,
            hostname: format!("h{id}"),
            ipv4: super::super::store::ipv4_for(id as u32),
            ipv6: super::super::store::ipv6_for(id as u32),
            endpoints: vec![],
            home_derp: 900,
            expiry: None,
            ephemeral: false,
            created: 0,
            last_seen: None,
            os: "linux".into(),
            tags: vec![],
        }
    }

    fn settings() -> MapSettings {
        MapSettings {
            domain: "agentd.internal".into(),
            relay_map: Arc::new(RelayMap::default()),
        }
    }

    fn snap_after(prev: &Snapshot, nodes: &[NodeRecord], online: &[i64]) -> Snapshot {
        Snapshot::build(
            nodes.iter().map(|n| (n.id, n.clone())).collect(),
            online.iter().copied().collect(),
            100,
            "d",
            None,
            prev,
        )
    }

    fn snap(nodes: &[NodeRecord], online: &[i64]) -> Snapshot {
        snap_after(&Snapshot::default(), nodes, online)
    }

    #[test]
    fn full_map_has_self_peers_relay_map_and_explicit_filter() {
        let (a, b) = (rec(1), rec(2));
        let s = Snapshot::build(
            [(1, a.clone()), (2, b.clone())].into_iter().collect(),
            [1].into_iter().collect(),
            100,
            "agentd.internal",
            None,
            &Snapshot::default(),
        );
        let m = full_map(&s, 1, &settings()).unwrap();
        let me = m.node.unwrap();
        assert_eq!(
            me.addresses
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>(),
            ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
        );
        assert_eq!(me.name, "h1.agentd.internal.");
        assert_eq!(
            (me.home_derp, me.legacy_derp.as_str()),
            (900, "127.3.3.40:900")
        );
        assert_eq!(m.peers.len(), 1);
        assert_eq!(m.peers[0].key, b.node_key);
        assert!(m.derp_map.is_some());
        let json = serde_json::to_string(&m.packet_filter).unwrap();
        assert!(json.contains("SrcIPs"));
    }

    #[test]
    fn deltas_cover_join_change_online_and_removal() {
        let (a, b, c) = (rec(1), rec(2), rec(3));
        let s0 = snap(&[a.clone(), b.clone()], &[1, 2]);
        assert_eq!(delta(&s0, &s0, 1), None);
        // c joins.
        let s1 = snap_after(&s0, &[a.clone(), b.clone(), c.clone()], &[1, 2]);
        assert_eq!(s1.changed.iter().copied().collect::<Vec<_>>(), vec![3]);
        let d = delta(&s0, &s1, 1).unwrap();
        assert_eq!(d.peers_changed.len(), 1);
        assert_eq!(d.peers_changed[0].id, 3);
        // c comes online: only OnlineChange.
        let s2 = snap_after(&s1, &[a.clone(), b.clone(), c.clone()], &[1, 2, 3]);
        let d = delta(&s1, &s2, 1).unwrap();
        assert!(d.peers_changed.is_empty());
        assert_eq!(d.online_change.get(&3), Some(&true));
        // b's endpoints change.
        let mut b2 = b.clone();
        b2.endpoints = vec!["192.0.2.9:1".into()];
        let s3 = snap_after(&s2, &[a.clone(), b2, c.clone()], &[1, 2, 3]);
        let d = delta(&s2, &s3, 1).unwrap();
        assert_eq!(d.peers_changed[0].endpoints, vec!["192.0.2.9:1"]);
        // c is deleted; b expires: both removed from a's view.
        let mut b3 = b.clone();
        b3.expiry = Some(50);
        let s4 = snap_after(&s3, &[a.clone(), b3], &[1]);
        let d = delta(&s3, &s4, 1).unwrap();
        assert_eq!(d.peers_removed, vec![2, 3]);
        // A stream that skipped snapshots compares everything and gets the same answer.
        let d_skip = delta(&s0, &s4, 1).unwrap();
        assert_eq!(d_skip.peers_removed, vec![2]);
        assert!(d_skip.peers_changed.is_empty());
    }

    fn policy_snap(prev: &Snapshot, nodes: &[NodeRecord], policy: &Arc<Policy>) -> Snapshot {
        let users: BTreeMap<i64, String> = [
            (1, "alice".to_string()),
            (2, "bob".to_string()),
            (3, "carol".to_string()),
        ]
        .into_iter()
        .collect();
        Snapshot::build(
            nodes.iter().map(|n| (n.id, n.clone())).collect(),
            BTreeSet::new(),
            100,
            "d",
            Some((policy, &users)),
            prev,
        )
    }

    #[test]
    fn a_policy_shapes_each_nodes_filter_and_peers_and_a_change_streams_as_a_delta() {
        // Node i belongs to user i.
        let nodes: Vec<NodeRecord> = (1..=3)
            .map(|i| NodeRecord {
                user_id: i,
                ..rec(i)
            })
            .collect();
        let p22 = Arc::new(
            Policy::parse(
                r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["bob@:22"]}]}"#,
            )
            .unwrap(),
        );
        let s1 = policy_snap(&Snapshot::default(), &nodes, &p22);
        // bob's filter lets alice in on 22; alice's and carol's let nobody in.
        let bob = full_map(&s1, 2, &settings()).unwrap();
        let f = serde_json::to_string(&bob.packet_filter).unwrap();
        assert!(
            f.contains("100.64.0.1") && f.contains(r#""First":22,"Last":22"#),
            "{f}"
        );
        assert_eq!(bob.peers.iter().map(|n| n.id).collect::<Vec<_>>(), [1]);
        let alice = full_map(&s1, 1, &settings()).unwrap();
        assert_eq!(alice.packet_filter, Some(serde_json::json!([])));
        assert_eq!(alice.peers.iter().map(|n| n.id).collect::<Vec<_>>(), [2]);
        let carol = full_map(&s1, 3, &settings()).unwrap();
        assert!(carol.peers.is_empty());
        // The same inputs again: the compiled access is reused, nothing to send.
        let s2 = policy_snap(&s1, &nodes, &p22);
        assert!(Arc::ptr_eq(
            s1.access.as_ref().unwrap(),
            s2.access.as_ref().unwrap()
        ));
        assert!(s2.same_as(&s1));
        // A new policy: alice → carol instead. bob loses alice and gets an empty filter;
        // carol gains alice.
        let p_carol = Arc::new(
            Policy::parse(
                r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["carol@:*"]}]}"#,
            )
            .unwrap(),
        );
        let s3 = policy_snap(&s2, &nodes, &p_carol);
        assert!(!s3.same_as(&s2));
        let d = delta(&s2, &s3, 2).unwrap();
        assert_eq!(d.peers_removed, vec![1]);
        assert_eq!(d.packet_filter, Some(serde_json::json!([])));
        let d = delta(&s2, &s3, 3).unwrap();
        assert_eq!(
            d.peers_changed.iter().map(|n| n.id).collect::<Vec<_>>(),
            [1]
        );
        assert!(serde_json::to_string(&d.packet_filter)
            .unwrap()
            .contains("100.64.0.1"));
        // alice keeps an empty filter: no PacketFilter in her delta.
        let d = delta(&s2, &s3, 1).unwrap();
        assert_eq!(d.packet_filter, None);
        assert_eq!(d.peers_removed, vec![2]);
    }

    #[test]
    fn the_readme_policy_example_is_valid() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```jsonc\n")
            .expect("README has a policy example")
            + 9;
        let len = readme[start..].find("```").unwrap();
        if let Err(e) = Policy::parse(&readme[start..start + len]) {
            panic!("README's policy example: {e}");
        }
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
    }
}
