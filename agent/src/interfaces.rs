//! This host's own addresses, advertised (with our port) as "local" endpoints so peers
//! on the same LAN can reach us directly. Loopback, link-local and our own tunnel
//! addresses are left out. IPv6 link-local addresses are left out too: they need a zone
//! (interface) that means nothing on the peer's side.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => usable_v4(ip),
        IpAddr::V6(ip) => usable_v6(ip),
    }
}

fn usable_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        // 100.64.0.0/10: tunnel addresses (ours and our peers').
        || (ip.octets()[0] == 100 && ip.octets()[1] & 0xC0 == 64))
}

fn usable_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // fe80::/10, link-local.
        || (s[0] & 0xFFC0) == 0xFE80
        // fd7a:115c:a1e0::/48: tunnel addresses.
        || s[..3] == [0xFD7A, 0x115C, 0xA1E0]
        // ::ffff:0:0/96, IPv4-mapped (the IPv4 address is listed on its own).
        || ip.to_ipv4_mapped().is_some())
}

/// The host's usable interface addresses: IPv4, and IPv6 when `with_v6` (on every
/// platform, through the getifaddrs crate).
pub fn local_addresses(with_v6: bool) -> Vec<IpAddr> {
    let Ok(interfaces) = getifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = interfaces
        .filter_map(|i| i.address.ip_addr())
        .filter(|ip| with_v6 || ip.is_ipv4())
        .filter(|ip| usable(*ip))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What a network change is judged by: the IPv4 addresses, and the /64 prefixes of the
/// IPv6 ones. IPv6 privacy addresses (RFC 8981) rotate within their /64 every day or so;
/// that is not a new network and must not restart netcheck and path discovery.
pub fn network_fingerprint(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = addrs
        .iter()
        .map(|ip| match ip {
            IpAddr::V4(_) => *ip,
            IpAddr::V6(v6) => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(Ipv6Addr::from(s))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_loopback_and_link_local_addresses_are_not_endpoints() {
        let usable = |s: &str| usable(s.parse().unwrap());
        assert!(!usable("127.0.0.1"));
        assert!(!usable("169.254.1.1"));
        assert!(!usable("100.64.0.7"));
        assert!(!usable("100.127.255.1"));
        assert!(usable("100.128.0.1"));
        assert!(usable("10.1.0.10"));
        assert!(usable("198.51.100.7"));
        assert!(!usable("::1"));
        assert!(!usable("fe80::1"));
        assert!(!usable("fd7a:115c:a1e0::5"));
        assert!(!usable("::ffff:10.1.0.10"));
        assert!(!usable("ff02::1"));
        assert!(usable("2001:db8:5::10"));
        assert!(usable("fd00:1::2"));
    }

    #[test]
    fn a_rotated_privacy_address_is_the_same_network() {
        let ips = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|s| s.parse().unwrap()).collect() };
        let before = ips(&[
            "10.0.0.5",
            "2001:db8:1:2::10",
            "2001:db8:1:2:a1b2:c3d4:e5f6:1",
        ]);
        let rotated = ips(&[
            "10.0.0.5",
            "2001:db8:1:2::10",
            "2001:db8:1:2:9999:8888:7777:2",
        ]);
        assert_eq!(network_fingerprint(&before), network_fingerprint(&rotated));
        let moved = ips(&["10.0.0.5", "2001:db8:1:3::10"]);
        assert_ne!(network_fingerprint(&before), network_fingerprint(&moved));
        let new_v4 = ips(&["10.0.0.6", "2001:db8:1:2::10"]);
        assert_ne!(network_fingerprint(&before), network_fingerprint(&new_v4));
    }
}
