//! The netcheck report (docs/protocols.md §4.1) and the pure machinery that fills it:
//! [`StunPhase`] runs a [`ProbePlan`](crate::plan::ProbePlan) with time passed in —
//! which probe is due, which answer belongs to which probe, when the phase is over — and
//! folds answers into a [`Report`]. No sockets and no clock here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;

use crate::defaults::{ENOUGH_REGIONS, STUN_PHASE_TIMEOUT};
use crate::plan::{Family, Probe, ProbePlan};
use crate::stun::{self, TxId};

/// How long after the last probe of a (region, family) set was sent the set is given up.
/// Tailscale waits for the whole STUN phase (3 s); ending sooner lets a report on a
/// UDP-blocked network move on to the HTTPS fallback after about a second.
pub const SET_GIVE_UP: Duration = Duration::from_millis(1000);

/// How a NAT maps one local socket to public addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum Mapping {
    /// Not measured (fewer than two IPv4 answers from different servers, or no UDP).
    #[default]
    Unknown,
    /// The public address equals the local one: no NAT.
    NoNat,
    /// One public ip:port for every destination ("easy" NAT): direct paths work.
    EndpointIndependent,
    /// A different public ip:port per destination ("hard", symmetric NAT).
    EndpointDependent,
}

/// The NAT type as far as STUN can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct NatType {
    #[serde(rename = "Mapping")]
    pub mapping: Mapping,
    /// Whether the public port equals the local port (`None` when not known).
    #[serde(rename = "PortPreserved")]
    pub port_preserved: Option<bool>,
}

impl std::fmt::Display for NatType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ports = match self.port_preserved {
            Some(true) => ", port preserved",
            Some(false) => ", port not preserved",
            None => "",
        };
        match self.mapping {
            Mapping::Unknown => write!(f, "unknown (needs answers from two relay regions)"),
            Mapping::NoNat => write!(f, "none (this host has a public address)"),
            Mapping::EndpointIndependent => {
                write!(f, "easy: endpoint-independent mapping{ports}")
            }
            Mapping::EndpointDependent => write!(
                f,
                "hard: endpoint-dependent mapping{ports} (direct paths need port mapping or the peer's help)"
            ),
        }
    }
}

fn ser_durations<S: serde::Serializer>(
    m: &BTreeMap<i32, Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut out = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        out.serialize_entry(&k.to_string(), &(v.as_nanos() as u64))?;
    }
    out.end()
}

fn ser_counters<S: serde::Serializer>(
    m: &BTreeMap<SocketAddr, u32>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut out = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        out.serialize_entry(&k.to_string(), v)?;
    }
    out.end()
}

/// A netcheck report. JSON field names and units (latencies in nanoseconds) follow
/// Tailscale's `netcheck.Report`, plus `NATType`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Any STUN answer arrived.
    #[serde(rename = "UDP")]
    pub udp: bool,
    #[serde(rename = "IPv4")]
    pub ipv4: bool,
    #[serde(rename = "IPv6")]
    pub ipv6: bool,
    #[serde(rename = "IPv4CanSend")]
    pub ipv4_can_send: bool,
    #[serde(rename = "IPv6CanSend")]
    pub ipv6_can_send: bool,
    #[serde(rename = "OSHasIPv6")]
    pub os_has_ipv6: bool,
    /// Two IPv4 servers saw different addresses ("hard NAT"); `None` = not measured.
    #[serde(rename = "MappingVariesByDestIP")]
    pub mapping_varies_by_dest_ip: Option<bool>,
    #[serde(rename = "UPnP")]
    pub upnp: Option<bool>,
    #[serde(rename = "PMP")]
    pub pmp: Option<bool>,
    #[serde(rename = "PCP")]
    pub pcp: Option<bool>,
    /// The home relay region chosen after this report (0 = none).
    #[serde(rename = "PreferredDERP")]
    pub preferred_relay: i32,
    #[serde(rename = "RegionLatency", serialize_with = "ser_durations")]
    pub region_latency: BTreeMap<i32, Duration>,
    #[serde(rename = "RegionV4Latency", serialize_with = "ser_durations")]
    pub region_v4_latency: BTreeMap<i32, Duration>,
    #[serde(rename = "RegionV6Latency", serialize_with = "ser_durations")]
    pub region_v6_latency: BTreeMap<i32, Duration>,
    /// Public IPv4 ip:port from the first IPv4 answer.
    #[serde(rename = "GlobalV4")]
    pub global_v4: Option<SocketAddr>,
    /// Public IPv6 ip:port from the latest IPv6 answer.
    #[serde(rename = "GlobalV6")]
    pub global_v6: Option<SocketAddr>,
    #[serde(rename = "GlobalV4Counters", serialize_with = "ser_counters")]
    pub global_v4_counters: BTreeMap<SocketAddr, u32>,
    #[serde(rename = "GlobalV6Counters", serialize_with = "ser_counters")]
    pub global_v6_counters: BTreeMap<SocketAddr, u32>,
    #[serde(rename = "CaptivePortal")]
    pub captive_portal: Option<bool>,
    #[serde(rename = "NATType")]
    pub nat: NatType,
    /// Region latencies were measured over HTTPS because UDP got no answer.
    #[serde(rename = "HTTPSFallback")]
    pub https_fallback: bool,
    /// This was a full report (every region), not an incremental one.
    #[serde(rename = "Full")]
    pub full: bool,
    /// How long the report took.
    #[serde(rename = "Took")]
    pub took: Duration,
}

