//! This host's own addresses, advertised (with our port) as "local" endpoints so peers
//! on the same LAN can reach us directly. Loopback, link-local and our own tunnel
//! addresses are left out; only IPv4 for now (the shared socket is IPv4).

use std::net::{IpAddr, Ipv4Addr};

fn usable(ip: Ipv4Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        // 100.64.0.0/10: tunnel addresses (ours and our peers').
        || (ip.octets()[0] == 100 && ip.octets()[1] & 0xC0 == 64))
}

/// The host's usable IPv4 interface addresses.
#[cfg(unix)]
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|v4| v4.ip())))
        .filter(|ip| usable(*ip))
        .map(IpAddr::V4)
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(not(unix))]
pub fn local_addresses() -> Vec<IpAddr> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_loopback_and_link_local_addresses_are_not_endpoints() {
        assert!(!usable("127.0.0.1".parse().unwrap()));
        assert!(!usable("169.254.1.1".parse().unwrap()));
        assert!(!usable("100.64.0.7".parse().unwrap()));
        assert!(!usable("100.127.255.1".parse().unwrap()));
        assert!(usable("100.128.0.1".parse().unwrap()));
        assert!(usable("10.1.0.10".parse().unwrap()));
        assert!(usable("198.51.100.7".parse().unwrap()));
    }
}
