//! The probe plan: which relay nodes get STUN probes, over which address family, and when
//! (docs/protocols.md §4.3). Pure: a relay map and the previous report in, a list of
//! probes out. Resolving node addresses and sending are the runner's job.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::relaymap::{NodeAddr, RelayMap, RelayNode, RelayRegion};

use crate::defaults::{
    DEFAULT_INITIAL_RETRANSMIT, FULL_PROBES_PER_REGION, FULL_PROBE_SPACING, INCREMENTAL_REGIONS,
    RETRY_BACKOFF_STEP,
};
use crate::report::Report;

/// IP address family of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One STUN probe: send to `node` of `region` over `family`, `delay` after the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub region: i32,
    /// The node's `Name` in the relay map.
    pub node: String,
    pub family: Family,
    pub delay: Duration,
}

/// What the host can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFamilies {
    pub v4: bool,
    pub v6: bool,
}

/// The probes of one report, grouped by (region, family): once one probe of a group is
/// answered, the rest of the group is not needed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbePlan {
    pub sets: BTreeMap<(i32, Family), Vec<Probe>>,
}

impl ProbePlan {
    /// Every probe, in the order of their delays.
    pub fn probes(&self) -> Vec<&Probe> {
        let mut all: Vec<&Probe> = self.sets.values().flatten().collect();
        all.sort_by_key(|p| p.delay);
        all
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }
}

fn might(node: &RelayNode, family: Family) -> bool {
    if node.stun_port().is_none() {
        return false;
    }
    if !node.stun_test_ip.is_empty() {
        return match node.stun_test_ip.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.is_ipv4() == (family == Family::V4),
            Err(_) => false,
        };
    }
    match family {
        Family::V4 => !matches!(node.ipv4_addr(), NodeAddr::Disabled),
        Family::V6 => !matches!(node.ipv6_addr(), NodeAddr::Disabled),
    }
}

fn measurable(r: &RelayRegion) -> bool {
    !r.no_measure_no_home && !r.nodes.is_empty()
}

/// A full plan: every measurable region, each family the host has, three tries 100 ms
/// apart rotating through the region's nodes.
pub fn full(map: &RelayMap, host: HostFamilies) -> ProbePlan {
    let mut plan = ProbePlan::default();
    for region in map.regions.values().filter(|r| measurable(r)) {
        for family in [Family::V4, Family::V6] {
            let have = match family {
                Family::V4 => host.v4,
                Family::V6 => host.v6,
            };
            if !have {
                continue;
            }
            let probes: Vec<Probe> = (0..FULL_PROBES_PER_REGION)
                .filter_map(|try_| {
                    let node = &region.nodes[try_ % region.nodes.len()];
                    might(node, family).then(|| Probe {
                        region: region.region_id,
                        node: node.name.clone(),
                        family,
                        delay: FULL_PROBE_SPACING * try_ as u32,
                    })
                })
                .collect();
            if !probes.is_empty() {
                plan.sets.insert((region.region_id, family), probes);
            }
        }
    }
    plan
}