impl Report {
    /// Regions sorted by latency, fastest first.
    pub fn regions_by_latency(&self) -> Vec<(i32, Duration)> {
        let mut v: Vec<(i32, Duration)> =
            self.region_latency.iter().map(|(k, d)| (*k, *d)).collect();
        v.sort_by_key(|(id, d)| (*d, *id));
        v
    }

    /// Records a region latency, keeping the lowest.
    pub fn add_latency(&mut self, region: i32, family: Option<Family>, d: Duration) {
        let min = |m: &mut BTreeMap<i32, Duration>| {
            m.entry(region)
                .and_modify(|e| *e = (*e).min(d))
                .or_insert(d);
        };
        min(&mut self.region_latency);
        match family {
            Some(Family::V4) => min(&mut self.region_v4_latency),
            Some(Family::V6) => min(&mut self.region_v6_latency),
            None => {}
        }
    }

    /// Fills [`Report::nat`] from what was measured; `local` is the local address the
    /// IPv4 probes left from, if known.
    pub fn classify_nat(&mut self, local: Option<SocketAddr>) {
        let Some(global) = self.global_v4 else {
            self.nat = NatType::default();
            return;
        };
        if local.is_some_and(|l| l.ip() == global.ip()) {
            self.nat = NatType {
                mapping: Mapping::NoNat,
                port_preserved: Some(local.is_some_and(|l| l.port() == global.port())),
            };
            return;
        }
        let mapping = match self.mapping_varies_by_dest_ip {
            Some(true) => Mapping::EndpointDependent,
            Some(false) => Mapping::EndpointIndependent,
            None => Mapping::Unknown,
        };
        let port_preserved =
            local.map(|l| self.global_v4_counters.keys().all(|g| g.port() == l.port()));
        self.nat = NatType {
            mapping,
            port_preserved,
        };
    }
}

/// What happened to one probe, for `--verbose` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ProbeOutcome {
    /// Sent; no answer (yet).
    Sent,
    /// Answered after this long, with our address as the server saw it.
    Answered {
        latency: Duration,
        seen_as: SocketAddr,
    },
    /// Not sent: another probe of its set had answered, or it could add nothing.
    Skipped,
    /// No address for this node and family.
    NoAddress,
}

/// One probe and its fate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeRecord {
    pub region: i32,
    pub node: String,
    #[serde(serialize_with = "ser_family")]
    pub family: Family,
    pub target: Option<SocketAddr>,
    /// Planned delay after the start.
    pub delay: Duration,
    pub outcome: ProbeOutcome,
}

fn ser_family<S: serde::Serializer>(f: &Family, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&f.to_string())
}

#[derive(Debug)]
struct Planned {
    record: ProbeRecord,
    at: Instant,
    set: (i32, Family),
    sent: Option<(TxId, Instant)>,
}

