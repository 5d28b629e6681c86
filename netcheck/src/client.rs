//! The netcheck runner: the thin I/O around the pure parts. It resolves relay node
//! addresses, sends the probes [`StunPhase`] asks for on the UDP sockets, feeds answers
//! back, probes the port-mapping services meanwhile, falls back to HTTPS latency checks
//! when UDP gets no answer, checks for a captive portal, and chooses the home region.
//!
//! The sockets are either its own ([`Netchecker::bind`], for `agentctl netcheck`) or the
//! daemon's shared WireGuard/disco socket ([`Netchecker::with_sockets`]): then the
//! socket's owner hands STUN answers over through [`StunInbox`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::relaymap::{NodeAddr, RelayMap, RelayNode};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::defaults::{
    CAPTIVE_PORTAL_TIMEOUT, FULL_REPORT_INTERVAL, HTTPS_CHECK_TIMEOUT, MAX_STUN_PACKET,
    PORTMAP_PROBE_TIMEOUT, REPORT_TIMEOUT, STUN_QUEUE,
};
use crate::home::{HomeChooser, HomeReason};
use crate::plan::{self, Family, HostFamilies, Probe};
use crate::portmap::{PortMapper, PortmapServices};
use crate::report::{PhaseStats, ProbeRecord, Report, StunPhase};
use crate::stun;

/// Where STUN answers arriving on a shared socket are handed to netcheck. Bounded: when
/// full, answers are dropped and counted.
#[derive(Debug, Clone)]
pub struct StunInbox {
    tx: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    dropped: Arc<AtomicU64>,
}

