//! The packet filter: which packets arriving through the tunnel may reach the host, from
//! the control server's `PacketFilter` rules (docs/protocols.md; upstream facts from
//! tailscale/tailscale `tailcfg/tailcfg.go` `FilterRule` and `wgengine/filter`).
//!
//! Semantics, as tailscaled's:
//! - a rule is `SrcIPs` × `DstPorts` × `IPProto`; an empty `IPProto` means TCP, UDP,
//!   ICMPv4 and ICMPv6; an address set is `*`, an address, a CIDR (no host bits) or a
//!   range `a-b`;
//! - the destination must be one of this device's own addresses or routes;
//! - TCP: a packet without SYN belongs to a connection and passes (a new connection
//!   cannot start without one); a SYN needs a rule;
//! - UDP (and SCTP): a reply to a flow this device opened passes (a bounded table of
//!   flows, idle ones forgotten, the oldest evicted first); otherwise a rule;
//! - ICMP: echo replies and errors pass; anything else passes when a rule lets the source
//!   reach the destination on any port;
//! - other protocols: only a rule for that protocol open on all ports;
//! - an IPv4 fragment after the first passes (its first fragment was judged), unless it
//!   starts within the first 80 bytes, where it could overlap a transport header.
//!
//! A rule that does not parse is skipped and counted — never widened. Before any filter
//! has arrived everything inbound is denied; `PacketFilter: null` keeps the filter in
//! force and `[]` denies everything. Pure: packets and time in, verdicts out.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use proto::tailcfg::FilterRule;

use super::routes;

netbase::reasons! {
    /// Why an inbound packet was denied.
    pub enum Deny {
        /// No filter has arrived from the control server yet.
        NoFilterYet => "no_filter_yet",
        /// Not an IP packet the filter can read.
        Malformed => "malformed",
        /// Addressed to something that is not this device's.
        NotLocal => "not_local",
        /// No rule lets it in.
        NoRule => "no_rule",
        /// Its sender's key has expired (the node decides this one, not the rules).
        PeerExpired => "peer_expired",
    }
}

/// Protocol numbers.
const ICMP4: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP6: u8 = 58;
const SCTP: u8 = 132;

/// Flows remembered at most for replies.
pub const MAX_FLOWS: usize = 4096;
/// A flow with no packet out for this long is forgotten.
pub const FLOW_IDLE: Duration = Duration::from_secs(120);

/// A compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// Protocol numbers, as a 256-bit set.
    protos: [u64; 4],
    srcs: Vec<IpNet>,
    dsts: Vec<(IpNet, u16, u16)>,
}

/// Capabilities a rule grants its sources on some destinations (`CapGrant`), kept for the
/// features that read them (peer relays).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    srcs: Vec<IpNet>,
    dsts: Vec<IpNet>,
    caps: BTreeMap<String, Vec<serde_json::Value>>,
}

impl Rule {
    fn has_proto(&self, p: u8) -> bool {
        self.protos[usize::from(p >> 6)] & (1 << (p & 63)) != 0
    }

    fn src_ok(&self, ip: IpAddr) -> bool {
        self.srcs.iter().any(|n| n.contains(&ip))
    }
}

/// The address set `s`: `*`, an address, a CIDR without host bits, or a range `a-b`.
fn parse_set(s: &str) -> Option<Vec<IpNet>> {
    if s == "*" {
        return Some(vec!["0.0.0.0/0".parse().ok()?, "::/0".parse().ok()?]);
    }
    if s.contains('/') {
        let n: IpNet = s.parse().ok()?;
        return (n.trunc() == n).then(|| vec![n]);
    }
    if let Some((a, b)) = s.split_once('-') {
        let (a, b): (IpAddr, IpAddr) = (a.parse().ok()?, b.parse().ok()?);
        return match (a, b) {
            (IpAddr::V4(a), IpAddr::V4(b)) if a <= b => {
                Some(ipnet::Ipv4Subnets::new(a, b, 0).map(IpNet::V4).collect())
            }
            (IpAddr::V6(a), IpAddr::V6(b)) if a <= b => {
                Some(ipnet::Ipv6Subnets::new(a, b, 0).map(IpNet::V6).collect())
            }
            _ => None,
        };
    }
    s.parse::<IpAddr>().ok().map(|a| vec![IpNet::from(a)])
}

