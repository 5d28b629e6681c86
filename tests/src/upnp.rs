//! Port-mapping routers: miniupnpd on a lab router, and a NAT-PMP client to talk to it.
//!
//! miniupnpd (Debian `miniupnpd-nftables`) runs in the router namespace with its own config
//! file in the lab's folder, UPnP IGD, NAT-PMP and PCP enabled on the `lan` bridge. Its WAN
//! address is in a reserved range (TEST-NET), so it refuses to forward until a STUN check
//! proves it is not behind another NAT: the config points `ext_stun_host` at a STUN responder
//! inside the lab. It needs its nftables chains to exist (`inet upnp`, created here); the
//! router's own forward chain accepts `ct status dnat`, so its DNAT rules are let through.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

/// The NAT-PMP / PCP server port.
pub const NATPMP_PORT: u16 = 5351;

/// The nftables skeleton miniupnpd fills (`upnp_table_name=upnp`).
pub(crate) const TABLES: &str = "table inet upnp {
  chain forward { type filter hook forward priority filter; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
";

/// The line miniupnpd logs once it serves NAT-PMP/PCP (it is then also serving UPnP).
pub(crate) const READY_LINE: &str = "Listening for NAT-PMP/PCP traffic";

/// miniupnpd's configuration for a router whose LAN is `lan_net`/`lan_prefix`.
pub(crate) fn config(
    lan_net: Ipv4Addr,
    lan_prefix: u8,
    stun: SocketAddrV4,
    uuid_tail: u32,
) -> String {
    format!(
        "ext_ifname=wan
listening_ip=lan
port=0
enable_upnp=yes
enable_natpmp=yes
ext_perform_stun=yes
ext_stun_host={stun_ip}
ext_stun_port={stun_port}
secure_mode=yes
system_uptime=no
notify_interval=60
clean_ruleset_interval=600
upnp_table_name=upnp
upnp_nat_table_name=upnp
uuid=3d3cec3a-8cf0-11e0-98ee-{uuid_tail:012x}
allow 1024-65535 {lan_net}/{lan_prefix} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
",
        stun_ip = stun.ip(),
        stun_port = stun.port(),
    )
}

/// Transport protocol of a NAT-PMP mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapProtocol {
    /// UDP (opcode 1).
    Udp,
    /// TCP (opcode 2).
    Tcp,
}

/// A mapping granted by a NAT-PMP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatPmpMapping {
    /// The internal port the mapping forwards to.
    pub internal_port: u16,
    /// The external port on the router's WAN address.
    pub external_port: u16,
    /// Granted lifetime in seconds.
    pub lifetime: u32,
    /// The server's seconds-since-start-of-epoch.
    pub epoch: u32,
}

/// A NAT-PMP request for a mapping (RFC 6886 §3.3).
pub fn natpmp_map_request(
    protocol: MapProtocol,
    internal_port: u16,
    suggested_external_port: u16,
    lifetime: u32,
) -> [u8; 12] {
    let mut m = [0u8; 12];
    m[1] = match protocol {
        MapProtocol::Udp => 1,
        MapProtocol::Tcp => 2,
    };
    m[4..6].copy_from_slice(&internal_port.to_be_bytes());
    m[6..8].copy_from_slice(&suggested_external_port.to_be_bytes());
    m[8..12].copy_from_slice(&lifetime.to_be_bytes());
    m
}

/// Parses a mapping response; `Err` carries a non-zero NAT-PMP result code.
pub fn parse_natpmp_map_response(
    msg: &[u8],
    protocol: MapProtocol,
) -> Option<Result<NatPmpMapping, u16>> {
    let opcode = match protocol {
        MapProtocol::Udp => 129,
        MapProtocol::Tcp => 130,
    };
    if msg.len() < 16 || msg[0] != 0 || msg[1] != opcode {
        return None;
    }
    let result = u16::from_be_bytes([msg[2], msg[3]]);
    if result != 0 {
        return Some(Err(result));
    }
    Some(Ok(NatPmpMapping {
        epoch: u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]),
        internal_port: u16::from_be_bytes([msg[8], msg[9]]),
        external_port: u16::from_be_bytes([msg[10], msg[11]]),
        lifetime: u32::from_be_bytes([msg[12], msg[13], msg[14], msg[15]]),
    }))
}