impl StunInbox {
    /// Hands over a datagram that [`stun::looks_like_response`] accepted.
    pub fn deliver(&self, pkt: &[u8], from: SocketAddr) {
        if self.tx.try_send((pkt.to_vec(), from)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Answers dropped because netcheck was not keeping up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// An HTTPS latency check made because UDP got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsCheck {
    pub region: i32,
    pub node: String,
    pub result: Result<Duration, String>,
}

/// What happened during the last report, for `--verbose`.
#[derive(Debug, Clone, Default)]
pub struct ReportDetails {
    pub probes: Vec<ProbeRecord>,
    pub https: Vec<HttpsCheck>,
    pub stun: PhaseStats,
    pub portmap: Option<Result<PortmapServices, String>>,
    pub home_reason: Option<HomeReason>,
    /// The local address IPv4 probes left from.
    pub local_v4: Option<SocketAddr>,
}

/// Measures the network, report after report, and remembers what it needs across them
/// (last report, full-report schedule, home-region history).
#[derive(Debug)]
pub struct Netchecker {
    v4: Option<Arc<UdpSocket>>,
    v6: Option<Arc<UdpSocket>>,
    rx: mpsc::Receiver<(Vec<u8>, SocketAddr)>,
    inbox: StunInbox,
    /// The socket readers, stopped when the netchecker drops.
    readers: Vec<tokio_util::task::AbortOnDropHandle<()>>,
    portmapper: Option<PortMapper>,
    last: Option<Report>,
    last_full: Option<Instant>,
    next_full: bool,
    home: HomeChooser,
    details: ReportDetails,
}

fn inbox() -> (StunInbox, mpsc::Receiver<(Vec<u8>, SocketAddr)>) {
    let (tx, rx) = mpsc::channel(STUN_QUEUE);
    (
        StunInbox {
            tx,
            dropped: Arc::default(),
        },
        rx,
    )
}

/// An IPv6-only socket on `port`: a dual-stack one would collide with the IPv4 socket
/// on the same port (and see IPv4 traffic as `::ffff:a.b.c.d`).
fn bind_v6_only(port: u16) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(true)?;
    s.set_nonblocking(true)?;
    s.bind(&std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    UdpSocket::from_std(s.into())
}

impl Netchecker {
    /// A netchecker with its own UDP sockets on `port` (0 = any), IPv4 and, where the
    /// host has it, IPv6.
    pub async fn bind(port: u16, portmapper: Option<PortMapper>) -> std::io::Result<Self> {
        let v4 = Arc::new(UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).await?);
        let v6 = bind_v6_only(port).ok().map(Arc::new);
        let (inbox, rx) = inbox();
        let mut readers = Vec::new();
        for sock in [Some(&v4), v6.as_ref()].into_iter().flatten() {
            let sock = Arc::clone(sock);
            let inbox = inbox.clone();
            readers.push(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
                async move {
                    let mut buf = vec![0u8; MAX_STUN_PACKET];
                    loop {
                        match sock.recv_from(&mut buf).await {
                            Ok((n, from)) if stun::looks_like_response(&buf[..n]) => {
                                inbox.deliver(&buf[..n], from)
                            }
                            Ok(_) => {}
                            Err(e) => tracing::trace!(error = %e, "netcheck socket receive error"),
                        }
                    }
                },
            )));
        }
        let mut nc = Self::assemble(Some(v4), v6, portmapper, inbox, rx);
        nc.readers = readers;
        Ok(nc)
    }

    /// A netchecker sending on sockets owned by someone else, who must pass STUN answers
    /// to [`Netchecker::inbox`].
    pub fn with_sockets(
        v4: Option<Arc<UdpSocket>>,
        v6: Option<Arc<UdpSocket>>,
        portmapper: Option<PortMapper>,
    ) -> Self {
        let (inbox, rx) = inbox();
        Self::assemble(v4, v6, portmapper, inbox, rx)
    }

    fn assemble(
        v4: Option<Arc<UdpSocket>>,
        v6: Option<Arc<UdpSocket>>,
        portmapper: Option<PortMapper>,
        inbox: StunInbox,
        rx: mpsc::Receiver<(Vec<u8>, SocketAddr)>,
    ) -> Self {
        Netchecker {
            v4,
            v6,
            rx,
            inbox,
            readers: Vec::new(),
            portmapper,
            last: None,
            last_full: None,
            next_full: false,
            home: HomeChooser::new(),
            details: ReportDetails::default(),
        }
    }

    /// Replaces the IPv6 socket (IPv6 came on, or went away, after start). Its owner
    /// delivers STUN answers to the same [`Netchecker::inbox`].
    pub fn set_v6(&mut self, v6: Option<Arc<UdpSocket>>) {
        self.v6 = v6;
    }

    /// Where the socket owner delivers STUN answers.
    pub fn inbox(&self) -> StunInbox {
        self.inbox.clone()
    }

    /// The next report will be a full one (e.g. after a network change).
    pub fn force_full(&mut self) {
        self.next_full = true;
    }

    /// The last report.
    pub fn last_report(&self) -> Option<&Report> {
        self.last.as_ref()
    }

    /// Probe-level detail of the last report.
    pub fn details(&self) -> &ReportDetails {
        &self.details
    }

    /// The current home region.
    pub fn home(&self) -> Option<i32> {
        self.home.home()
    }

    /// Makes a report against `map`. `last_heard(region)` says when a relay frame last
    /// arrived from a region (for the home-region hysteresis); pass `|_| None` when
    /// there are no relay connections.
    pub async fn report(
        &mut self,
        map: &RelayMap,
        last_heard: impl Fn(i32) -> Option<Instant>,
    ) -> Report {
        let start = Instant::now();
        let mut details = ReportDetails::default();
        let full = self.next_full
            || self.last.is_none()
            || self
                .last_full
                .is_none_or(|t| start.saturating_duration_since(t) >= FULL_REPORT_INTERVAL)
            || self
                .last
                .as_ref()
                .is_some_and(|l| !l.udp && l.captive_portal == Some(true));
        let host = HostFamilies {
            v4: self.v4.is_some(),
            v6: self.v6.is_some(),
        };
        let plan = match (&self.last, full) {
            (Some(last), false) => plan::incremental(map, host, last),
            _ => plan::full(map, host),
        };
        if full {
            self.next_full = false;
            self.last_full = Some(start);
        }
        let targets = resolve_targets(map, &plan.probes()).await;
        details.local_v4 = self.local_v4(&targets);

        // Answers to an earlier report are stale now.
        while self.rx.try_recv().is_ok() {}

        let mut phase = StunPhase::new(
            &plan,
            |p| targets.get(&(p.node.clone(), p.family)).copied(),
            !full,
            start,
            rand::random(),
        );
        let portmapper = self.portmapper.clone();
        let pm = async move {
            match portmapper {
                Some(pm) => Some(
                    pm.probe(PORTMAP_PROBE_TIMEOUT)
                        .await
                        .map_err(|e| e.to_string()),
                ),
                None => None,
            }
        };
        tokio::pin!(pm);
        let mut pm_result = None;
        let mut pm_done = false;
        loop {
            let now = Instant::now();
            while let Some((to, req)) = phase.poll_transmit(now) {
                let sock = if to.is_ipv4() { &self.v4 } else { &self.v6 };
                let ok = match sock {
                    Some(s) => s.send_to(&req, to).await.is_ok(),
                    None => false,
                };
                phase.note_send_result(to.is_ipv4(), ok);
            }
            if phase.is_done(now) {
                break;
            }
            let wake = tokio::time::Instant::from_std(phase.poll_timeout());
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                pkt = self.rx.recv() => {
                    if let Some((pkt, _from)) = pkt {
                        phase.handle_packet(Instant::now(), &pkt);
                    }
                }
                r = &mut pm, if !pm_done => {
                    pm_result = r;
                    pm_done = true;
                }
            }
        }
        if !pm_done {
            pm_result = pm.await;
        }
        details.stun = phase.stats;
        let (mut report, probes) = phase.finish();
        details.probes = probes;

        let budget_left = REPORT_TIMEOUT.saturating_sub(start.elapsed());
        if !report.udp && !budget_left.is_zero() {
            let captive = async {
                if full {
                    let home = self.home.home().unwrap_or(0);
                    captive_detect(map, home, budget_left.min(CAPTIVE_PORTAL_TIMEOUT)).await
                } else {
                    None
                }
            };
            let https = https_latencies(map, &report, budget_left.min(HTTPS_CHECK_TIMEOUT));
            let (captive, https) = tokio::join!(captive, https);
            report.captive_portal = captive;
            for c in &https {
                if let Ok(d) = c.result {
                    report.add_latency(c.region, None, d);
                    report.https_fallback = true;
                }
            }
            details.https = https;
        }
        if let Some(Ok(s)) = &pm_result {
            report.upnp = Some(s.upnp);
            report.pmp = Some(s.pmp);
            report.pcp = Some(s.pcp);
        }
        details.portmap = pm_result;
        report.os_has_ipv6 = std::net::UdpSocket::bind("[::1]:0").is_ok();
        report.classify_nat(details.local_v4);
        let scores = map
            .home_params
            .as_ref()
            .map(|h| h.region_score.clone())
            .unwrap_or_default();
        let measurable: BTreeMap<i32, Duration> = report
            .region_latency
            .iter()
            .filter(|(r, _)| map.regions.get(r).is_some_and(|r| !r.no_measure_no_home))
            .map(|(r, d)| (*r, *d))
            .collect();
        report.preferred_relay = self
            .home
            .update(Instant::now(), &measurable, &scores, last_heard)
            .unwrap_or(0);
        details.home_reason = self.home.reason();
        report.took = start.elapsed();
        tracing::debug!(
            udp = report.udp,
            v4 = ?report.global_v4,
            varies = ?report.mapping_varies_by_dest_ip,
            home = report.preferred_relay,
            took_ms = report.took.as_millis() as u64,
            "netcheck report"
        );
        self.last = Some(report.clone());
        self.details = details;
        report
    }

    /// The local address IPv4 probes leave from: the source address the kernel would
    /// choose toward the first IPv4 target (a connected UDP socket sends nothing), with
    /// our socket's port.
    fn local_v4(&self, targets: &BTreeMap<(String, Family), SocketAddr>) -> Option<SocketAddr> {
        let port = self.v4.as_ref()?.local_addr().ok()?.port();
        let to = targets.values().find(|a| a.is_ipv4())?;
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        probe.connect(to).ok()?;
        Some(SocketAddr::new(probe.local_addr().ok()?.ip(), port))
    }
}

