//! Which peer owns a destination address: the routing table built from each peer's
//! `AllowedIPs` (its own addresses, and any subnets it routes). Longest prefix wins. Pure.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proto::{IpNet, NodePublic};

/// Destination address → peer.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    /// Host routes (/32, /128): the common case, one lookup.
    hosts: BTreeMap<IpAddr, NodePublic>,
    /// Wider prefixes, longest first.
    nets: Vec<(IpNet, NodePublic)>,
}

impl RouteTable {
    /// Builds the table from (peer, its allowed IPs).
    pub fn build<'a>(peers: impl IntoIterator<Item = (NodePublic, &'a [IpNet])>) -> Self {
        let mut t = RouteTable::default();
        for (key, nets) in peers {
            for p in nets {
                if p.prefix_len() == p.max_prefix_len() {
                    t.hosts.entry(p.addr()).or_insert(key);
                } else {
                    t.nets.push((p.trunc(), key));
                }
            }
        }
        t.nets.sort_by_key(|n| std::cmp::Reverse(n.0.prefix_len()));
        t
    }

    /// The peer that owns `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<NodePublic> {
        if let Some(k) = self.hosts.get(&ip) {
            return Some(*k);
        }
        self.nets
            .iter()
            .find(|(p, _)| p.contains(&ip))
            .map(|(_, k)| *k)
    }
}

/// The address at `v4` (IPv4 header) or `v6` (IPv6 header) bytes into an IP packet.
fn address_at(packet: &[u8], v4: usize, v6: usize) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let b: [u8; 4] = packet.get(v4..v4 + 4)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 if packet.len() >= 40 => {
            let b: [u8; 16] = packet.get(v6..v6 + 16)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// The destination address of an IP packet.
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    address_at(packet, 16, 24)
}

/// The source address of an IP packet.
pub fn source(packet: &[u8]) -> Option<IpAddr> {
    address_at(packet, 12, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn host_routes_and_longest_prefix() {
        let a = NodePublic::from_bytes([1; 32]);
        let b = NodePublic::from_bytes([2; 32]);
        let c = NodePublic::from_bytes([3; 32]);
        let a_ips = nets(&["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]);
        // A prefix written with host bits set still covers its whole network.
        let b_ips = nets(&["100.64.0.2/32", "10.0.0.0/8", "192.168.7.99/24"]);
        let c_ips = nets(&["100.64.0.3/32", "10.1.0.0/16"]);
        let t = RouteTable::build([(a, &a_ips[..]), (b, &b_ips[..]), (c, &c_ips[..])]);
        assert_eq!(t.lookup("100.64.0.1".parse().unwrap()), Some(a));
        assert_eq!(t.lookup("fd7a:115c:a1e0::1".parse().unwrap()), Some(a));
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(c));
        assert_eq!(t.lookup("10.2.2.3".parse().unwrap()), Some(b));
        assert_eq!(t.lookup("192.168.7.1".parse().unwrap()), Some(b));
        assert_eq!(t.lookup("100.64.0.9".parse().unwrap()), None);
        // An IPv4-mapped IPv6 address is not the IPv4 address.
        assert_eq!(t.lookup("::ffff:10.1.2.3".parse().unwrap()), None);
    }

    #[test]
    fn packet_addresses() {
        let mut p = vec![0x45u8; 20];
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        assert_eq!(source(&p), Some("100.64.0.1".parse().unwrap()));
        assert_eq!(destination(&p), Some("100.64.0.2".parse().unwrap()));
        assert_eq!(destination(&p[..10]), None);
        assert_eq!(destination(&[]), None);
        assert_eq!(destination(&[0x60; 12]), None);
    }
}