/// Compiles one wire rule into its packet rule (when it has `DstPorts`) and its grants;
/// None when any part of it does not parse, unknown fields included (the whole rule is
/// skipped: dropping only the bad part could widen or narrow it in ways nobody wrote).
fn compile(v: &serde_json::Value) -> Option<(Option<Rule>, Vec<Grant>)> {
    let w: FilterRule = serde_json::from_value(v.clone()).ok()?;
    if w.src_bits.is_some() || w.dst_ports.iter().any(|d| d.bits.is_some()) {
        return None; // a form from before CIDRs; no current server sends it
    }
    let mut protos = [0u64; 4];
    let list: Vec<i64> = if w.ip_proto.is_empty() {
        vec![TCP.into(), UDP.into(), ICMP4.into(), ICMP6.into()]
    } else {
        w.ip_proto
    };
    for p in list {
        let p = u8::try_from(p).ok()?;
        protos[usize::from(p >> 6)] |= 1 << (p & 63);
    }
    let mut srcs = Vec::new();
    for s in &w.src_ips {
        srcs.extend(parse_set(s)?);
    }
    let mut dsts = Vec::new();
    for d in &w.dst_ports {
        if d.ports.first > d.ports.last {
            return None;
        }
        for n in parse_set(&d.ip)? {
            dsts.push((n, d.ports.first, d.ports.last));
        }
    }
    let mut grants = Vec::new();
    for g in w.cap_grant {
        let mut gd = Vec::new();
        for d in &g.dsts {
            gd.extend(parse_set(d)?);
        }
        let mut caps = g.cap_map;
        for c in g.caps {
            caps.entry(c).or_default();
        }
        grants.push(Grant {
            srcs: srcs.clone(),
            dsts: gd,
            caps,
        });
    }
    let rule = (!dsts.is_empty()).then_some(Rule { protos, srcs, dsts });
    Some((rule, grants))
}

/// The parts of a packet the filter reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packet {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// Source and destination port (TCP, UDP, SCTP), 0 otherwise.
    sport: u16,
    dport: u16,
    tcp_syn: bool,
    /// An ICMP echo reply or error.
    icmp_reply: bool,
    /// An IPv4 fragment after the first: no transport header to judge.
    later_fragment: bool,
}

fn parse(p: &[u8]) -> Option<Packet> {
    let (src, dst) = (routes::source(p)?, routes::destination(p)?);
    let (proto, l4) = match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let frag_offset = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]) & 0x1fff;
            if frag_offset != 0 {
                // A later fragment has no transport header. One that starts where the
                // first fragment's header could still be (under 80 bytes: a maximal IP
                // header and a basic TCP header) is refused, so a header cannot be
                // split to slip ports past the filter; the rest pass, as the first
                // fragment was judged (tailscale/tailscale net/packet/packet.go).
                if frag_offset < 10 {
                    return None;
                }
                return Some(Packet {
                    src,
                    dst,
                    proto: *p.get(9)?,
                    sport: 0,
                    dport: 0,
                    tcp_syn: false,
                    icmp_reply: false,
                    later_fragment: true,
                });
            }
            (*p.get(9)?, p.get(ihl..)?)
        }
        6 => (*p.get(6)?, p.get(40..)?),
        _ => return None,
    };
    let port = |at: usize| l4.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let mut pkt = Packet {
        src,
        dst,
        proto,
        sport: 0,
        dport: 0,
        tcp_syn: false,
        icmp_reply: false,
        later_fragment: false,
    };
    match proto {
        TCP | UDP | SCTP => {
            pkt.sport = port(0)?;
            pkt.dport = port(2)?;
            if proto == TCP {
                let flags = *l4.get(13)?;
                // SYN without ACK opens a connection.
                pkt.tcp_syn = flags & 0x02 != 0 && flags & 0x10 == 0;
            }
        }
        ICMP4 => {
            let t = *l4.first()?;
            // Echo reply (0), destination unreachable (3), time exceeded (11), parameter
            // problem (12).
            pkt.icmp_reply = matches!(t, 0 | 3 | 11 | 12);
        }
        ICMP6 => {
            let t = *l4.first()?;
            // Errors are types 1–4; echo reply is 129.
            pkt.icmp_reply = matches!(t, 1..=4 | 129);
        }
        _ => {}
    }
    Some(pkt)
}