/// Sends `request` to the gateway's NAT-PMP port until `parse` accepts an answer.
fn exchange<T>(
    socket: &UdpSocket,
    gateway: Ipv4Addr,
    request: &[u8],
    timeout: Duration,
    parse: impl Fn(&[u8]) -> Option<T>,
) -> io::Result<T> {
    let old = socket.read_timeout()?;
    let deadline = Instant::now() + timeout;
    let server = SocketAddr::from((gateway, NATPMP_PORT));
    let result = (|| {
        let mut buf = [0u8; 1100];
        // RFC 6886 retransmits at 250 ms, doubling.
        let mut wait = Duration::from_millis(250);
        while Instant::now() < deadline {
            socket.send_to(request, server)?;
            let try_end = (Instant::now() + wait).min(deadline);
            while let Some(left) = try_end.checked_duration_since(Instant::now()) {
                socket.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                match crate::recv_from(socket, &mut buf) {
                    Ok((n, from)) if from == server => {
                        if let Some(answer) = parse(&buf[..n]) {
                            return Ok(answer);
                        }
                    }
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(e),
                }
            }
            wait *= 2;
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no NAT-PMP answer from {server} within {timeout:?}"),
        ))
    })();
    socket.set_read_timeout(old)?;
    result
}

/// Asks the NAT-PMP server at `gateway` for the router's external address.
pub fn natpmp_external_address(
    socket: &UdpSocket,
    gateway: Ipv4Addr,
    timeout: Duration,
) -> io::Result<Ipv4Addr> {
    let answer = exchange(socket, gateway, &[0, 0], timeout, |m| {
        (m.len() >= 12 && m[0] == 0 && m[1] == 128).then(|| {
            (
                u16::from_be_bytes([m[2], m[3]]),
                Ipv4Addr::new(m[8], m[9], m[10], m[11]),
            )
        })
    })?;
    match answer {
        (0, ip) => Ok(ip),
        (code, _) => Err(io::Error::other(format!("NAT-PMP result code {code}"))),
    }
}

/// Asks the NAT-PMP server at `gateway` to map `internal_port` (on the host owning
/// `socket`) for `lifetime` seconds.
pub fn natpmp_map(
    socket: &UdpSocket,
    gateway: Ipv4Addr,
    protocol: MapProtocol,
    internal_port: u16,
    suggested_external_port: u16,
    lifetime: u32,
    timeout: Duration,
) -> io::Result<NatPmpMapping> {
    let request = natpmp_map_request(protocol, internal_port, suggested_external_port, lifetime);
    match exchange(socket, gateway, &request, timeout, |m| {
        parse_natpmp_map_response(m, protocol)
    })? {
        Ok(mapping) => Ok(mapping),
        Err(code) => Err(io::Error::other(format!(
            "NAT-PMP refused the mapping, result code {code}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_request_and_response_codec() {
        let req = natpmp_map_request(MapProtocol::Udp, 4242, 4243, 3600);
        assert_eq!(req, [0, 1, 0, 0, 0x10, 0x92, 0x10, 0x93, 0, 0, 0x0e, 0x10]);
        let resp = [
            0, 129, 0, 0, 0, 0, 0, 9, 0x10, 0x92, 0x10, 0x93, 0, 0, 0x0e, 0x10,
        ];
        let m = parse_natpmp_map_response(&resp, MapProtocol::Udp)
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.internal_port, m.external_port, m.lifetime, m.epoch),
            (4242, 4243, 3600, 9)
        );
        let refused = [0, 129, 0, 2, 0, 0, 0, 9, 0x10, 0x92, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_natpmp_map_response(&refused, MapProtocol::Udp),
            Some(Err(2))
        );
        assert_eq!(parse_natpmp_map_response(&resp, MapProtocol::Tcp), None);
    }

    #[test]
    fn config_points_stun_into_the_lab_and_allows_only_the_lan() {
        let c = config(
            Ipv4Addr::new(10, 3, 0, 0),
            24,
            "192.0.2.1:3478".parse().unwrap(),
            3,
        );
        assert!(c.contains("ext_stun_host=192.0.2.1\n"));
        assert!(c.contains("ext_perform_stun=yes"));
        assert!(c.contains("allow 1024-65535 10.3.0.0/24 1024-65535"));
        assert!(c.contains("enable_natpmp=yes"));
    }
}