fn node_by_name<'a>(map: &'a RelayMap, name: &str) -> Option<&'a RelayNode> {
    map.regions
        .values()
        .flat_map(|r| r.nodes.iter())
        .find(|n| n.name == name)
}

/// The STUN address of every (node, family) the plan uses: `STUNTestIP`, the fixed
/// `IPv4`/`IPv6`, or a DNS lookup of `HostName` (one second at most).
async fn resolve_targets(
    map: &RelayMap,
    probes: &[&Probe],
) -> BTreeMap<(String, Family), SocketAddr> {
    let mut out = BTreeMap::new();
    for p in probes {
        let key = (p.node.clone(), p.family);
        if out.contains_key(&key) {
            continue;
        }
        let Some(node) = node_by_name(map, &p.node) else {
            continue;
        };
        let Some(port) = node.stun_port() else {
            continue;
        };
        let want_v4 = p.family == Family::V4;
        let ip: Option<IpAddr> = if !node.stun_test_ip.is_empty() {
            node.stun_test_ip
                .parse::<IpAddr>()
                .ok()
                .filter(|ip| ip.is_ipv4() == want_v4)
        } else {
            let fixed = if want_v4 {
                match node.ipv4_addr() {
                    NodeAddr::Fixed(ip) => Some(Some(IpAddr::V4(ip))),
                    NodeAddr::Disabled => Some(None),
                    NodeAddr::Resolve => None,
                }
            } else {
                match node.ipv6_addr() {
                    NodeAddr::Fixed(ip) => Some(Some(IpAddr::V6(ip))),
                    NodeAddr::Disabled => Some(None),
                    NodeAddr::Resolve => None,
                }
            };
            match fixed {
                Some(ip) => ip,
                None => tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::lookup_host((node.host_name.as_str(), port)),
                )
                .await
                .ok()
                .and_then(|r| r.ok())
                .and_then(|mut addrs| addrs.find(|a| a.is_ipv4() == want_v4))
                .map(|a| a.ip()),
            }
        };
        if let Some(ip) = ip {
            out.insert(key, SocketAddr::new(ip, port));
        }
    }
    out
}