/// A UDP or SCTP flow as seen from outside: (proto, remote, remote port, local, local
/// port).
type Flow = (u8, IpAddr, u16, IpAddr, u16);

/// The filter in force, with its flow table.
#[derive(Debug, Default)]
pub struct PacketFilter {
    /// None until a filter arrives.
    rules: Option<Vec<Rule>>,
    grants: Vec<Grant>,
    /// The wire form of the filter in force (a map response that repeats it costs no
    /// recompilation).
    wire: Option<serde_json::Value>,
    /// Rules of the last filter that were skipped.
    skipped: usize,
    /// This device's addresses and the routes it serves.
    local: Vec<IpNet>,
    flows: BTreeMap<Flow, (Instant, u64)>,
    by_age: BTreeMap<u64, Flow>,
    next_seq: u64,
    /// Flows forgotten because the table was full.
    pub evicted: u64,
}

impl PacketFilter {
    /// Applies the `PacketFilter` of a map response: `None` (absent or null) keeps the
    /// filter in force; a list replaces it. Returns how many rules were skipped when the
    /// filter changed, None when it did not.
    pub fn set_rules(&mut self, wire: Option<&serde_json::Value>) -> Option<usize> {
        let v = wire.filter(|v| !v.is_null())?;
        if self.wire.as_ref() == Some(v) {
            return None;
        }
        let list = v.as_array().map(Vec::as_slice).unwrap_or_default();
        let mut rules = Vec::with_capacity(list.len());
        let mut grants = Vec::new();
        let mut skipped = usize::from(!v.is_array());
        for r in list {
            match compile(r) {
                Some((rule, g)) => {
                    rules.extend(rule);
                    grants.extend(g);
                }
                None => skipped += 1,
            }
        }
        self.rules = Some(rules);
        self.grants = grants;
        self.skipped = skipped;
        self.wire = Some(v.clone());
        Some(skipped)
    }

    /// The capabilities granted to `src` on `dst` (`CapGrant`), by name with their values.
    pub fn caps(&self, src: IpAddr, dst: IpAddr) -> BTreeMap<&str, Vec<&serde_json::Value>> {
        let mut out: BTreeMap<&str, Vec<&serde_json::Value>> = BTreeMap::new();
        for g in self.grants.iter().filter(|g| {
            g.srcs.iter().any(|n| n.contains(&src)) && g.dsts.iter().any(|n| n.contains(&dst))
        }) {
            for (name, values) in &g.caps {
                out.entry(name.as_str()).or_default().extend(values);
            }
        }
        out
    }

