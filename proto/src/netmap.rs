//! The network map a node holds: itself, its peers, the relay map and the packet filter,
//! merged from the stream of map responses (full and delta). Pure: no I/O, no clock.

use std::collections::BTreeMap;

use crate::relaymap::RelayMap;
use crate::tailcfg::{MapResponse, Node};

/// What the control server has told this node so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetMap {
    pub self_node: Option<Node>,
    /// Peers by node ID.
    pub peers: BTreeMap<i64, Node>,
    pub relay_map: Option<RelayMap>,
    /// The packet filter as raw JSON rules (its named parts concatenated); `None` until
    /// the server sends one.
    pub packet_filter: Option<serde_json::Value>,
    /// The named parts of the filter (`PacketFilter` is the part `base`).
    pub filter_parts: BTreeMap<String, serde_json::Value>,
    pub domain: String,
}

impl NetMap {
    /// Applies one map response; returns whether anything changed.
    pub fn apply(&mut self, r: MapResponse) -> bool {
        let before = self.clone();
        if let Some(n) = r.node {
            self.self_node = Some(n);
        }
        if let Some(m) = r.derp_map {
            self.relay_map = Some(m);
        }
        if !r.peers.is_empty() {
            self.peers = r.peers.into_iter().map(|p| (p.id, p)).collect();
        }
        for p in r.peers_changed {
            self.peers.insert(p.id, p);
        }
        for id in r.peers_removed {
            self.peers.remove(&id);
        }
        for c in r.peers_changed_patch {
            let Some(p) = self.peers.get_mut(&c.node_id) else {
                continue;
            };
            if let Some(region) = c.derp_region {
                p.home_derp = region;
                p.legacy_derp.clear();
            }
            if let Some(cap) = c.cap {
                p.cap = cap;
            }
            if let Some(e) = c.endpoints {
                p.endpoints = e;
            }
            if let Some(k) = c.key {
                p.key = k;
            }
            if let Some(k) = c.disco_key {
                p.disco_key = Some(k);
            }
            if let Some(o) = c.online {
                p.online = Some(o);
            }
            if let Some(t) = c.last_seen {
                p.last_seen = Some(t);
            }
            if let Some(t) = c.key_expiry {
                p.key_expiry = Some(t);
            }
        }
        for (id, online) in r.online_change {
            if let Some(p) = self.peers.get_mut(&id) {
                p.online = Some(online);
            }
        }
        self.apply_filter(r.packet_filter, r.packet_filters);
        if !r.domain.is_empty() {
            self.domain = r.domain;
        }
        *self != before
    }

    /// Merges `PacketFilter` (null or absent: unchanged) and `PacketFilters` (named
    /// parts; null deletes a part, `"*": null` clears them all first) into the filter.
    fn apply_filter(
        &mut self,
        base: Option<serde_json::Value>,
        parts: Option<BTreeMap<String, serde_json::Value>>,
    ) {
        let base = base.filter(|f| !f.is_null());
        if base.is_none() && parts.is_none() {
            return;
        }
        if let Some(f) = base {
            self.filter_parts.insert("base".into(), f);
        }
        if let Some(mut parts) = parts {
            if parts.remove("*").is_some_and(|v| v.is_null()) {
                self.filter_parts.clear();
            }
            for (name, rules) in parts {
                if rules.is_null() {
                    self.filter_parts.remove(&name);
                } else {
                    self.filter_parts.insert(name, rules);
                }
            }
        }
        // A part that is not a list is kept as one element: the filter skips and counts
        // it rather than losing sight of it.
        let mut all = Vec::new();
        for part in self.filter_parts.values() {
            match part {
                serde_json::Value::Array(rules) => all.extend(rules.iter().cloned()),
                other => all.push(other.clone()),
            }
        }
        self.packet_filter = Some(serde_json::Value::Array(all));
    }

