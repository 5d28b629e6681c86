//! `agentctl netcheck`: one report (or one every `--every`) printed the way
//! `tailscale netcheck` prints it, plus the NAT type; `--json` for machines, `--verbose`
//! for every probe. Runs without the daemon, from its own UDP socket.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use netcheck::report::ProbeOutcome;
use netcheck::{Netchecker, PortMapper, Report, ReportDetails};
use proto::relaymap::RelayMap;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The relay map (DERPMap JSON): a file, or an http(s) URL serving one.
    #[arg(long, value_name = "FILE|URL", env = "AGENTCTL_RELAY_MAP")]
    relay_map: String,
    /// Print the report as JSON (Tailscale's field names; latencies in nanoseconds).
    #[arg(long)]
    json: bool,
    /// Show every probe and fallback check.
    #[arg(long, short)]
    verbose: bool,
    /// Local UDP port to probe from (0 = any). The NAT type applies to this port.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Skip the UPnP / NAT-PMP / PCP probe.
    #[arg(long)]
    no_portmap: bool,
    /// Repeat every this long (e.g. 30s) until interrupted.
    #[arg(long, value_parser = humantime::parse_duration)]
    every: Option<Duration>,
}

async fn load_map(src: &str) -> anyhow::Result<RelayMap> {
    if src.starts_with("http://") || src.starts_with("https://") {
        let body = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?
            .get(src)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("fetching the relay map from {src}"))?
            .text()
            .await
            .with_context(|| format!("reading the relay map from {src}"))?;
        RelayMap::from_json(&body).with_context(|| format!("relay map from {src}"))
    } else {
        RelayMap::load(std::path::Path::new(src)).map_err(anyhow::Error::from)
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.verbose {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("netcheck=debug")
            .with_writer(std::io::stderr)
            .try_init();
    }
    let map = load_map(&args.relay_map).await?;
    if map.regions.is_empty() {
        anyhow::bail!("the relay map has no regions; nothing to measure");
    }
    let portmapper = (!args.no_portmap).then(PortMapper::new);
    let mut nc = Netchecker::bind(args.port, portmapper)
        .await
        .with_context(|| format!("binding UDP port {}", args.port))?;
    loop {
        let report = nc.report(&map, |_| None).await;
        let text = if args.json {
            let mut v = serde_json::to_value(&report)?;
            if args.verbose {
                v["Probes"] = serde_json::to_value(&nc.details().probes)?;
            }
            serde_json::to_string_pretty(&v)? + "\n"
        } else {
            format_report(&report, nc.details(), &map, args.verbose, SystemTime::now())
        };
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        let Some(every) = args.every else {
            return Ok(());
        };
        tokio::time::sleep(every).await;
    }
}

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
    now: SystemTime,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nReport:");
    let _ = writeln!(s, "\t* Time: {}", humantime::format_rfc3339_seconds(now));
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
            nat: netcheck::NatType {
                mapping: netcheck::Mapping::EndpointIndependent,
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
            SystemTime::UNIX_EPOCH,
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