/// HTTPS latency of every measurable region that has a relay (not STUN-only) node and
/// no latency yet, all at once.
async fn https_latencies(map: &RelayMap, report: &Report, timeout: Duration) -> Vec<HttpsCheck> {
    let mut set = tokio::task::JoinSet::new();
    for region in map.regions.values() {
        if region.no_measure_no_home
            || region.avoid
            || report.region_latency.contains_key(&region.region_id)
        {
            continue;
        }
        let Some(node) = region.nodes.iter().find(|n| !n.stun_only) else {
            continue;
        };
        let target = relay::client::RelayTarget::from_node(node);
        let (id, name) = (region.region_id, node.name.clone());
        set.spawn(async move {
            let result = relay::client::latency_check(&target, timeout)
                .await
                .map(|(d, _)| d)
                .map_err(|e| e.to_string());
            HttpsCheck {
                region: id,
                node: name,
                result,
            }
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(c) = r {
            out.push(c);
        }
    }
    out.sort_by_key(|c| c.region);
    out
}

async fn captive_detect(map: &RelayMap, home: i32, timeout: Duration) -> Option<bool> {
    crate::captive::detect(map, home, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fixed_port_gets_both_families() {
        // Find a free port, then ask for it: the IPv6 socket must not collide with the
        // IPv4 one on the same port (it did while it was dual-stack).
        let port = std::net::UdpSocket::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let nc = Netchecker::bind(port, None).await.unwrap();
        assert_eq!(nc.v4.as_ref().unwrap().local_addr().unwrap().port(), port);
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            let v6 = nc.v6.as_ref().expect("an IPv6 socket beside the IPv4 one");
            assert_eq!(v6.local_addr().unwrap().port(), port);
        }
    }
}