    /// The filter in force in words, one line per rule and grant (`agentctl debug
    /// filter`); empty when no filter has arrived.
    pub fn describe(&self) -> Vec<String> {
        let Some(rules) = &self.rules else {
            return Vec::new();
        };
        let nets = |v: &[IpNet]| -> String {
            if v.len() == 2 && v.iter().all(|n| n.prefix_len() == 0) {
                return "*".into();
            }
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut out: Vec<String> = rules
            .iter()
            .map(|r| {
                let dsts = r
                    .dsts
                    .iter()
                    .map(|&(n, f, l)| match (f, l) {
                        (0, u16::MAX) => format!("{n}:*"),
                        (f, l) if f == l => format!("{n}:{f}"),
                        (f, l) => format!("{n}:{f}-{l}"),
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                let protos = (0..=255u8)
                    .filter(|p| r.has_proto(*p))
                    .map(proto_name)
                    .collect::<Vec<_>>()
                    .join(",");
                format!("accept {protos} from {} to {dsts}", nets(&r.srcs))
            })
            .collect();
        out.extend(self.grants.iter().map(|g| {
            let caps = g.caps.keys().map(String::as_str).collect::<Vec<_>>();
            format!(
                "grant {} from {} on {}",
                caps.join(","),
                nets(&g.srcs),
                nets(&g.dsts)
            )
        }));
        out
    }

    /// The rules in force (None: no filter yet) and how many were skipped.
    pub fn rule_count(&self) -> (Option<usize>, usize) {
        (self.rules.as_ref().map(Vec::len), self.skipped)
    }

    /// This device's addresses and served routes (what inbound packets may be for).
    pub fn set_local(&mut self, local: Vec<IpNet>) {
        self.local = local;
    }

    pub fn local(&self) -> &[IpNet] {
        &self.local
    }

    /// A packet going out through the tunnel: a UDP or SCTP flow is remembered so its
    /// replies are let in.
    pub fn note_outbound(&mut self, packet: &[u8], now: Instant) {
        // Most packets out are TCP: look at the protocol byte before parsing anything.
        let proto = match packet.first().map(|b| b >> 4) {
            Some(4) => packet.get(9),
            Some(6) => packet.get(6),
            _ => None,
        };
        if !matches!(proto, Some(&(UDP | SCTP))) {
            return;
        }
        let Some(p) = parse(packet) else { return };
        let flow = (p.proto, p.dst, p.dport, p.src, p.sport);
        self.next_seq += 1;
        if let Some((_, seq)) = self.flows.insert(flow, (now, self.next_seq)) {
            self.by_age.remove(&seq);
        }
        self.by_age.insert(self.next_seq, flow);
        self.expire(now);
        while self.flows.len() > MAX_FLOWS {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.flows.remove(&oldest);
            self.evicted += 1;
        }
    }

    /// Forgets flows idle for [`FLOW_IDLE`].
    fn expire(&mut self, now: Instant) {
        while let Some((&seq, flow)) = self.by_age.first_key_value() {
            let idle = self
                .flows
                .get(flow)
                .is_none_or(|(t, _)| now.saturating_duration_since(*t) >= FLOW_IDLE);
            if !idle {
                break;
            }
            let flow = *flow;
            self.by_age.remove(&seq);
            self.flows.remove(&flow);
        }
    }

    /// How many flows are remembered.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Whether a packet that came through the tunnel may reach the host.
    pub fn check_inbound(&self, packet: &[u8], now: Instant) -> Result<(), Deny> {
        let Some(rules) = &self.rules else {
            return Err(Deny::NoFilterYet);
        };
        let p = parse(packet).ok_or(Deny::Malformed)?;
        if !self.local.iter().any(|n| n.contains(&p.dst)) {
            return Err(Deny::NotLocal);
        }
        let allowed = match p.proto {
            _ if p.later_fragment => true,
            TCP => !p.tcp_syn || matches(rules, &p, |f, l| (f..=l).contains(&p.dport)),
            UDP | SCTP => {
                let flow = (p.proto, p.src, p.sport, p.dst, p.dport);
                let reply = self
                    .flows
                    .get(&flow)
                    .is_some_and(|(t, _)| now.saturating_duration_since(*t) < FLOW_IDLE);
                reply || matches(rules, &p, |f, l| (f..=l).contains(&p.dport))
            }
            ICMP4 | ICMP6 => p.icmp_reply || matches(rules, &p, |_, _| true),
            _ => matches(rules, &p, |f, l| f == 0 && l == u16::MAX),
        };
        if allowed {
            Ok(())
        } else {
            Err(Deny::NoRule)
        }
    }
}

/// A protocol's name for people.
fn proto_name(p: u8) -> String {
    match p {
        TCP => "tcp".into(),
        UDP => "udp".into(),
        ICMP4 => "icmp".into(),
        ICMP6 => "icmpv6".into(),
        SCTP => "sctp".into(),
        p => format!("proto{p}"),
    }
}

/// Whether a rule for the packet's protocol lets its source reach its destination on a
/// port range that `ports(first, last)` accepts.
fn matches(rules: &[Rule], p: &Packet, ports: impl Fn(u16, u16) -> bool) -> bool {
    rules.iter().any(|r| {
        r.has_proto(p.proto)
            && r.src_ok(p.src)
            && r.dsts
                .iter()
                .any(|(n, first, last)| n.contains(&p.dst) && ports(*first, *last))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::net::Ipv6Addr;

    const ME: [u8; 4] = [100, 64, 0, 1];
    const ALICE: [u8; 4] = [100, 64, 0, 2];
    const CAROL: [u8; 4] = [100, 64, 0, 3];

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&u16::try_from(20 + l4.len()).unwrap().to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[13] = flags;
        v4(src, dst, TCP, &l4)
    }

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        v4(src, dst, UDP, &l4)
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    fn filter(rules: serde_json::Value) -> PacketFilter {
        let mut f = PacketFilter::default();
        f.set_local(vec![
            IpNet::from(IpAddr::from(ME)),
            "fd7a:115c:a1e0::1/128".parse().unwrap(),
            "10.9.0.0/16".parse().unwrap(),
        ]);
        f.set_rules(Some(&rules));
        f
    }

    #[test]
    fn tcp_needs_a_rule_for_a_syn_only() {
        let f = filter(json!([{
            "SrcIPs": ["100.64.0.2"],
            "DstPorts": [{"IP": "*", "Ports": {"First": 22, "Last": 22}}]
        }]));
        let now = Instant::now();
        assert_eq!(f.check_inbound(&tcp(ALICE, ME, 22, SYN), now), Ok(()));
        assert_eq!(
            f.check_inbound(&tcp(ALICE, ME, 80, SYN), now),
            Err(Deny::NoRule)
        );
        assert_eq!(
            f.check_inbound(&tcp(CAROL, ME, 22, SYN), now),
            Err(Deny::NoRule)
        );
        // Not a new connection: part of one this device opened (or a stray one the host
        // will reset).
        assert_eq!(f.check_inbound(&tcp(CAROL, ME, 80, SYN | ACK), now), Ok(()));
        assert_eq!(f.check_inbound(&tcp(CAROL, ME, 80, ACK), now), Ok(()));
    }

    #[test]
    fn cidrs_ranges_port_ranges_and_protocols() {
        let f = filter(json!([
            {"SrcIPs": ["100.64.0.0/30"], "DstPorts": [{"IP": "100.64.0.1", "Ports": {"First": 8000, "Last": 8080}}], "IPProto": [17]},
            {"SrcIPs": ["100.64.0.3-100.64.0.9"], "DstPorts": [{"IP": "10.9.0.0/16", "Ports": {"First": 0, "Last": 65535}}]}
        ]));
        let now = Instant::now();
        assert_eq!(f.check_inbound(&udp(ALICE, 1, ME, 8000), now), Ok(()));
        assert_eq!(f.check_inbound(&udp(ALICE, 1, ME, 8080), now), Ok(()));
        assert_eq!(
            f.check_inbound(&udp(ALICE, 1, ME, 8081), now),
            Err(Deny::NoRule)
        );
        // The first rule is UDP only.
        assert_eq!(
            f.check_inbound(&tcp(ALICE, ME, 8000, SYN), now),
            Err(Deny::NoRule)
        );
        // The range and a served route; the default protocols include TCP.
        assert_eq!(
            f.check_inbound(&tcp(CAROL, [10, 9, 1, 1], 443, SYN), now),
            Ok(())
        );
        assert_eq!(
            f.check_inbound(&tcp([100, 64, 0, 10], [10, 9, 1, 1], 443, SYN), now),
            Err(Deny::NoRule)
        );
        // Not this device's: refused whatever the rules say.
        assert_eq!(
            f.check_inbound(&tcp(CAROL, [10, 8, 1, 1], 443, SYN), now),
            Err(Deny::NotLocal)
        );
        // GRE (47) is not a default protocol.
        assert_eq!(
            f.check_inbound(&v4(CAROL, [10, 9, 1, 1], 47, &[0; 8]), now),
            Err(Deny::NoRule)
        );
    }

    #[test]
    fn other_protocols_need_a_rule_open_on_all_ports() {
        let f = filter(json!([
            {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}], "IPProto": [47]},
            {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 1, "Last": 2}}], "IPProto": [50]}
        ]));
        let now = Instant::now();
        assert_eq!(f.check_inbound(&v4(CAROL, ME, 47, &[0; 8]), now), Ok(()));
        assert_eq!(
            f.check_inbound(&v4(CAROL, ME, 50, &[0; 8]), now),
            Err(Deny::NoRule)
        );
    }

    #[test]
    fn icmp_replies_pass_and_requests_need_any_port_open() {
        let now = Instant::now();
        let echo = [8u8, 0, 0, 0, 0, 0, 0, 0];
        let reply = [0u8, 0, 0, 0, 0, 0, 0, 0];
        let f = filter(json!([]));
        assert_eq!(f.check_inbound(&v4(ALICE, ME, ICMP4, &reply), now), Ok(()));
        assert_eq!(
            f.check_inbound(&v4(ALICE, ME, ICMP4, &echo), now),
            Err(Deny::NoRule)
        );
        let f = filter(
            json!([{"SrcIPs": ["100.64.0.2"], "DstPorts": [{"IP": "100.64.0.1", "Ports": {"First": 22, "Last": 22}}]}]),
        );
        assert_eq!(f.check_inbound(&v4(ALICE, ME, ICMP4, &echo), now), Ok(()));
        assert_eq!(
            f.check_inbound(&v4(CAROL, ME, ICMP4, &echo), now),
            Err(Deny::NoRule)
        );
    }

    #[test]
    fn ipv6() {
        let f = filter(
            json!([{"SrcIPs": ["fd7a:115c:a1e0::/48"], "DstPorts": [{"IP": "*", "Ports": {"First": 53, "Last": 53}}]}]),
        );
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&8u16.to_be_bytes());
        p[6] = UDP;
        p[8..24].copy_from_slice(&"fd7a:115c:a1e0::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd7a:115c:a1e0::1".parse::<Ipv6Addr>().unwrap().octets());
        let mut l4 = vec![0u8; 8];
        l4[2..4].copy_from_slice(&53u16.to_be_bytes());
        p.extend_from_slice(&l4);
        let now = Instant::now();
        assert_eq!(f.check_inbound(&p, now), Ok(()));
        p[43] = 54;
        assert_eq!(f.check_inbound(&p, now), Err(Deny::NoRule));
    }

    #[test]
    fn udp_replies_to_our_flows_pass_until_idle() {
        let mut f = filter(json!([]));
        let t0 = Instant::now();
        let reply = udp(ALICE, 53, ME, 5555);
        assert_eq!(f.check_inbound(&reply, t0), Err(Deny::NoRule));
        f.note_outbound(&udp(ME, 5555, ALICE, 53), t0);
        assert_eq!(f.check_inbound(&reply, t0), Ok(()));
        // Another port of the same peer is not the flow.
        assert_eq!(
            f.check_inbound(&udp(ALICE, 54, ME, 5555), t0),
            Err(Deny::NoRule)
        );
        assert_eq!(f.check_inbound(&reply, t0 + FLOW_IDLE), Err(Deny::NoRule));
    }

    #[test]
    fn the_flow_table_is_bounded_oldest_first() {
        let mut f = filter(json!([]));
        let t0 = Instant::now();
        for i in 0..(MAX_FLOWS + 10) {
            let port = u16::try_from(1000 + i).unwrap();
            f.note_outbound(&udp(ME, port, ALICE, 53), t0);
        }
        assert_eq!(f.flow_count(), MAX_FLOWS);
        assert_eq!(f.evicted, 10);
        assert_eq!(
            f.check_inbound(&udp(ALICE, 53, ME, 1000), t0),
            Err(Deny::NoRule)
        );
        assert_eq!(f.check_inbound(&udp(ALICE, 53, ME, 1010), t0), Ok(()));
        // Idle flows go as time passes.
        f.note_outbound(&udp(ME, 9, ALICE, 53), t0 + FLOW_IDLE);
        assert_eq!(f.flow_count(), 1);
    }

    #[test]
    fn no_filter_null_and_empty() {
        let now = Instant::now();
        let mut f = PacketFilter::default();
        f.set_local(vec![IpNet::from(IpAddr::from(ME))]);
        let syn = tcp(ALICE, ME, 22, SYN);
        assert_eq!(f.check_inbound(&syn, now), Err(Deny::NoFilterYet));
        f.set_rules(Some(&json!([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}])));
        assert_eq!(f.check_inbound(&syn, now), Ok(()));
        // null (or absent): the filter in force stays.
        f.set_rules(Some(&serde_json::Value::Null));
        f.set_rules(None);
        assert_eq!(f.check_inbound(&syn, now), Ok(()));
        // []: nothing is let in.
        f.set_rules(Some(&json!([])));
        assert_eq!(f.check_inbound(&syn, now), Err(Deny::NoRule));
        assert_eq!(f.rule_count(), (Some(0), 0));
    }

    #[test]
    fn bad_rules_are_skipped_never_widened() {
        let now = Instant::now();
        let mut f = filter(json!([]));
        let skipped = f.set_rules(Some(&json!([
            {"SrcIPs": ["100.64.0.2", "not-an-ip"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]},
            {"SrcIPs": ["100.64.0.0/8"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]},
            {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 90, "Last": 80}}]},
            {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}], "IPProto": [300]},
            {"SrcIPs": ["*"], "SrcBits": [32], "DstPorts": []},
            "garbage",
            // A field this filter does not know could be a restriction: skipped.
            {"SrcIPs": ["100.64.0.3"], "DstPorts": [{"IP": "100.64.0.1", "Ports": {"First": 23, "Last": 23}}], "SrcPorts": [1]},
            {"SrcIPs": ["100.64.0.3"], "DstPorts": [{"IP": "100.64.0.1", "Ports": {"First": 22, "Last": 22}, "Extra": 1}]},
            {"SrcIPs": ["100.64.0.3"], "DstPorts": [{"IP": "100.64.0.1", "Ports": {"First": 22, "Last": 22}}]}
        ])));
        assert_eq!(skipped, Some(8));
        assert_eq!(f.rule_count(), (Some(1), 8));
        assert_eq!(
            f.check_inbound(&tcp(ALICE, ME, 22, SYN), now),
            Err(Deny::NoRule)
        );
        assert_eq!(f.check_inbound(&tcp(CAROL, ME, 22, SYN), now), Ok(()));
        assert_eq!(
            f.check_inbound(&tcp(CAROL, ME, 23, SYN), now),
            Err(Deny::NoRule)
        );
        // Not a list at all: nothing is let in, and it is counted.
        assert_eq!(f.set_rules(Some(&json!({"a": 1}))), Some(1));
        assert_eq!(
            f.check_inbound(&tcp(CAROL, ME, 22, SYN), now),
            Err(Deny::NoRule)
        );
    }

    #[test]
    fn cap_grants_are_kept_and_described() {
        let f = filter(json!([
            {"SrcIPs": ["100.64.0.2"], "DstPorts": [{"IP": "100.64.0.1", "Ports": {"First": 22, "Last": 22}}], "IPProto": [6]},
            {"SrcIPs": ["100.64.0.0/30"], "CapGrant": [{"Dsts": ["100.64.0.1/32"], "CapMap": {"tailscale.com/cap/relay": [{}]}}]},
            {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}], "IPProto": [1]}
        ]));
        let relay = f.caps(IpAddr::from(ALICE), IpAddr::from(ME));
        assert_eq!(
            relay.keys().copied().collect::<Vec<_>>(),
            ["tailscale.com/cap/relay"]
        );
        assert!(f
            .caps(IpAddr::from([100, 64, 0, 9]), IpAddr::from(ME))
            .is_empty());
        assert!(f.caps(IpAddr::from(ALICE), IpAddr::from(CAROL)).is_empty());
        // A grant opens no port.
        assert_eq!(
            f.check_inbound(&tcp(CAROL, ME, 22, SYN), Instant::now()),
            Err(Deny::NoRule)
        );
        assert_eq!(
            f.describe(),
            [
                "accept tcp from 100.64.0.2/32 to 100.64.0.1/32:22",
                "accept icmp from * to 0.0.0.0/0:*,::/0:*",
                "grant tailscale.com/cap/relay from 100.64.0.0/30 on 100.64.0.1/32",
            ]
        );
        assert!(PacketFilter::default().describe().is_empty());
    }

    #[test]
    fn later_fragments_pass_unless_they_could_overlap_a_header() {
        let f = filter(json!([]));
        let now = Instant::now();
        let mut p = udp(CAROL, 1, ME, 9);
        p[6..8].copy_from_slice(&20u16.to_be_bytes()); // offset 160 bytes
        assert_eq!(f.check_inbound(&p, now), Ok(()));
        p[6..8].copy_from_slice(&5u16.to_be_bytes()); // offset 40 bytes
        assert_eq!(f.check_inbound(&p, now), Err(Deny::Malformed));
        // Not ours: refused all the same.
        let mut q = udp(CAROL, 1, [10, 8, 0, 1], 9);
        q[6..8].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(f.check_inbound(&q, now), Err(Deny::NotLocal));
    }

    #[test]
    fn malformed_packets_are_denied_never_panic() {
        let f = filter(
            json!([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]),
        );
        let now = Instant::now();
        for p in [
            &[][..],
            &[0x45][..],
            &[0x45; 19][..],
            &[0x60; 39][..],
            &[0x15; 40][..],
        ] {
            assert_eq!(f.check_inbound(p, now), Err(Deny::Malformed));
        }
        // A TCP header cut short.
        let mut p = tcp(ALICE, ME, 22, SYN);
        p.truncate(22);
        assert_eq!(f.check_inbound(&p, now), Err(Deny::Malformed));
    }
}
/// The filter's per-packet cost on the data path, for BENCHMARKS.md (a measurement, not
/// run by default): `cargo test --release -p agent --lib filter_cost -- --ignored
/// --nocapture`.
#[cfg(test)]
mod cost {
    use super::*;