/// An incremental plan after `last`: the three fastest regions and the home region, with
/// more tries for the fastest two and for home, spaced by each region's last latency.
/// Falls back to a full plan when `last` measured nothing.
pub fn incremental(map: &RelayMap, host: HostFamilies, last: &Report) -> ProbePlan {
    if last.region_latency.is_empty() {
        return full(map, host);
    }
    let had4 = !last.region_v4_latency.is_empty();
    let had6 = !last.region_v6_latency.is_empty();
    let had_both = host.v6 && had4 && had6;
    // Regions sorted by last latency; unmeasured ones at the end. `Avoid` regions only
    // take part when they are home.
    let mut regions: Vec<&RelayRegion> = map
        .regions
        .values()
        .filter(|r| measurable(r) && (!r.avoid || r.region_id == last.preferred_relay))
        .collect();
    regions.sort_by_key(|r| match last.region_latency.get(&r.region_id) {
        Some(d) => (0, *d),
        None => (1, Duration::ZERO),
    });
    let mut chosen: Vec<&RelayRegion> = regions.iter().take(INCREMENTAL_REGIONS).copied().collect();
    if let Some(home) = regions.iter().find(|r| r.region_id == last.preferred_relay) {
        if !chosen.iter().any(|r| r.region_id == home.region_id) {
            chosen.push(home);
        }
    }
    let mut plan = ProbePlan::default();
    for (rank, region) in chosen.into_iter().enumerate() {
        let fastest_two = rank < 2;
        let (mut do4, mut do6) = (host.v4, host.v6);
        let mut tries = 1;
        if fastest_two {
            tries = 2;
        } else if had_both {
            // Dual-stack hosts alternate families for the slower regions.
            (do4, do6) = (rank % 2 == 0, rank % 2 == 1);
        }
        if !fastest_two && !had6 {
            do6 = false;
        }
        if region.region_id == last.preferred_relay {
            tries = 4;
        }
        let prev = last
            .region_latency
            .get(&region.region_id)
            .map(|d| *d * 6 / 5)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_INITIAL_RETRANSMIT);
        let mut p4 = Vec::new();
        let mut p6 = Vec::new();
        for try_ in 0..tries {
            if try_ != 0 && !had6 {
                do6 = false;
            }
            let node = &region.nodes[try_ % region.nodes.len()];
            let mut delay = prev * try_ as u32;
            if try_ > 1 {
                delay += RETRY_BACKOFF_STEP * try_ as u32;
            }
            let probe = |family| Probe {
                region: region.region_id,
                node: node.name.clone(),
                family,
                delay,
            };
            if do4 && might(node, Family::V4) {
                p4.push(probe(Family::V4));
            }
            if do6 && might(node, Family::V6) {
                p6.push(probe(Family::V6));
            }
        }
        if !p4.is_empty() {
            plan.sets.insert((region.region_id, Family::V4), p4);
        }
        if !p6.is_empty() {
            plan.sets.insert((region.region_id, Family::V6), p6);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(n_regions: i32) -> RelayMap {
        let mut m = RelayMap::default();
        for id in 1..=n_regions {
            m.regions.insert(
                id,
                RelayRegion {
                    region_id: id,
                    region_code: format!("r{id}"),
                    nodes: vec![
                        RelayNode {
                            name: format!("{id}a"),
                            region_id: id,
                            host_name: format!("r{id}a.example"),
                            ipv4: format!("192.0.2.{id}"),
                            ipv6: format!("2001:db8::{id}"),
                            ..Default::default()
                        },
                        RelayNode {
                            name: format!("{id}b"),
                            region_id: id,
                            host_name: format!("r{id}b.example"),
                            ipv4: format!("198.51.100.{id}"),
                            ipv6: "none".into(),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
            );
        }
        m
    }

    const BOTH: HostFamilies = HostFamilies { v4: true, v6: true };
    const V4: HostFamilies = HostFamilies {
        v4: true,
        v6: false,
    };

    #[test]
    fn full_plan_probes_every_region_three_times_rotating_nodes() {
        let plan = full(&map(2), BOTH);
        let v4 = &plan.sets[&(1, Family::V4)];
        assert_eq!(
            v4.iter()
                .map(|p| (p.node.as_str(), p.delay.as_millis()))
                .collect::<Vec<_>>(),
            vec![("1a", 0), ("1b", 100), ("1a", 200)]
        );
        // Node b has IPv6 "none": only a's two tries go over IPv6.
        let v6 = &plan.sets[&(2, Family::V6)];
        assert_eq!(
            v6.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(),
            ["2a", "2a"]
        );
        assert_eq!(plan.sets.len(), 4);
        // An IPv4-only host sends no IPv6 probes.
        assert!(full(&map(2), V4).sets.keys().all(|(_, f)| *f == Family::V4));
    }

    #[test]
    fn no_measure_regions_and_stun_less_nodes_are_skipped() {
        let mut m = map(3);
        m.regions.get_mut(&2).unwrap().no_measure_no_home = true;
        for n in &mut m.regions.get_mut(&3).unwrap().nodes {
            n.stun_port = -1;
        }
        let plan = full(&m, V4);
        assert_eq!(plan.sets.keys().collect::<Vec<_>>(), vec![&(1, Family::V4)]);
    }

    fn last(lat: &[(i32, u64)], home: i32) -> Report {
        let mut r = Report::default();
        for (id, ms) in lat {
            r.region_latency.insert(*id, Duration::from_millis(*ms));
            r.region_v4_latency.insert(*id, Duration::from_millis(*ms));
        }
        r.preferred_relay = home;
        r
    }

    #[test]
    fn incremental_plan_takes_fastest_three_plus_home_with_extra_tries() {
        let m = map(5);
        // Fastest: 3 (10 ms), 1 (20 ms), 5 (30 ms); home is 4 (80 ms).
        let l = last(&[(1, 20), (2, 90), (3, 10), (4, 80), (5, 30)], 4);
        let plan = incremental(&m, V4, &l);
        let tries = |id| plan.sets.get(&(id, Family::V4)).map_or(0, |s| s.len());
        assert_eq!(
            (tries(3), tries(1), tries(5), tries(4), tries(2)),
            (2, 2, 1, 4, 0)
        );
        // Delays: k × 1.2 × last latency, plus k × 50 ms beyond the first retry.
        let home: Vec<u128> = plan.sets[&(4, Family::V4)]
            .iter()
            .map(|p| p.delay.as_millis())
            .collect();
        assert_eq!(home, vec![0, 96, 2 * 96 + 100, 3 * 96 + 150]);
        // No IPv6 answers last time: one IPv6 try for the two fastest regions only.
        let dual = incremental(&m, BOTH, &l);
        let v6: Vec<(i32, usize)> = dual
            .sets
            .iter()
            .filter(|((_, f), _)| *f == Family::V6)
            .map(|((r, _), s)| (*r, s.len()))
            .collect();
        assert_eq!(v6, vec![(1, 1), (3, 1)]);
    }

    #[test]
    fn incremental_without_history_is_full_and_unknown_latency_uses_200ms() {
        let m = map(2);
        assert_eq!(incremental(&m, V4, &Report::default()), full(&m, V4));
        let l = last(&[(1, 20)], 1);
        let plan = incremental(&m, V4, &l);
        let r2: Vec<u128> = plan.sets[&(2, Family::V4)]
            .iter()
            .map(|p| p.delay.as_millis())
            .collect();
        assert_eq!(r2, vec![0, 200]);
    }
}
