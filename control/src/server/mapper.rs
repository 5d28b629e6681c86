//! What each node is told: the first full map response and the deltas between two
//! snapshots of the registry. Pure: snapshots in, map responses out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proto::relaymap::RelayMap;
use proto::tailcfg::{Hostinfo, MapResponse, Node};

use super::store::NodeRecord;

/// The registry at one moment: every node and which ones are streaming now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub nodes: BTreeMap<i64, NodeRecord>,
    pub online: BTreeSet<i64>,
    /// Unix seconds when it was taken (decides expiry).
    pub now: i64,
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
pub fn to_node(n: &NodeRecord, snap: &Snapshot, domain: &str) -> Node {
    let addresses = vec![format!("{}/32", n.ipv4), format!("{}/128", n.ipv6)];
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
            ..Default::default()
        }),
        cap: 0,
        online: Some(snap.online.contains(&n.id)),
        last_seen: n.last_seen.map(rfc3339),
        machine_authorized: true,
        expired: n.is_expired(snap.now),
    }
}

/// Allow-all packet filter (explicit, not nil).
pub fn allow_all_filter() -> serde_json::Value {
    serde_json::json!([{
        "SrcIPs": ["*"],
        "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]
    }])
}

/// The peers `self_id` may see: every other node that has not expired.
fn visible_peers(snap: &Snapshot, self_id: i64) -> impl Iterator<Item = &NodeRecord> {
    snap.nodes
        .values()
        .filter(move |n| n.id != self_id && !n.is_expired(snap.now))
}

/// The first message of a stream: self, relay map, all peers, packet filter.
pub fn full_map(snap: &Snapshot, self_id: i64, settings: &MapSettings) -> Option<MapResponse> {
    let me = snap.nodes.get(&self_id)?;
    let peers: Vec<Node> = visible_peers(snap, self_id)
        .map(|n| to_node(n, snap, &settings.domain))
        .collect();
    Some(MapResponse {
        node: Some(to_node(me, snap, &settings.domain)),
        derp_map: Some((*settings.relay_map).clone()),
        peers,
        packet_filter: Some(allow_all_filter()),
        domain: settings.domain.clone(),
        ..Default::default()
    })
}

/// What changed for `self_id` between two snapshots; `None` when nothing did.
pub fn delta(old: &Snapshot, new: &Snapshot, self_id: i64, domain: &str) -> Option<MapResponse> {
    let mut r = MapResponse::default();
    let me_old = old.nodes.get(&self_id).map(|n| to_node(n, old, domain));
    let me_new = new.nodes.get(&self_id).map(|n| to_node(n, new, domain));
    if me_new != me_old {
        r.node = me_new;
    }
    let before: BTreeMap<i64, Node> = visible_peers(old, self_id)
        .map(|n| (n.id, to_node(n, old, domain)))
        .collect();
    for n in visible_peers(new, self_id) {
        let now = to_node(n, new, domain);
        match before.get(&n.id) {
            Some(prev) if *prev == now => {}
            Some(prev) if only_online_differs(prev, &now) => {
                r.online_change.insert(n.id, now.online.unwrap_or(false));
            }
            _ => r.peers_changed.push(now),
        }
    }
    for id in before.keys() {
        if !visible_peers(new, self_id).any(|n| n.id == *id) {
            r.peers_removed.push(*id);
        }
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
        }
    }

    fn settings() -> MapSettings {
        MapSettings {
            domain: "agentd.internal".into(),
            relay_map: Arc::new(RelayMap::default()),
        }
    }

    fn snap(nodes: &[NodeRecord], online: &[i64]) -> Snapshot {
        Snapshot {
            nodes: nodes.iter().map(|n| (n.id, n.clone())).collect(),
            online: online.iter().copied().collect(),
            now: 100,
        }
    }

    #[test]
    fn full_map_has_self_peers_relay_map_and_explicit_filter() {
        let (a, b) = (rec(1), rec(2));
        let m = full_map(&snap(&[a.clone(), b.clone()], &[1]), 1, &settings()).unwrap();
        let me = m.node.unwrap();
        assert_eq!(me.addresses, vec!["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]);
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
        assert_eq!(delta(&s0, &s0, 1, "d"), None);
        // c joins.
        let s1 = snap(&[a.clone(), b.clone(), c.clone()], &[1, 2]);
        let d = delta(&s0, &s1, 1, "d").unwrap();
        assert_eq!(d.peers_changed.len(), 1);
        assert_eq!(d.peers_changed[0].id, 3);
        // c comes online: only OnlineChange.
        let s2 = snap(&[a.clone(), b.clone(), c.clone()], &[1, 2, 3]);
        let d = delta(&s1, &s2, 1, "d").unwrap();
        assert!(d.peers_changed.is_empty());
        assert_eq!(d.online_change.get(&3), Some(&true));
        // b's endpoints change.
        let mut b2 = b.clone();
        b2.endpoints = vec!["192.0.2.9:1".into()];
        let s3 = snap(&[a.clone(), b2, c.clone()], &[1, 2, 3]);
        let d = delta(&s2, &s3, 1, "d").unwrap();
        assert_eq!(d.peers_changed[0].endpoints, vec!["192.0.2.9:1"]);
        // c is deleted; b expires: both removed from a's view.
        let mut b3 = b.clone();
        b3.expiry = Some(50);
        let s4 = snap(&[a.clone(), b3], &[1]);
        let d = delta(&s3, &s4, 1, "d").unwrap();
        assert_eq!(d.peers_removed, vec![2, 3]);
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
    }
}