/// Counters of a STUN phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseStats {
    pub sent: u32,
    pub answered: u32,
    /// Answers whose transaction ID is not one of ours (stale, or spoofed).
    pub unknown_tx: u32,
    /// Datagrams that were not a usable STUN response.
    pub malformed: u32,
}

/// The STUN part of one report, as a state machine: poll for due probes, feed answers,
/// and stop when [`StunPhase::is_done`].
#[derive(Debug)]
pub struct StunPhase {
    probes: Vec<Planned>,
    done_sets: BTreeSet<(i32, Family)>,
    inflight: BTreeMap<TxId, usize>,
    report: Report,
    first_v4: Option<SocketAddr>,
    incremental: bool,
    deadline: Instant,
    enough_at: Option<Instant>,
    rng: StdRng,
    pub stats: PhaseStats,
}

impl StunPhase {
    /// Starts a phase at `start`. `target` gives each probe's address (`None`: the node
    /// has no address of that family). `seed` seeds the transaction IDs.
    pub fn new(
        plan: &ProbePlan,
        target: impl Fn(&Probe) -> Option<SocketAddr>,
        incremental: bool,
        start: Instant,
        seed: u64,
    ) -> StunPhase {
        let probes = plan
            .sets
            .iter()
            .flat_map(|(set, probes)| probes.iter().map(move |p| (*set, p)))
            .map(|(set, p)| Planned {
                record: ProbeRecord {
                    region: p.region,
                    node: p.node.clone(),
                    family: p.family,
                    target: target(p),
                    delay: p.delay,
                    outcome: ProbeOutcome::Sent,
                },
                at: start + p.delay,
                set,
                sent: None,
            })
            .collect();
        StunPhase {
            probes,
            done_sets: BTreeSet::new(),
            inflight: BTreeMap::new(),
            report: Report {
                full: !incremental,
                ..Report::default()
            },
            first_v4: None,
            incremental,
            deadline: start + STUN_PHASE_TIMEOUT,
            enough_at: None,
            rng: StdRng::seed_from_u64(seed),
            stats: PhaseStats::default(),
        }
    }

    /// Whether a probe due now could still tell us something (Tailscale's
    /// `probeWouldHelp`): its region has no latency yet, or it is IPv6 and no IPv6
    /// answer exists, or it is IPv4 and the mapping behaviour is still unknown.
    fn would_help(&self, p: &ProbeRecord) -> bool {
        !self.report.region_latency.contains_key(&p.region)
            || (p.family == Family::V6 && self.report.region_v6_latency.is_empty())
            || (p.family == Family::V4 && self.report.mapping_varies_by_dest_ip.is_none())
    }