    #[test]
    #[ignore = "a measurement: run it in release mode by hand"]
    #[allow(clippy::print_stderr)] // the measured figures are its output
    fn filter_cost_per_packet() {
        let mut f = PacketFilter::default();
        f.set_local(vec![
            "100.64.0.1/32".parse().unwrap(),
            "fd7a:115c:a1e0::1/128".parse().unwrap(),
        ]);
        f.set_rules(Some(&serde_json::json!([{
            "SrcIPs": ["*"],
            "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]
        }])));
        // A 1400-byte TCP segment of an open connection (ACK), the bulk of a stream.
        let mut p = vec![0u8; 1400];
        p[0] = 0x45;
        p[9] = TCP;
        p[12..16].copy_from_slice(&[100, 64, 0, 2]);
        p[16..20].copy_from_slice(&[100, 64, 0, 1]);
        p[33] = 0x10;
        let now = Instant::now();
        const N: u32 = 10_000_000;
        let t = Instant::now();
        let passed = (0..N)
            .filter(|_| f.check_inbound(std::hint::black_box(&p), now).is_ok())
            .count();
        let inbound = t.elapsed() / N;
        let t = Instant::now();
        for _ in 0..N {
            f.note_outbound(std::hint::black_box(&p), now);
        }
        let outbound = t.elapsed() / N;
        eprintln!("per packet: check_inbound {inbound:?}, note_outbound {outbound:?}");
        assert_eq!(passed, N as usize);
        assert_eq!(f.flow_count(), 0, "TCP opens no flow");
    }
}
