//! The human form of a report, the way `tailscale netcheck` prints it, plus the NAT type
//! and (verbose) every probe. Shared by `agentctl netcheck` and agentd's local API.

use std::fmt::Write as _;
use std::time::Duration;

use proto::relaymap::RelayMap;

use crate::report::ProbeOutcome;
use crate::{Report, ReportDetails};

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn opt(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "true",
        Some(false) => "false",
        None => "",
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

fn region_label(map: &RelayMap, id: i32) -> (String, String) {
    match map.regions.get(&id) {
        Some(r) => (
            if r.region_code.is_empty() {
                id.to_string()
            } else {
                r.region_code.clone()
            },
            r.region_name.clone(),
        ),
        None => (id.to_string(), String::new()),
    }
}

/// The human form of a report.
pub fn format_report(
    r: &Report,
    d: &ReportDetails,
    map: &RelayMap,
    verbose: bool,
    time: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nReport:");
    let _ = writeln!(s, "\t* Time: {time}");
    let _ = writeln!(s, "\t* UDP: {}", r.udp);
    match r.global_v4 {
        Some(a) => {
            let _ = writeln!(s, "\t* IPv4: yes, {a}");
        }
        None => {
            let _ = writeln!(s, "\t* IPv4: {}", yes_no(r.ipv4));
        }
    }
    match (r.global_v6, r.os_has_ipv6) {
        (Some(a), _) => {
            let _ = writeln!(s, "\t* IPv6: yes, {a}");
        }
        (None, true) => {
            let _ = writeln!(s, "\t* IPv6: no, but OS has support");
        }
        (None, false) => {
            let _ = writeln!(s, "\t* IPv6: no, unavailable in OS");
        }
    }
    let _ = writeln!(
        s,
        "\t* MappingVariesByDestIP: {}",
        opt(r.mapping_varies_by_dest_ip)
    );
    let _ = writeln!(s, "\t* NAT type: {}", r.nat);
    let portmap = match (r.upnp, r.pmp, r.pcp) {
        (None, None, None) => "not checked".to_string(),
        (u, p, c) => {
            let names: Vec<&str> = [(u, "UPnP"), (p, "NAT-PMP"), (c, "PCP")]
                .iter()
                .filter(|(on, _)| *on == Some(true))
                .map(|(_, n)| *n)
                .collect();
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        }
    };
    let _ = writeln!(s, "\t* PortMapping: {portmap}");
    let _ = writeln!(s, "\t* CaptivePortal: {}", opt(r.captive_portal));
    if r.preferred_relay != 0 {
        let (code, name) = region_label(map, r.preferred_relay);
        let _ = writeln!(
            s,
            "\t* Nearest relay: {}",
            if name.is_empty() { code } else { name }
        );
    } else {
        let _ = writeln!(
            s,
            "\t* Nearest relay: unknown (no response to latency probes)"
        );
    }
    if !r.region_latency.is_empty() {
        let how = if r.https_fallback {
            " (over HTTPS: UDP got no answer)"
        } else {
            ""
        };
        let _ = writeln!(s, "\t* Relay latency{how}:");
        for (id, lat) in r.regions_by_latency() {
            let (code, name) = region_label(map, id);
            let _ = writeln!(s, "\t\t- {code}: {:<8} ({name})", ms(lat));
        }
    }
    if verbose {
        let _ = writeln!(
            s,
            "\nProbes ({} sent, {} answered, {} unknown answers, {} malformed; took {}):",
            d.stun.sent,
            d.stun.answered,
            d.stun.unknown_tx,
            d.stun.malformed,
            ms(r.took)
        );
        for p in &d.probes {
            let target = p.target.map_or("-".to_string(), |t| t.to_string());
            let outcome = match &p.outcome {
                ProbeOutcome::Sent => "no answer".to_string(),
                ProbeOutcome::Answered { latency, seen_as } => {
                    format!("{} seen as {seen_as}", ms(*latency))
                }
                ProbeOutcome::Skipped => "skipped".to_string(),
                ProbeOutcome::NoAddress => "no address".to_string(),
            };
            let _ = writeln!(
                s,
                "\t- region {} node {} {} +{}ms to {target}: {outcome}",
                p.region,
                p.node,
                p.family,
                p.delay.as_millis()
            );
        }
        for h in &d.https {
            let res = match &h.result {
                Ok(dur) => ms(*dur),
                Err(e) => format!("failed: {e}"),
            };
            let _ = writeln!(s, "\t- HTTPS region {} node {}: {res}", h.region, h.node);
        }
        match &d.portmap {
            Some(Ok(p)) => {
                let _ = writeln!(s, "\t- port mapping probe: {p}");
            }
            Some(Err(e)) => {
                let _ = writeln!(s, "\t- port mapping probe: {e}");
            }
            None => {}
        }
        if let Some(l) = d.local_v4 {
            let _ = writeln!(s, "\t- local IPv4 address: {l}");
        }
        if let Some(reason) = d.home_reason {
            let _ = writeln!(s, "\t- home region: {reason:?}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::relaymap::RelayRegion;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn human_output_names_regions_and_nat_type() {
        let mut map = RelayMap::default();
        for (id, code, name) in [(901, "near", "Near"), (902, "far", "Far")] {
            map.regions.insert(
                id,
                RelayRegion {
                    region_id: id,
                    region_code: code.into(),
                    region_name: name.into(),
                    ..Default::default()
                },
            );
        }
        let mut r = Report {
            udp: true,
            ipv4: true,
            global_v4: Some("203.0.113.5:41641".parse().unwrap()),
            mapping_varies_by_dest_ip: Some(false),
            upnp: Some(false),
            pmp: Some(true),
            pcp: Some(true),
            preferred_relay: 901,
            nat: crate::NatType {
                mapping: crate::Mapping::EndpointIndependent,
                port_preserved: Some(true),
            },
            ..Default::default()
        };
        r.add_latency(901, None, Duration::from_micros(20_400));
        r.add_latency(902, None, Duration::from_micros(80_100));
        let out = format_report(
            &r,
            &ReportDetails::default(),
            &map,
            false,
            "1970-01-01T00:00:00Z",
        );
        assert!(out.contains("\t* IPv4: yes, 203.0.113.5:41641\n"), "{out}");
        assert!(out.contains("\t* MappingVariesByDestIP: false\n"));
        assert!(out.contains("NAT type: easy: endpoint-independent mapping, port preserved"));
        assert!(out.contains("\t* PortMapping: NAT-PMP, PCP\n"));
        assert!(out.contains("\t* Nearest relay: Near\n"));
        let near = out.find("- near: 20.4ms").unwrap();
        let far = out.find("- far: 80.1ms").unwrap();
        assert!(near < far);
    }
}
