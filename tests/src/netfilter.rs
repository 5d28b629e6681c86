//! Traffic controls a test applies at runtime in any lab namespace: blackholes ("the direct
//! path dies") and packet counters ("did the traffic go direct?").
//!
//! They live in their own table, `inet labctl`, hooked at prerouting and output with raw
//! priority — before conntrack and NAT, so the addresses matched are the ones on the wire
//! where the namespace sees them (a router sees its LAN hosts' private addresses coming in
//! and its own public address going out). Blackholed packets are dropped before any counter,
//! so counters count what actually passed. Both work for IPv4 and IPv6 (the table is
//! `inet`; a blackhole takes a pair of addresses of one family).

use std::net::IpAddr;

use crate::error::{LabError, Result};
use crate::netns;

/// The table's skeleton; `add` is idempotent for tables, sets and chains.
fn skeleton() -> &'static str {
    "add table inet labctl
add set inet labctl blocked_udp { type ipv4_addr . ipv4_addr; }
add set inet labctl blocked_all { type ipv4_addr . ipv4_addr; }
add set inet labctl blocked6_udp { type ipv6_addr . ipv6_addr; }
add set inet labctl blocked6_all { type ipv6_addr . ipv6_addr; }
add chain inet labctl pre { type filter hook prerouting priority raw; policy accept; }
add chain inet labctl out { type filter hook output priority raw; policy accept; }
"
}

/// Creates the `labctl` table in `ns` with its blackhole rules (call once per namespace).
pub(crate) fn install(ns: &str) -> Result<()> {
    let mut script = skeleton().to_string();
    for chain in ["pre", "out"] {
        script.push_str(&format!(
            "add rule inet labctl {chain} ip saddr . ip daddr @blocked_all drop\n\
             add rule inet labctl {chain} meta l4proto udp ip saddr . ip daddr @blocked_udp drop\n\
             add rule inet labctl {chain} ip6 saddr . ip6 daddr @blocked6_all drop\n\
             add rule inet labctl {chain} meta l4proto udp ip6 saddr . ip6 daddr @blocked6_udp drop\n"
        ));
    }
    netns::nft(ns, &script)
}

/// What a blackhole drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// UDP only (the direct path of a mesh VPN dies, TCP to the relay lives).
    Udp,
    /// All traffic.
    All,
}

impl Blocked {
    /// The set holding pairs of `a`'s and `b`'s family; both must be of one family.
    fn set(self, a: IpAddr, b: IpAddr) -> Result<&'static str> {
        Ok(match (self, a.is_ipv4(), b.is_ipv4()) {
            (Blocked::Udp, true, true) => "blocked_udp",
            (Blocked::All, true, true) => "blocked_all",
            (Blocked::Udp, false, false) => "blocked6_udp",
            (Blocked::All, false, false) => "blocked6_all",
            _ => {
                return Err(LabError::Invalid(format!(
                    "cannot block between {a} and {b}: one address family, please"
                )))
            }
        })
    }
}

/// Starts dropping `what` between `a` and `b` (both directions) in `ns`.
pub(crate) fn block(ns: &str, what: Blocked, a: IpAddr, b: IpAddr) -> Result<()> {
    netns::nft(
        ns,
        &format!(
            "add element inet labctl {} {{ {a} . {b}, {b} . {a} }}\n",
            what.set(a, b)?
        ),
    )
}

/// Stops dropping `what` between `a` and `b` in `ns`; fails if it was not blocked.
pub(crate) fn unblock(ns: &str, what: Blocked, a: IpAddr, b: IpAddr) -> Result<()> {
    netns::nft(
        ns,
        &format!(
            "delete element inet labctl {} {{ {a} . {b}, {b} . {a} }}\n",
            what.set(a, b)?
        ),
    )
}

/// Counts packets matching a filter in one namespace (see [`crate::Lab::count_udp`]).
#[derive(Debug, Clone)]
pub struct PacketCounter {
    ns: String,
    name: String,
}

impl PacketCounter {
    /// Adds a counter `name` in `ns` counting packets that match `filter` (nft syntax).
    pub(crate) fn install(ns: &str, name: &str, filter: &str) -> Result<Self> {
        let mut script = format!("add counter inet labctl {name}\n");
        for chain in ["pre", "out"] {
            script.push_str(&format!(
                "add rule inet labctl {chain} {filter} counter name \"{name}\"\n"
            ));
        }
        netns::nft(ns, &script)?;
        Ok(PacketCounter {
            ns: ns.to_string(),
            name: name.to_string(),
        })
    }

    fn read(&self, reset: bool) -> Result<(u64, u64)> {
        let verb = if reset { "reset" } else { "list" };
        let out = netns::run(
            netns::exec_command(&self.ns, "nft")
                .args([verb, "counter", "inet", "labctl", &self.name]),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_counter(&text).ok_or_else(|| {
            LabError::Invalid(format!(
                "cannot read counter {} in {}: {text}",
                self.name, self.ns
            ))
        })
    }

    /// Packets counted so far.
    pub fn packets(&self) -> Result<u64> {
        Ok(self.read(false)?.0)
    }

    /// Bytes counted so far.
    pub fn bytes(&self) -> Result<u64> {
        Ok(self.read(false)?.1)
    }

    /// Returns the packets counted so far and starts again from zero.
    pub fn take(&self) -> Result<u64> {
        Ok(self.read(true)?.0)
    }
}

/// Reads `packets N bytes M` from `nft list counter` output.
fn parse_counter(text: &str) -> Option<(u64, u64)> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "packets")?;
    let packets = words.get(at + 1)?.parse().ok()?;
    let bytes = match words.get(at + 2) {
        Some(&"bytes") => words.get(at + 3)?.parse().ok()?,
        _ => 0,
    };
    Some((packets, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_output_parses() {
        let text = "table inet labctl {\n\tcounter c1 {\n\t\tpackets 12 bytes 3456\n\t}\n}\n";
        assert_eq!(parse_counter(text), Some((12, 3456)));
        assert_eq!(parse_counter("nothing"), None);
    }
}