    /// The peer with this node key, if any.
    pub fn peer_by_key(&self, key: &crate::NodePublic) -> Option<&Node> {
        self.peers.values().find(|p| p.key == *key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tailcfg::PeerChange;

    fn node(id: i64) -> Node {
        Node {
            id,
            key: crate::NodePublic::from_bytes([id as u8; 32]),
            addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()].into(),
            ..Default::default()
        }
    }

    #[test]
    fn full_then_delta_updates_merge() {
        let mut nm = NetMap::default();
        assert!(nm.apply(MapResponse {
            node: Some(node(1)),
            peers: vec![node(2), node(3)],
            ..Default::default()
        }));
        assert_eq!(nm.peers.len(), 2);
        nm.apply(MapResponse {
            peers_changed: vec![node(4)],
            peers_removed: vec![2],
            ..Default::default()
        });
        assert_eq!(nm.peers.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
        nm.apply(MapResponse {
            peers_changed_patch: vec![PeerChange {
                node_id: 3,
                derp_region: Some(901),
                endpoints: Some(vec!["192.0.2.1:41641".into()]),
                ..Default::default()
            }],
            online_change: [(4, true)].into_iter().collect(),
            ..Default::default()
        });
        assert_eq!(
            nm.peers[&3].home_region().map(crate::RegionId::get),
            Some(901)
        );
        assert_eq!(nm.peers[&3].endpoints, vec!["192.0.2.1:41641"]);
        assert_eq!(nm.peers[&4].online, Some(true));
        // A keep-alive changes nothing.
        assert!(!nm.apply(MapResponse {
            keep_alive: true,
            ..Default::default()
        }));
    }

    #[test]
    fn legacy_derp_string_and_null_allowed_ips() {
        let json = r#"{"ID":5,"Key":"nodekey:0505050505050505050505050505050505050505050505050505050505050505","DERP":"127.3.3.40:902","Addresses":["100.64.0.5/32"],"AllowedIPs":null}"#;
        let n: Node = serde_json::from_str(json).unwrap();
        assert_eq!(n.home_region().map(crate::RegionId::get), Some(902));
        assert_eq!(
            n.routes(),
            &["100.64.0.5/32".parse::<crate::IpNet>().unwrap()]
        );
        let n: Node = serde_json::from_str(
            r#"{"ID":6,"HomeDERP":900,"DERP":"127.3.3.40:902","AllowedIPs":["10.0.0.0/8"]}"#,
        )
        .unwrap();
        assert_eq!(n.home_region().map(crate::RegionId::get), Some(900));
        assert_eq!(n.routes(), &["10.0.0.0/8".parse::<crate::IpNet>().unwrap()]);
    }

    #[test]
    fn packet_filter_null_keeps_previous_and_empty_means_deny_all() {
        let mut nm = NetMap::default();
        let r: MapResponse =
            serde_json::from_str(r#"{"PacketFilter":[{"SrcIPs":["*"]}]}"#).unwrap();
        nm.apply(r);
        let r: MapResponse = serde_json::from_str(r#"{"PacketFilter":null}"#).unwrap();
        nm.apply(r);
        assert!(nm.packet_filter.as_ref().unwrap().as_array().unwrap().len() == 1);
        let r: MapResponse = serde_json::from_str(r#"{"PacketFilter":[]}"#).unwrap();
        nm.apply(r);
        assert_eq!(nm.packet_filter, Some(serde_json::json!([])));
    }

    #[test]
    fn named_filter_parts_merge_in_name_order() {
        let mut nm = NetMap::default();
        let apply = |nm: &mut NetMap, json: &str| {
            nm.apply(serde_json::from_str::<MapResponse>(json).unwrap());
        };
        apply(&mut nm, r#"{"KeepAlive":true}"#);
        assert_eq!(nm.packet_filter, None);
        apply(
            &mut nm,
            r#"{"PacketFilters":{"b":[{"SrcIPs":["2"]}],"a":[{"SrcIPs":["1"]}]}}"#,
        );
        assert_eq!(
            nm.packet_filter,
            Some(serde_json::json!([{"SrcIPs":["1"]},{"SrcIPs":["2"]}]))
        );
        // PacketFilter is the part "base"; null deletes a part.
        apply(
            &mut nm,
            r#"{"PacketFilter":[{"SrcIPs":["0"]}],"PacketFilters":{"a":null}}"#,
        );
        assert_eq!(
            nm.packet_filter,
            Some(serde_json::json!([{"SrcIPs":["2"]},{"SrcIPs":["0"]}]))
        );
        // "*": null clears everything before the rest applies.
        apply(&mut nm, r#"{"PacketFilters":{"*":null,"c":[]}}"#);
        assert_eq!(nm.packet_filter, Some(serde_json::json!([])));
        // A part that is not a list stays visible (the filter skips and counts it).
        apply(&mut nm, r#"{"PacketFilters":{"d":{"x":1}}}"#);
        assert_eq!(nm.packet_filter, Some(serde_json::json!([{"x":1}])));
    }
}
