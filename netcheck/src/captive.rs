//! Captive-portal detection: a hotel or airport network that intercepts HTTP answers a
//! relay's `/generate_204` with its login page instead of an empty 204. We ask relay
//! nodes marked `CanPort80` over plain HTTP with a challenge header that a real relay
//! echoes (docs/protocols.md §1.9, §4.4).

use std::net::SocketAddr;
use std::time::Duration;

use proto::relaymap::{NodeAddr, RelayMap};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// Largest response head read.
const MAX_HEAD: usize = 8 << 10;

/// The endpoints to try: `CanPort80` nodes with a fixed IPv4 address, home region first.
pub fn endpoints(map: &RelayMap, home: i32) -> Vec<(String, SocketAddr)> {
    let mut regions: Vec<_> = map.regions.values().collect();
    regions.sort_by_key(|r| (r.region_id != home, r.region_id));
    regions
        .iter()
        .flat_map(|r| r.nodes.iter())
        .filter(|n| n.can_port_80)
        .filter_map(|n| match n.ipv4_addr() {
            NodeAddr::Fixed(ip) => Some((n.host_name.clone(), SocketAddr::new(ip.into(), 80))),
            _ => None,
        })
        .take(3)
        .collect()
}

/// Whether the answer to a challenge for `host` proves an unintercepted path.
pub fn answer_is_genuine(head: &[u8], host: &str) -> bool {
    let Some(resp) = netbase::http::ResponseHead::parse(head) else {
        return false;
    };
    let want = format!("response ts_{host}");
    resp.status == 204
        && resp
            .headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("x-tailscale-response") && v == want)
}

async fn check_one(host: &str, addr: SocketAddr) -> std::io::Result<bool> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "GET /generate_204 HTTP/1.1\r\nHost: {host}\r\nX-Tailscale-Challenge: ts_{host}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    // Whatever is not a complete head within the cap is not a relay's answer: captive.
    Ok(match netbase::http::read_head(&mut s, MAX_HEAD).await {
        Ok((head, _)) => !answer_is_genuine(&head, host),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => true,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => true,
        Err(e) => return Err(e),
    })
}

/// `Some(true)`: an endpoint answered with something other than a relay's 204 (a
/// captive portal); `Some(false)`: a genuine answer; `None`: no endpoint could be asked.
pub async fn detect(map: &RelayMap, home: i32, timeout: Duration) -> Option<bool> {
    for (host, addr) in endpoints(map, home) {
        match tokio::time::timeout(timeout, check_one(&host, addr)).await {
            Ok(Ok(captive)) => return Some(captive),
            Ok(Err(e)) => tracing::debug!(%addr, error = %e, "captive-portal check failed"),
            Err(_) => tracing::debug!(%addr, "captive-portal check timed out"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_204_with_the_echoed_challenge_is_genuine() {
        let ok = b"HTTP/1.1 204 No Content\r\nX-Tailscale-Response: response ts_derp1\r\n\r\n";
        assert!(answer_is_genuine(ok, "derp1"));
        assert!(!answer_is_genuine(ok, "derp2"));
        assert!(!answer_is_genuine(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlogin",
            "derp1"
        ));
        assert!(!answer_is_genuine(
            b"HTTP/1.1 204 No Content\r\n\r\n",
            "derp1"
        ));
        assert!(!answer_is_genuine(b"garbage", "derp1"));
    }
}
