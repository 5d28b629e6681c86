//! Which peer owns a destination address: the routing table built from each peer's
//! `AllowedIPs` (its own addresses, and any subnets it routes). Longest prefix wins. Pure.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proto::NodePublic;

/// An IP prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::str::FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("bad address in {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l
                .parse::<u8>()
                .map_err(|_| format!("bad prefix length in {s:?}"))?,
            None => max,
        };
        if len > max {
            return Err(format!("prefix length too long in {s:?}"));
        }
        Ok(Prefix { addr, len })
    }
}

impl Prefix {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.len)
                };
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.len)
                };
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Destination address → peer.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    /// Host routes (/32, /128): the common case, one lookup.
    hosts: BTreeMap<IpAddr, NodePublic>,
    /// Wider prefixes, longest first.
    nets: Vec<(Prefix, NodePublic)>,
}

impl RouteTable {
    /// Builds the table from (peer, its allowed IPs). Unparsable entries are skipped.
    pub fn build<'a>(peers: impl IntoIterator<Item = (NodePublic, &'a [String])>) -> Self {
        let mut t = RouteTable::default();
        for (key, ips) in peers {
            for s in ips {
                let Ok(p) = s.parse::<Prefix>() else {
                    tracing::debug!(prefix = %s, "ignoring unparsable allowed IP");
                    continue;
                };
                let host = if p.addr.is_ipv4() { 32 } else { 128 };
                if p.len == host {
                    t.hosts.entry(p.addr).or_insert(key);
                } else {
                    t.nets.push((p, key));
                }
            }
        }
        t.nets.sort_by_key(|n| std::cmp::Reverse(n.0.len));
        t
    }

    /// The peer that owns `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<NodePublic> {
        if let Some(k) = self.hosts.get(&ip) {
            return Some(*k);
        }
        self.nets
            .iter()
            .find(|(p, _)| p.contains(ip))
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

    #[test]
    fn host_routes_and_longest_prefix() {
        let a = NodePublic::from_bytes([1; 32]);
        let b = NodePublic::from_bytes([2; 32]);
        let a_ips = ["100.64.0.1/32".to_string(), "fd7a:115c:a1e0::1/128".into()];
        let b_ips = [
            "100.64.0.2/32".to_string(),
            "10.0.0.0/8".into(),
            "10.1.0.0/16".into(),
            "junk".into(),
        ];
        let t = RouteTable::build([(a, &a_ips[..]), (b, &b_ips[..])]);
        assert_eq!(t.lookup("100.64.0.1".parse().unwrap()), Some(a));
        assert_eq!(t.lookup("fd7a:115c:a1e0::1".parse().unwrap()), Some(a));
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(b));
        assert_eq!(t.lookup("100.64.0.9".parse().unwrap()), None);
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