    /// The next probe to send now: its destination and the request bytes.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        if self.is_done(now) {
            return None;
        }
        loop {
            let i = self.probes.iter().position(|p| {
                p.sent.is_none() && p.record.outcome == ProbeOutcome::Sent && p.at <= now
            })?;
            if self.done_sets.contains(&self.probes[i].set) {
                self.probes[i].record.outcome = ProbeOutcome::Skipped;
                continue;
            }
            if !self.would_help(&self.probes[i].record) {
                // Nothing to learn: the rest of its set is cancelled too.
                self.probes[i].record.outcome = ProbeOutcome::Skipped;
                self.done_sets.insert(self.probes[i].set);
                continue;
            }
            let Some(to) = self.probes[i].record.target else {
                self.probes[i].record.outcome = ProbeOutcome::NoAddress;
                continue;
            };
            let tx: TxId = self.rng.gen();
            self.probes[i].sent = Some((tx, now));
            self.inflight.insert(tx, i);
            self.stats.sent += 1;
            return Some((to, stun::request(tx)));
        }
    }

    /// Tells the phase whether a send to `family` worked (the host can send there).
    pub fn note_send_result(&mut self, family_v4: bool, ok: bool) {
        if ok {
            if family_v4 {
                self.report.ipv4_can_send = true;
            } else {
                self.report.ipv6_can_send = true;
            }
        }
    }

    /// Feeds a datagram that may be a STUN answer. Returns whether it answered one of
    /// our probes.
    pub fn handle_packet(&mut self, now: Instant, pkt: &[u8]) -> bool {
        let (tx, seen_as) = match stun::parse_response(pkt) {
            Ok(x) => x,
            Err(_) => {
                self.stats.malformed += 1;
                return false;
            }
        };
        let Some(i) = self.inflight.remove(&tx) else {
            self.stats.unknown_tx += 1;
            return false;
        };
        let Some((_, sent_at)) = self.probes[i].sent else {
            return false;
        };
        let latency = now.saturating_duration_since(sent_at);
        self.stats.answered += 1;
        let (region, family, set) = (
            self.probes[i].record.region,
            self.probes[i].record.family,
            self.probes[i].set,
        );
        self.probes[i].record.outcome = ProbeOutcome::Answered { latency, seen_as };
        self.done_sets.insert(set);
        let r = &mut self.report;
        r.udp = true;
        r.add_latency(region, Some(family), latency);
        if r.region_latency.len() == ENOUGH_REGIONS && self.enough_at.is_none() {
            let slowest = r.region_latency.values().max().copied().unwrap_or_default();
            let grace = if self.incremental {
                slowest
            } else {
                slowest * 2
            };
            self.enough_at = Some(now + grace);
        }
        if seen_as.is_ipv6() {
            r.ipv6 = true;
            r.global_v6 = Some(seen_as);
            *r.global_v6_counters.entry(seen_as).or_default() += 1;
        } else {
            r.ipv4 = true;
            *r.global_v4_counters.entry(seen_as).or_default() += 1;
            match self.first_v4 {
                None => {
                    self.first_v4 = Some(seen_as);
                    r.global_v4 = Some(seen_as);
                }
                Some(first) if first != seen_as => r.mapping_varies_by_dest_ip = Some(true),
                Some(_) => {
                    r.mapping_varies_by_dest_ip.get_or_insert(false);
                }
            }
        }
        true
    }

    fn set_finished(&self, set: (i32, Family), now: Instant) -> bool {
        if self.done_sets.contains(&set) {
            return true;
        }
        self.probes
            .iter()
            .filter(|p| p.set == set)
            .all(|p| match (p.sent, &p.record.outcome) {
                (Some((_, at)), _) => now >= at + SET_GIVE_UP,
                (None, ProbeOutcome::Sent) => false,
                (None, _) => true,
            })
    }

    /// The phase is over: its deadline passed, enough regions answered and their grace
    /// period ran out, or every set is answered, cancelled or given up.
    pub fn is_done(&self, now: Instant) -> bool {
        now >= self.deadline
            || self.enough_at.is_some_and(|t| now >= t)
            || self.probes.iter().all(|p| self.set_finished(p.set, now))
    }

    /// When to call [`poll_transmit`](Self::poll_transmit) / [`is_done`](Self::is_done) next.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.deadline;
        if let Some(e) = self.enough_at {
            t = t.min(e);
        }
        let sets: BTreeSet<(i32, Family)> = self.probes.iter().map(|p| p.set).collect();
        for set in sets.difference(&self.done_sets) {
            let members = self.probes.iter().filter(|p| p.set == *set);
            let next_unsent = members
                .clone()
                .filter(|p| p.sent.is_none() && p.record.outcome == ProbeOutcome::Sent)
                .map(|p| p.at)
                .min();
            match next_unsent {
                Some(at) => t = t.min(at),
                None => {
                    if let Some(last) = members.filter_map(|p| p.sent.map(|(_, at)| at)).max() {
                        t = t.min(last + SET_GIVE_UP);
                    }
                }
            }
        }
        t
    }

    /// Whether any answer arrived.
    pub fn any_udp(&self) -> bool {
        self.report.udp
    }

    /// The report so far.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Ends the phase: the report and what happened to each probe (probes never sent
    /// count as skipped).
    pub fn finish(mut self) -> (Report, Vec<ProbeRecord>) {
        for p in &mut self.probes {
            if p.sent.is_none() && p.record.outcome == ProbeOutcome::Sent {
                p.record.outcome = ProbeOutcome::Skipped;
            }
        }
        let records = self.probes.into_iter().map(|p| p.record).collect();
        (self.report, records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{self, HostFamilies};
    use proto::relaymap::{RelayMap, RelayNode, RelayRegion};

    fn map(ids: &[i32]) -> RelayMap {
        let mut m = RelayMap::default();
        for &id in ids {
            m.regions.insert(
                id,
                RelayRegion {
                    region_id: id,
                    nodes: vec![RelayNode {
                        name: format!("{id}a"),
                        region_id: id,
                        ipv4: format!("192.0.2.{id}"),
                        ipv6: "none".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            );
        }
        m
    }

    fn target(p: &Probe) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            format!("192.0.2.{}", p.region).parse().unwrap(),
            3478,
        ))
    }

    /// A binding response for the request `req`, saying we were seen as `seen`.
    fn answer(req: &[u8], seen: SocketAddr) -> Vec<u8> {
        relay_like_response(req[8..20].try_into().unwrap(), seen)
    }

    fn relay_like_response(tx: TxId, seen: SocketAddr) -> Vec<u8> {
        use stun_rs::attributes::stun::XorMappedAddress;
        use stun_rs::methods::BINDING;
        use stun_rs::{MessageClass, MessageEncoderBuilder, StunMessageBuilder, TransactionId};
        let msg = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(TransactionId::from(tx))
            .with_attribute(XorMappedAddress::from(seen))
            .build();
        let mut buf = vec![0u8; 64];
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &msg)
            .unwrap();
        buf.truncate(n);
        buf
    }

    const V4: HostFamilies = HostFamilies {
        v4: true,
        v6: false,
    };

    #[test]
    fn answers_fill_latency_global_address_and_mapping_and_cancel_their_set() {
        let t0 = Instant::now();
        let plan = plan::full(&map(&[1, 2]), V4);
        let mut ph = StunPhase::new(&plan, target, false, t0, 7);
        let a = ph.poll_transmit(t0).unwrap();
        let b = ph.poll_transmit(t0).unwrap();
        assert!(ph.poll_transmit(t0).is_none(), "retries wait 100 ms");
        let me: SocketAddr = "203.0.113.9:41641".parse().unwrap();
        let (first, second) = if a.0.ip().to_string().ends_with(".1") {
            (a, b)
        } else {
            (b, a)
        };
        assert!(ph.handle_packet(t0 + Duration::from_millis(20), &answer(&first.1, me)));
        assert!(ph.handle_packet(t0 + Duration::from_millis(80), &answer(&second.1, me)));
        // Both sets answered: no retries go out, and the phase is over.
        assert!(ph.poll_transmit(t0 + Duration::from_millis(150)).is_none());
        assert!(ph.is_done(t0 + Duration::from_millis(150)));
        let (r, recs) = ph.finish();
        assert!(r.udp && r.ipv4);
        assert_eq!(r.region_latency[&1], Duration::from_millis(20));
        assert_eq!(r.region_latency[&2], Duration::from_millis(80));
        assert_eq!(r.global_v4, Some(me));
        assert_eq!(r.mapping_varies_by_dest_ip, Some(false));
        assert_eq!(
            recs.iter()
                .filter(|r| r.outcome == ProbeOutcome::Skipped)
                .count(),
            4
        );
    }

    #[test]
    fn different_mappings_per_server_mean_endpoint_dependent() {
        let t0 = Instant::now();
        let plan = plan::full(&map(&[1, 2]), V4);
        let mut ph = StunPhase::new(&plan, target, false, t0, 1);
        let a = ph.poll_transmit(t0).unwrap();
        let b = ph.poll_transmit(t0).unwrap();
        ph.handle_packet(t0, &answer(&a.1, "203.0.113.9:1000".parse().unwrap()));
        ph.handle_packet(t0, &answer(&b.1, "203.0.113.9:2000".parse().unwrap()));
        let (mut r, _) = ph.finish();
        assert_eq!(r.mapping_varies_by_dest_ip, Some(true));
        r.classify_nat(Some("10.0.0.2:1000".parse().unwrap()));
        assert_eq!(r.nat.mapping, Mapping::EndpointDependent);
        assert_eq!(r.nat.port_preserved, Some(false));
    }

    #[test]
    fn nat_classification() {
        let mut r = Report {
            global_v4: Some("203.0.113.9:41641".parse().unwrap()),
            mapping_varies_by_dest_ip: Some(false),
            ..Default::default()
        };
        r.global_v4_counters.insert(r.global_v4.unwrap(), 2);
        r.classify_nat(Some("10.0.0.2:41641".parse().unwrap()));
        assert_eq!(
            r.nat,
            NatType {
                mapping: Mapping::EndpointIndependent,
                port_preserved: Some(true)
            }
        );
        r.classify_nat(Some("203.0.113.9:41641".parse().unwrap()));
        assert_eq!(r.nat.mapping, Mapping::NoNat);
        r.mapping_varies_by_dest_ip = None;
        r.classify_nat(Some("10.0.0.2:5".parse().unwrap()));
        assert_eq!(r.nat.mapping, Mapping::Unknown);
        r.global_v4 = None;
        r.classify_nat(None);
        assert_eq!(r.nat, NatType::default());
    }

    #[test]
    fn unknown_transaction_ids_and_garbage_are_counted_and_ignored() {
        let t0 = Instant::now();
        let plan = plan::full(&map(&[1]), V4);
        let mut ph = StunPhase::new(&plan, target, false, t0, 3);
        let _ = ph.poll_transmit(t0).unwrap();
        let bogus = relay_like_response([0xEE; 12], "203.0.113.1:1".parse().unwrap());
        assert!(!ph.handle_packet(t0, &bogus));
        assert!(!ph.handle_packet(t0, b"\x01\x01garbage garbage garbage"));
        assert_eq!(ph.stats.unknown_tx, 1);
        assert_eq!(ph.stats.malformed, 1);
        assert!(!ph.any_udp());
    }

    #[test]
    fn unanswered_sets_are_given_up_a_second_after_their_last_probe() {
        let t0 = Instant::now();
        let plan = plan::full(&map(&[1]), V4);
        let mut ph = StunPhase::new(&plan, target, false, t0, 3);
        let mut now = t0;
        let mut sent = 0;
        while !ph.is_done(now) {
            while ph.poll_transmit(now).is_some() {
                sent += 1;
            }
            now = ph.poll_timeout();
        }
        assert_eq!(sent, 3);
        assert_eq!(now, t0 + Duration::from_millis(200) + SET_GIVE_UP);
    }

    #[test]
    fn enough_regions_end_the_phase_after_a_grace_period() {
        let t0 = Instant::now();
        let plan = plan::full(&map(&[1, 2, 3, 4]), V4);
        let mut ph = StunPhase::new(&plan, target, false, t0, 5);
        let mut reqs = Vec::new();
        while let Some(x) = ph.poll_transmit(t0) {
            reqs.push(x);
        }
        assert_eq!(reqs.len(), 4);
        let me: SocketAddr = "203.0.113.9:41641".parse().unwrap();
        for (i, (_, req)) in reqs.iter().take(3).enumerate() {
            ph.handle_packet(
                t0 + Duration::from_millis(10 * (i as u64 + 1)),
                &answer(req, me),
            );
        }
        // Third answer at 30 ms; a full report waits 2 × the slowest (30 ms) more.
        assert!(!ph.is_done(t0 + Duration::from_millis(89)));
        assert!(ph.is_done(t0 + Duration::from_millis(90)));
    }

    #[test]
    fn a_probe_that_cannot_help_is_skipped() {
        // One region, IPv4: after the first answer the mapping is still unknown, so a
        // second IPv4 probe elsewhere would help; within the same set it is cancelled.
        let t0 = Instant::now();
        let plan = plan::full(&map(&[1]), V4);
        let mut ph = StunPhase::new(&plan, target, false, t0, 9);
        let (_, req) = ph.poll_transmit(t0).unwrap();
        ph.handle_packet(
            t0 + Duration::from_millis(5),
            &answer(&req, "203.0.113.9:1".parse().unwrap()),
        );
        assert!(ph.poll_transmit(t0 + Duration::from_millis(100)).is_none());
        assert_eq!(ph.stats.sent, 1);
    }
}
