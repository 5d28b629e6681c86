//! Router kinds: how a lab router translates and filters, as nftables rulesets.
//!
//! Every router has an interface `wan` (toward the internet or an upstream router) and a LAN
//! side (the bridge `lan`, plus anything else that is not `wan`). The kinds follow the usual
//! NAT taxonomy (RFC 4787), as Tailscale's and iroh's NAT labs do:
//!
//! | [`Nat`]          | mapping                                            | nftables              |
//! |------------------|----------------------------------------------------|-----------------------|
//! | `EasyEim`        | endpoint-independent, port-preserving ("easy NAT") | `masquerade persistent` |
//! | `Hard`           | endpoint-dependent, random port per destination    | `masquerade fully-random` |
//! | `None`           | no translation: the LAN is routed                  | —                     |
//!
//! | [`Filtering`]    | inbound to a mapping is let in from …              |
//! |------------------|-----------------------------------------------------|
//! | `Open`           | anyone (endpoint-independent, "full cone"): a dynamic map remembers each UDP mapping and DNATs inbound packets to it; without NAT, everything is forwarded |
//! | `PortRestricted` | only the exact ip:port the LAN host sent to (forward policy drop, accept established/related) |
//!
//! plus `block_udp` (all forwarded UDP dropped, TCP fine) and `upnp` (miniupnpd on the LAN
//! side, see [`crate::upnp`]). Hairpinning is not provided.

use crate::link::LinkParams;

/// How a router maps LAN source addresses to its WAN address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// No translation; upstream routes the LAN subnet to the router.
    None,
    /// Endpoint-independent mapping, port preserving (`masquerade persistent`).
    EasyEim,
    /// Endpoint-dependent mapping, random port per destination (`masquerade fully-random`).
    Hard,
}

/// Which inbound packets a router lets through to its LAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    /// Endpoint-independent: any sender reaches an existing UDP mapping (full cone); without
    /// NAT, all traffic is forwarded.
    Open,
    /// Address-and-port-dependent: only replies from where the LAN host sent to.
    PortRestricted,
}

/// What kind of router to build.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSpec {
    /// Address translation.
    pub nat: Nat,
    /// Inbound filtering.
    pub filtering: Filtering,
    /// Drop all forwarded UDP (TCP still works): a UDP-hostile network.
    pub block_udp: bool,
    /// Run miniupnpd (UPnP IGD, NAT-PMP, PCP) on the LAN side.
    pub upnp: bool,
    /// Emulated delay/loss on the WAN link (only toward the internet).
    pub uplink: Option<LinkParams>,
    /// Also route a global IPv6 /64 to the LAN (no translation, as IPv6 is deployed),
    /// filtered like IPv4: `filtering` and `block_udp` apply to it too.
    pub ipv6: bool,
}

impl RouterSpec {
    /// A typical home router: easy NAT, port-restricted filtering.
    pub fn easy() -> Self {
        RouterSpec {
            nat: Nat::EasyEim,
            filtering: Filtering::PortRestricted,
            block_udp: false,
            upnp: false,
            uplink: None,
            ipv6: false,
        }
    }

    /// Easy NAT with open (full-cone) filtering.
    pub fn full_cone() -> Self {
        RouterSpec::easy().filtering(Filtering::Open)
    }

    /// Symmetric ("hard") NAT with port-restricted filtering.
    pub fn hard() -> Self {
        RouterSpec::easy().nat(Nat::Hard)
    }

    /// A plain router without NAT or filtering (the LAN is routed).
    pub fn no_nat() -> Self {
        RouterSpec::easy().nat(Nat::None).filtering(Filtering::Open)
    }

    /// A stateful firewall without NAT: routed LAN, port-restricted filtering.
    pub fn firewall() -> Self {
        RouterSpec::easy().nat(Nat::None)
    }

    /// Easy NAT that drops all forwarded UDP.
    pub fn udp_blocked() -> Self {
        RouterSpec::easy().block_udp(true)
    }

    /// Easy NAT with miniupnpd answering UPnP IGD, NAT-PMP and PCP on the LAN.
    pub fn upnp() -> Self {
        RouterSpec::easy().with_upnp(true)
    }

    /// Sets the NAT kind.
    pub fn nat(mut self, nat: Nat) -> Self {
        self.nat = nat;
        self
    }

    /// Sets the filtering.
    pub fn filtering(mut self, filtering: Filtering) -> Self {
        self.filtering = filtering;
        self
    }

    /// Sets whether forwarded UDP is dropped.
    pub fn block_udp(mut self, block: bool) -> Self {
        self.block_udp = block;
        self
    }

    /// Sets whether miniupnpd runs.
    pub fn with_upnp(mut self, upnp: bool) -> Self {
        self.upnp = upnp;
        self
    }

    /// Sets whether the LAN also gets routed IPv6 (see [`RouterSpec::ipv6`]).
    pub fn with_ipv6(mut self, ipv6: bool) -> Self {
        self.ipv6 = ipv6;
        self
    }

    /// Puts an emulated link (delay, loss) between the router and the internet.
    pub fn uplink(mut self, params: LinkParams) -> Self {
        self.uplink = Some(params);
        self
    }
}

/// Seconds an idle full-cone mapping is remembered (the conntrack UDP stream timeout).
const EIM_TIMEOUT_S: u32 = 120;

/// The nftables script giving a router its kind (table `ip lab`).
pub(crate) fn ruleset(spec: &RouterSpec) -> String {
    let nat = spec.nat != Nat::None;
    let full_cone = nat && spec.filtering == Filtering::Open;
    let mut s = String::from("table ip lab {\n");
    if full_cone {
        s.push_str(&format!(
            "  map eim {{ type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout {EIM_TIMEOUT_S}s; }}\n"
        ));
    }
    s.push_str(
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n",
    );
    if full_cone {
        s.push_str("    iifname \"wan\" meta l4proto udp dnat ip to udp dport map @eim\n");
    }
    s.push_str("  }\n");
    s.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    // Only forwarded traffic is translated: the router's own packets already carry its
    // WAN address (and miniupnpd, checking by STUN that it is not behind another NAT,
    // must see its own ports unchanged or it turns port forwarding off).
    match spec.nat {
        Nat::None => {}
        Nat::EasyEim => {
            s.push_str("    oifname \"wan\" fib saddr type != local masquerade persistent\n")
        }
        Nat::Hard => {
            s.push_str("    oifname \"wan\" fib saddr type != local masquerade fully-random\n")
        }
    }
    s.push_str("  }\n");
    if full_cone {
        // After NAT: remember public port -> LAN address.port for inbound DNAT.
        s.push_str(
            "  chain remember {\n    type filter hook postrouting priority 200; policy accept;\n    oifname \"wan\" meta l4proto udp ct direction original update @eim { ct reply proto-dst : ct original ip saddr . ct original proto-src }\n  }\n",
        );
    }
    let policy = match spec.filtering {
        Filtering::Open => "accept",
        Filtering::PortRestricted => "drop",
    };
    s.push_str(&format!(
        "  chain forward {{\n    type filter hook forward priority filter; policy {policy};\n"
    ));
    if spec.block_udp {
        s.push_str("    meta l4proto udp drop\n");
    }
    s.push_str("    ct state established,related accept\n");
    s.push_str("    ct status dnat accept\n");
    s.push_str("    iifname != \"wan\" accept\n");
    s.push_str("  }\n");
    if nat {
        // Like a real home router, unsolicited traffic to the router's own WAN address is
        // dropped. Besides realism this matters for hole punching: a packet accepted
        // here (and answered with port-unreachable) would leave a confirmed conntrack
        // entry that makes the LAN host's later outbound packet to the same peer collide
        // and be masqueraded to a different port.
        s.push_str(
            "  chain input {\n    type filter hook input priority filter; policy accept;\n    iifname \"wan\" ct state established,related accept\n    iifname \"wan\" drop\n  }\n",
        );
    }
    s.push_str("}\n");
    if spec.ipv6 {
        // IPv6 is routed, never translated: only the filter applies.
        s.push_str(&format!(
            "table ip6 lab6 {{\n  chain forward {{\n    type filter hook forward priority filter; policy {policy};\n"
        ));
        if spec.block_udp {
            s.push_str("    meta l4proto udp drop\n");
        }
        s.push_str("    ct state established,related accept\n");
        // Neighbour discovery and path-MTU messages are not forwarded state; let ICMPv6 by.
        s.push_str("    meta l4proto ipv6-icmp accept\n");
        s.push_str("    iifname != \"wan\" accept\n  }\n}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn easy_nat_is_persistent_masquerade_with_restricted_forwarding() {
        let r = ruleset(&RouterSpec::easy());
        assert!(r.contains("masquerade persistent"));
        assert!(r.contains("policy drop"));
        assert!(!r.contains("@eim"));
    }

    #[test]
    fn hard_nat_is_fully_random() {
        assert!(ruleset(&RouterSpec::hard()).contains("masquerade fully-random"));
    }

    #[test]
    fn full_cone_remembers_and_dnats_mappings() {
        let r = ruleset(&RouterSpec::full_cone());
        assert!(r.contains("update @eim"));
        assert!(r.contains("dnat ip to udp dport map @eim"));
        assert!(r.contains("policy accept"));
    }

    #[test]
    fn udp_blocked_drops_udp_before_anything_is_accepted() {
        let r = ruleset(&RouterSpec::udp_blocked());
        let drop = r.find("meta l4proto udp drop").unwrap();
        assert!(drop < r.find("ct state established").unwrap());
    }

    #[test]
    fn no_nat_router_has_no_masquerade() {
        assert!(!ruleset(&RouterSpec::no_nat()).contains("masquerade"));
        assert!(ruleset(&RouterSpec::firewall()).contains("policy drop"));
    }
}
