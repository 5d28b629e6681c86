//! The engine: one task owning the data plane. It applies each netmap (peers added,
//! removed, updated without dropping their WireGuard sessions), reads IP packets from the
//! TUN device and sends them to their peer on the path disco chose, demultiplexes what
//! arrives on the UDP socket and from relays (STUN → netcheck, disco → path selection,
//! WireGuard → decrypt → TUN), runs netcheck on a schedule and pushes endpoint and
//! home-region changes to control.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use control::dial::ControlUrl;
use control::session::{ControlSession, SessionConfig, SessionState};
use netcheck::{Netchecker, PortMapper, Report, StunInbox};
use proto::netmap::NetMap;
use proto::tailcfg::Hostinfo;
use proto::{DiscoPrivate, NodePrivate, RegionId};
use rand::Rng as _;
use relay::client::RelayEvent;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::api::{PingError, Query};
use crate::ipv6::Ipv6Support;
use crate::node::core::{ApiPingError, Node};
use crate::node::demux::{classify, Kind};
use crate::node::outbox::Run;
use crate::node::peers::MAX_PEERS;
use crate::relays::Relays;
use crate::sock::{self, RecvBuffers, UdpIo};
use crate::tundev::{RecvBatch, SendBatch, TunDevice, BATCH};
use proto::localapi::PingVia;

/// Capability version we advertise (Headscale needs ≥ 113).
pub const CAP_VERSION: u16 = 113;
/// WireGuard timers are driven this often while packets flow…
const WG_TICK: Duration = Duration::from_millis(250);
/// …and this often once no packet has come or gone for [`IDLE_AFTER`] (WireGuard's own
/// timers count in seconds; an idle device should not wake four times a second).
const WG_IDLE_TICK: Duration = Duration::from_secs(1);
const IDLE_AFTER: Duration = Duration::from_secs(10);
/// Local addresses are compared this often to notice a network change.
const NETMON_INTERVAL: Duration = Duration::from_secs(2);
/// Idle relay connections are looked for this often.
const RELAY_CLEANUP: Duration = Duration::from_secs(15);
/// Bounded queues between the I/O tasks and the engine.
const QUEUE: usize = 1024;
/// Quick re-measurements of our endpoints because a direct path went quiet are at least
/// this far apart (many peers going quiet at once is one event: our NAT moved us).
const RESTUN_MIN_INTERVAL: Duration = Duration::from_secs(2);

/// How the daemon was asked to run. Its `Debug` form leaves out the pre-auth key.
#[derive(Clone)]
pub struct Config {
    pub login_server: ControlUrl,
    pub auth_key: Option<String>,
    pub hostname: String,
    pub state_dir: PathBuf,
    pub port: u16,
    pub tun_name: String,
    /// The local API's Unix socket.
    pub socket: PathBuf,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("login_server", &self.login_server)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .field("hostname", &self.hostname)
            .field("state_dir", &self.state_dir)
            .field("port", &self.port)
            .field("tun_name", &self.tun_name)
            .field("socket", &self.socket)
            .finish()
    }
}

/// Shared, read-mostly view of when relay regions were last heard from (for netcheck's
/// home-region hysteresis, which runs in another task).
type HeardMap = Arc<Mutex<BTreeMap<i32, Instant>>>;

/// Runs agentd until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (keys, created) = crate::state::load_or_create(&cfg.state_dir)?;
    if created {
        tracing::info!(dir = %cfg.state_dir.display(), node = %keys.node.public().short(), "new device: keys created");
    }
    let disco = DiscoPrivate::generate();
    let sock = Arc::new(
        sock::bind_v4(cfg.port).with_context(|| format!("binding UDP port {}", cfg.port))?,
    );
    let port = sock.local_addr()?.port();
    // IPv6 beside IPv4, on the same port where it is free; a host without IPv6 runs
    // on IPv4 alone.
    let mut ipv6 = crate::ipv6::probe_host();
    let v6 = ipv6.attempt("binding the IPv6 UDP socket", || bind_v6_io(port));
    if let Ipv6Support::Off(why) = &ipv6 {
        tracing::info!(%why, "IPv6 off on this host: IPv4 only (no IPv6 tunnel address, routes or UDP socket)");
    }
    let port6 = v6
        .as_ref()
        .and_then(|(s, _)| s.local_addr().ok())
        .map(|a| a.port());
    tracing::info!(port, ?port6, node = %keys.node.public().short(), "agentd starting");

    let session_cfg = SessionConfig {
        url: cfg.login_server.clone(),
        machine: keys.machine.clone(),
        node: keys.node.clone(),
        disco: disco.public(),
        hostinfo: Hostinfo {
            hostname: cfg.hostname.clone(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            ipn_version: env!("CARGO_PKG_VERSION").into(),
            net_info: None,
        },
        endpoints: Vec::new(),
        auth_key: cfg.auth_key.clone(),
        version: CAP_VERSION,
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(30),
    };

    let udp = Arc::new(UdpIo::new(Arc::clone(&sock)).context("setting up the UDP socket")?);
    let mut engine = Engine::new(
        keys.node.clone(),
        disco,
        Arc::clone(&sock),
        udp,
        v6,
        port,
        session_cfg,
    );
    engine.ipv6 = ipv6;
    engine.run(cfg, shutdown).await
}

/// The IPv6 UDP socket on `port` (or any port when that one is taken), with its
/// batched I/O.
fn bind_v6_io(port: u16) -> std::io::Result<(Arc<UdpSocket>, Arc<UdpIo>)> {
    let s = Arc::new(sock::bind_v6(port)?);
    let io = UdpIo::new(Arc::clone(&s))?;
    Ok((s, Arc::new(io)))
}

/// A batch of datagrams from a socket reader, with their senders.
type Datagrams = Vec<(Vec<u8>, SocketAddr)>;

type ApiWaiter = (
    Instant,
    tokio::sync::oneshot::Sender<Result<proto::localapi::PingResult, crate::api::PingError>>,
);

/// `agentctl ping`s in flight at most.
const MAX_API_PINGS: usize = 64;
/// An unanswered `agentctl ping` is forgotten after this long.
const API_PING_FORGET: Duration = Duration::from_secs(30);

struct Engine {
    /// The data plane's decisions: peers, WireGuard, paths (the pure core).
    node: Node,
    /// Our keys, for the fresh node made when the device goes down.
    me: NodePrivate,
    disco: DiscoPrivate,
    sock: Arc<UdpSocket>,
    udp: Arc<UdpIo>,
    /// The IPv6 socket, when the host has IPv6, and its port.
    sock6: Option<(Arc<UdpSocket>, Arc<UdpIo>)>,
    port6: Option<u16>,
    /// Whether the tunnel has IPv6 (off on hosts without it).
    ipv6: Ipv6Support,
    /// The reader of the IPv6 socket (replaced when IPv6 comes on later).
    udp6_reader: Option<AbortOnDrop>,
    /// What a socket reader needs, kept for an IPv6 socket made later: where STUN
    /// answers go, and the engine's datagram queue.
    stun_inbox: Option<StunInbox>,
    udp_tx: Option<mpsc::Sender<Datagrams>>,
    /// A direct path went quiet: measure our endpoints again (at most every
    /// [`RESTUN_MIN_INTERVAL`]).
    restun_wanted: bool,
    last_restun: Option<Instant>,
    /// Hands netcheck the IPv6 socket when it changes.
    netcheck_v6: watch::Sender<Option<Arc<UdpSocket>>>,
    port: u16,
    /// The control session; None while `agentctl down` holds the device down.
    session: Option<ControlSession>,
    session_cfg: SessionConfig,
    relays: Relays,
    relay_rx: mpsc::Receiver<(RegionId, RelayEvent)>,
    tun: Option<Arc<TunDevice>>,
    tun_write: SendBatch,
    heard: HeardMap,
    /// The home region control was told of.
    reported_home: Option<RegionId>,
    /// Updates for control not handed over yet (see `push_to_control`).
    pending_endpoints: Option<Vec<String>>,
    pending_home: Option<RegionId>,
    control_url: String,
    /// `agentctl ping`s waiting for their pong: sent at, reply, peer.
    api_waiters: BTreeMap<disco::TxId, ApiWaiter>,
    control_state: SessionState,
    last_report: Option<Report>,
    netmap: Option<Arc<NetMap>>,
}

impl Engine {
    fn new(
        me: NodePrivate,
        disco: DiscoPrivate,
        sock: Arc<UdpSocket>,
        udp: Arc<UdpIo>,
        sock6: Option<(Arc<UdpSocket>, Arc<UdpIo>)>,
        port: u16,
        session_cfg: SessionConfig,
    ) -> Self {
        let session = Some(ControlSession::spawn(session_cfg.clone()));
        let (relays, relay_rx) = Relays::new(me.clone());
        let mut node = Node::new(me.clone(), disco.clone(), Instant::now());
        node.out.udp.set_max_segments(
            udp.max_segments(),
            sock6.as_ref().map_or(1, |(_, io)| io.max_segments()),
        );
        node.set_ipv6(true, sock6.is_some());
        Engine {
            node,
            me,
            disco,
            udp,
            port6: sock6
                .as_ref()
                .and_then(|(s, _)| s.local_addr().ok())
                .map(|a| a.port()),
            netcheck_v6: watch::channel(sock6.as_ref().map(|(s, _)| Arc::clone(s))).0,
            sock6,
            ipv6: Ipv6Support::On,
            udp6_reader: None,
            restun_wanted: false,
            last_restun: None,
            stun_inbox: None,
            udp_tx: None,
            sock,
            port,
            session,
            session_cfg,
            relays,
            relay_rx,
            tun: None,
            tun_write: SendBatch::default(),
            heard: Arc::default(),
            reported_home: None,
            pending_endpoints: None,
            pending_home: None,
            control_url: String::new(),
            api_waiters: BTreeMap::new(),
            control_state: SessionState::Connecting,
            last_report: None,
            netmap: None,
        }
    }

    async fn run(
        &mut self,
        cfg: Config,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let u = &cfg.login_server;
        self.control_url = format!(
            "{}://{}:{}",
            if u.tls { "https" } else { "http" },
            u.host,
            u.port
        );
        let (api_tx, mut api_rx) = mpsc::channel::<Query>(16);
        let _api = crate::api::serve(&cfg.socket, api_tx)?;
        tracing::info!(socket = %cfg.socket.display(), "local API listening");
        // netcheck, in its own task, on the shared sockets.
        let (report_tx, mut report_rx) = mpsc::channel::<Report>(4);
        let (map_tx, map_rx) = watch::channel(None::<proto::relaymap::RelayMap>);
        let portmapper = PortMapper::new();
        portmapper.map(self.port);
        let mut portmap_ext = portmapper.external();
        // netcheck does not wait for the port-mapping probe: the engine's own mapper
        // reports the mapped address when (and if) the router grants one.
        let mut nc = Netchecker::with_sockets(
            Some(Arc::clone(&self.sock)),
            self.sock6.as_ref().map(|(s, _)| Arc::clone(s)),
            None,
        );
        // The socket readers: STUN answers to netcheck, the rest to the engine.
        let (udp_tx, mut udp_rx) = mpsc::channel::<Datagrams>(QUEUE / 16);
        let _udp_guard = AbortOnDrop::new(tokio::spawn(read_udp(
            Arc::clone(&self.udp),
            nc.inbox(),
            udp_tx.clone(),
        )));
        self.udp6_reader = self.sock6.as_ref().map(|(_, io)| {
            AbortOnDrop::new(tokio::spawn(read_udp(
                Arc::clone(io),
                nc.inbox(),
                udp_tx.clone(),
            )))
        });
        self.stun_inbox = Some(nc.inbox());
        self.udp_tx = Some(udp_tx);
        let mut netcheck_v6 = self.netcheck_v6.subscribe();
        let heard = Arc::clone(&self.heard);
        // Asks for a report now: `true` a full one (a network change, `agentctl
        // netcheck`), `false` a quick one (a direct path went quiet: did our NAT move us?).
        let (renetcheck_tx, mut renetcheck_rx) = mpsc::channel::<bool>(1);
        let netcheck_task = tokio::spawn(async move {
            let mut map_rx = map_rx;
            loop {
                if netcheck_v6.has_changed().unwrap_or(false) {
                    nc.set_v6(netcheck_v6.borrow_and_update().clone());
                }
                let map = loop {
                    if let Some(m) = map_rx.borrow_and_update().clone() {
                        break m;
                    }
                    if map_rx.changed().await.is_err() {
                        return;
                    }
                };
                let report = {
                    let heard = Arc::clone(&heard);
                    nc.report(&map, move |r| {
                        heard.lock().ok().and_then(|h| h.get(&r).copied())
                    })
                    .await
                };
                if report_tx.send(report).await.is_err() {
                    return;
                }
                let wait = Duration::from_millis(rand::thread_rng().gen_range(20_000..26_000));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    Some(full) = renetcheck_rx.recv() => {
                        if full {
                            nc.force_full();
                        }
                    }
                    r = map_rx.changed() => { if r.is_err() { return; } }
                }
            }
        });
        let _netcheck_guard = AbortOnDrop::new(netcheck_task);

        let mut netmap_rx = self.session.as_ref().map(|s| s.netmap.clone());
        let mut state_rx = self.session.as_ref().map(|s| s.state.clone());
        let (tun_in_tx, mut tun_in_rx) = mpsc::channel::<Vec<Vec<u8>>>(QUEUE / 16);
        let (tun_err_tx, mut tun_err_rx) = mpsc::channel::<()>(1);
        let mut tun_tasks: Vec<AbortOnDrop> = Vec::new();
        let mut next_wg_tick = tokio::time::Instant::now() + WG_TICK;
        let mut next_cleanup = tokio::time::Instant::now() + RELAY_CLEANUP;
        let mut next_netmon = tokio::time::Instant::now() + NETMON_INTERVAL;
        let mut netcheck_waiters: Vec<
            tokio::sync::oneshot::Sender<proto::localapi::NetcheckResult>,
        > = Vec::new();
        let mut local_net = crate::interfaces::network_fingerprint(
            &crate::interfaces::local_addresses(self.sock6.is_some()),
        );

        loop {
            let next_peer = self
                .node
                .next_peer_wake()
                .map(tokio::time::Instant::from_std);
            let wake = [
                Some(next_wg_tick),
                Some(next_cleanup),
                Some(next_netmon),
                next_peer,
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_wg_tick);
            tokio::select! {
                _ = &mut shutdown => {
                    tracing::info!("shutting down");
                    portmapper.release(Duration::from_secs(2)).await;
                    return Ok(());
                }
                _ = tokio::time::sleep_until(wake) => {}
                Some(batch) = tun_in_rx.recv() => {
                    let now = Instant::now();
                    for pkt in &batch {
                        self.node.handle_tun_packet(pkt, now);
                        self.carry_out(now).await;
                    }
                }
                Some(()) = tun_err_rx.recv() => {
                    if self.tun.as_ref().is_some_and(|t| !t.still_there()) {
                        self.recreate_tun(&cfg, &mut tun_tasks, &tun_in_tx, &tun_err_tx)?;
                    } else {
                        tracing::warn!("reading the TUN device failed");
                    }
                }
                Some(batch) = udp_rx.recv() => {
                    let now = Instant::now();
                    for (pkt, from) in &batch {
                        self.node.handle_udp(pkt, *from, now);
                        self.carry_out(now).await;
                    }
                }
                Some((region, ev)) = self.relay_rx.recv() => self.on_relay_event(region, ev).await,
                ok = changed(&mut netmap_rx) => {
                    if !ok {
                        anyhow::bail!("control session stopped");
                    }
                    let nm = netmap_rx.as_mut().and_then(|r| r.borrow_and_update().clone());
                    if let Some(nm) = nm {
                        if let Some(m) = &nm.relay_map {
                            if map_tx.borrow().as_ref() != Some(m) {
                                map_tx.send_replace(Some(m.clone()));
                                self.relays.set_map(m.clone());
                                self.node.set_relay_regions(
                                    m.regions.keys().filter_map(|r| RegionId::new(*r)),
                                );
                            }
                        }
                        if self.tun.is_none() {
                            if let Some(tun) = self.create_tun(&cfg, &nm)? {
                                let tun = Arc::new(tun);
                                tun_tasks.push(spawn_tun_reader(Arc::clone(&tun), tun_in_tx.clone(), tun_err_tx.clone()));
                                self.tun = Some(tun);
                            }
                        }
                        self.apply_netmap(&nm);
                        self.netmap = Some(nm);
                    }
                }
                ok = changed(&mut state_rx) => {
                    if !ok {
                        anyhow::bail!("control session stopped");
                    }
                    let Some(st) = state_rx.as_mut().map(|r| r.borrow_and_update().clone()) else {
                        continue;
                    };
                    self.control_state = st.clone();
                    match st {
                        SessionState::NeedsLogin { url } => {
                            tracing::warn!(%url, "to add this device, open this URL and log in");
                        }
                        SessionState::Refused { reason } => {
                            tracing::error!(%reason, "the control server refused this device");
                        }
                        SessionState::Connected => tracing::info!("connected to the control server"),
                        _ => {}
                    }
                }
                Some(report) = report_rx.recv() => {
                    self.on_report(&report, &portmap_ext.borrow().clone()).await;
                    if !netcheck_waiters.is_empty() {
                        let answer = proto::localapi::NetcheckResult {
                            report: serde_json::to_value(&report).unwrap_or_default(),
                            text: netcheck::text::format_report(
                                &report,
                                &netcheck::ReportDetails::default(),
                                self.relays.map(),
                                false,
                                &humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                                    .to_string(),
                            ),
                        };
                        for w in netcheck_waiters.drain(..) {
                            let _ = w.send(answer.clone());
                        }
                    }
                    self.last_report = Some(report);
                }
                Some(q) = api_rx.recv() => match q {
                    Query::Netcheck(tx) => {
                        // Answered by the next report, which this asks for now.
                        if netcheck_waiters.len() < 16 {
                            netcheck_waiters.push(tx);
                        }
                        let _ = renetcheck_tx.try_send(true);
                    }
                    Query::Down(tx) => {
                        if self.session.is_some() {
                            tracing::info!("going down (agentctl down): tunnel removed, disconnected from control");
                            tun_tasks.clear();
                            netmap_rx = None;
                            state_rx = None;
                            self.go_down();
                        }
                        let _ = tx.send(());
                    }
                    Query::Up(tx) => {
                        if self.session.is_none() {
                            tracing::info!("coming up (agentctl up)");
                            let s = ControlSession::spawn(self.session_cfg.clone());
                            netmap_rx = Some(s.netmap.clone());
                            state_rx = Some(s.state.clone());
                            self.session = Some(s);
                            let _ = renetcheck_tx.try_send(true);
                        }
                        let _ = tx.send(());
                    }
                    q => self.on_query(q),
                },
                r = portmap_ext.changed() => {
                    if r.is_ok() {
                        let ext = *portmap_ext.borrow_and_update();
                        if let Some(e) = ext {
                            tracing::info!(external = %e, "router mapped a port for us");
                        }
                        if let Some(rep) = self.last_report.clone() {
                            self.update_endpoints(&rep, &ext).await;
                        }
                    }
                }
            }
            let now = Instant::now();
            let t = tokio::time::Instant::now();
            let busy = now.saturating_duration_since(self.node.last_packet()) < IDLE_AFTER;
            if t >= next_wg_tick {
                if self.tun.as_ref().is_some_and(|t| !t.still_there()) {
                    self.recreate_tun(&cfg, &mut tun_tasks, &tun_in_tx, &tun_err_tx)?;
                }
                self.sync_heard();
                self.node.tick_wireguard(now);
                self.carry_out(now).await;
                next_wg_tick = t + if busy { WG_TICK } else { WG_IDLE_TICK };
            } else if busy && next_wg_tick > t + WG_TICK {
                // Packets again after a quiet spell: back to the short tick at once.
                next_wg_tick = t + WG_TICK;
            }
            if tokio::time::Instant::now() >= next_cleanup {
                self.relays.close_idle(now);
                next_cleanup = tokio::time::Instant::now() + RELAY_CLEANUP;
            }
            self.flush_tun().await;
            self.node.flush_stalled(now);
            self.node.drive_peers(now);
            self.carry_out_all(now).await;
            self.restun_wanted |= self.node.take_restun_wanted();
            if self.pending_endpoints.is_some() || self.pending_home.is_some() {
                self.push_to_control();
            }
            if self.restun_wanted
                && self
                    .last_restun
                    .is_none_or(|t| now.saturating_duration_since(t) >= RESTUN_MIN_INTERVAL)
            {
                // A direct path went quiet: if our NAT rebound, our public endpoint moved,
                // and peers must learn the new one now (see `update_endpoints`).
                self.restun_wanted = false;
                self.last_restun = Some(now);
                self.node.counters.restun_quiet_path += 1;
                let _ = renetcheck_tx.try_send(false);
            }
            if tokio::time::Instant::now() >= next_netmon {
                next_netmon = tokio::time::Instant::now() + NETMON_INTERVAL;
                // IPv6 switched on since it was found off counts as a network change.
                let v6_back = !self.ipv6.is_on()
                    && crate::ipv6::probe_host().is_on()
                    && self.try_ipv6_again();
                let addrs = crate::interfaces::local_addresses(self.sock6.is_some());
                let net = crate::interfaces::network_fingerprint(&addrs);
                if net != local_net || v6_back {
                    // The network changed: measure again now (a full report), ask the
                    // router for a mapping again, and look for direct paths anew. (New
                    // addresses within the same networks reach the endpoints with the
                    // next regular report.)
                    tracing::info!(?addrs, "network changed");
                    local_net = net;
                    let _ = renetcheck_tx.try_send(true);
                    portmapper.retry();
                    self.node.rediscover_all(now);
                }
            }
        }
    }

    /// Creates the TUN device with this node's addresses from `nm` (None: the netmap
    /// does not have our node yet). The IPv6 address is skipped on a host without IPv6,
    /// and a refusal of it turns IPv6 off instead of failing.
    fn create_tun(&mut self, cfg: &Config, nm: &NetMap) -> anyhow::Result<Option<TunDevice>> {
        let Some(me) = &nm.self_node else {
            return Ok(None);
        };
        let (v4, v6) = me.tunnel_addresses();
        let tun = TunDevice::create(&cfg.tun_name, v4)?;
        let mut with_v6 = None;
        if let (Some(a), true) = (v6, self.ipv6.is_on()) {
            match tun.add_v6(a) {
                Ok(()) => with_v6 = Some(a),
                Err(e) => {
                    self.ipv6 = Ipv6Support::from_error(&e.op, &e.source);
                    self.ipv6_went_off();
                }
            }
        }
        tracing::info!(
            dev = tun.name(),
            ?v4,
            v6 = ?with_v6,
            offload = tun.offload(),
            "TUN device up"
        );
        Ok(Some(tun))
    }

    /// The TUN device disappeared (`ip link del`): made again with its addresses (and
    /// so its routes). If that fails agentd stops with the reason, for the service
    /// manager to restart it.
    fn recreate_tun(
        &mut self,
        cfg: &Config,
        tun_tasks: &mut Vec<AbortOnDrop>,
        tun_in_tx: &mpsc::Sender<Vec<Vec<u8>>>,
        tun_err_tx: &mpsc::Sender<()>,
    ) -> anyhow::Result<()> {
        let name = self
            .tun
            .as_ref()
            .map(|t| t.name().to_string())
            .unwrap_or_default();
        tracing::warn!(dev = %name, "the TUN device disappeared: making it again");
        tun_tasks.clear();
        self.tun = None;
        self.node.out.tun.clear();
        self.tun_write = SendBatch::default();
        let nm = self.netmap.clone();
        let tun = nm
            .and_then(|nm| self.create_tun(cfg, &nm).transpose())
            .transpose()
            .and_then(|t| t.context("the netmap lost this node's addresses"))
            .with_context(|| {
                format!("the TUN device {name:?} was removed and could not be made again")
            })?;
        let tun = Arc::new(tun);
        tun_tasks.push(spawn_tun_reader(
            Arc::clone(&tun),
            tun_in_tx.clone(),
            tun_err_tx.clone(),
        ));
        self.tun = Some(tun);
        self.node.counters.tun_recreated += 1;
        Ok(())
    }

    /// IPv6 turned out to be off after start (the kernel refused the tunnel's IPv6
    /// address): the IPv6 socket goes too, and one line says so.
    fn ipv6_went_off(&mut self) {
        if let Ipv6Support::Off(why) = &self.ipv6 {
            tracing::info!(%why, "IPv6 off on this host: IPv4 only (no IPv6 tunnel address, routes or UDP socket)");
        }
        self.sock6 = None;
        self.port6 = None;
        self.udp6_reader = None;
        self.netcheck_v6.send_replace(None);
        self.sync_ipv6();
    }

    /// IPv6 was off and the host's settings now allow it: the IPv6 socket, its reader,
    /// netcheck's IPv6 probes and the tunnel's IPv6 address come back. True when it
    /// worked.
    fn try_ipv6_again(&mut self) -> bool {
        self.ipv6 = Ipv6Support::On;
        let Some(pair) = self
            .ipv6
            .attempt("binding the IPv6 UDP socket", || bind_v6_io(self.port))
        else {
            return false;
        };
        let v6 = self
            .netmap
            .as_ref()
            .and_then(|nm| nm.self_node.as_ref())
            .and_then(|me| me.tunnel_addresses().1);
        if let (Some(tun), Some(a)) = (&self.tun, v6) {
            if let Err(e) = tun.add_v6(a) {
                self.ipv6 = Ipv6Support::from_error(&e.op, &e.source);
                return false;
            }
        }
        self.port6 = pair.0.local_addr().ok().map(|a| a.port());
        if let (Some(inbox), Some(tx)) = (&self.stun_inbox, &self.udp_tx) {
            self.udp6_reader = Some(AbortOnDrop::new(tokio::spawn(read_udp(
                Arc::clone(&pair.1),
                inbox.clone(),
                tx.clone(),
            ))));
        }
        self.netcheck_v6.send_replace(Some(Arc::clone(&pair.0)));
        self.sock6 = Some(pair);
        self.sync_ipv6();
        tracing::info!(port6 = ?self.port6, "IPv6 is on now: IPv6 socket and tunnel address added");
        true
    }

    fn apply_netmap(&mut self, nm: &NetMap) {
        let now = Instant::now();
        for node in nm.peers.values() {
            tracing::debug!(peer = %node.key.short(), endpoints = ?node.endpoints, home = ?node.home_region(), disco = ?node.disco_key.map(|d| d.short()), "netmap peer");
        }
        let change = self.node.apply_netmap(nm.peers.values(), now);
        // Inbound packets may be for this device's own addresses (routes it serves join
        // them with subnet routing).
        let local = nm
            .self_node
            .as_ref()
            .map(|me| me.addresses.to_vec())
            .unwrap_or_default();
        match self.node.set_filter(nm.packet_filter.as_ref(), local) {
            Some(0) => tracing::info!(
                rules = self.node.filter().rule_count().0.unwrap_or(0),
                "packet filter in force"
            ),
            Some(skipped) => tracing::warn!(
                skipped,
                "the packet filter has rules agentd cannot read; they are not enforced (what they allow stays denied)"
            ),
            None => {}
        }
        for k in &change.added {
            let name = self.node.peers().get(k).map(|p| p.name()).unwrap_or("");
            tracing::info!(peer = %k.short(), %name, "peer added");
        }
        for k in &change.removed {
            tracing::info!(peer = %k.short(), "peer removed");
        }
        if change.over_limit > 0 {
            tracing::warn!(
                skipped = change.over_limit,
                limit = MAX_PEERS,
                "the network map has more peers than agentd keeps"
            );
        }
        if change.disco_conflicts > 0 {
            tracing::warn!("peers share a disco key; disco with them is ignored");
        }
        if change.rejected_prefixes > 0 {
            tracing::warn!(
                rejected = change.rejected_prefixes,
                "ignoring addresses or routes of peers that are not IP prefixes"
            );
        }
    }

    /// `agentctl down`: no control session, no TUN device, no peers, no relay
    /// connections. The socket and the netcheck task stay, ready for `agentctl up`.
    fn go_down(&mut self) {
        self.session = None;
        // A fresh node: no peers, sessions, paths, held packets or pending sends survive.
        self.node = Node::new(self.me.clone(), self.disco.clone(), Instant::now());
        self.sync_ipv6();
        self.node.set_relay_regions(
            self.relays
                .map()
                .regions
                .keys()
                .filter_map(|r| RegionId::new(*r)),
        );
        self.tun_write = SendBatch::default();
        self.tun = None;
        self.relays.close_all();
        self.reported_home = None;
        self.pending_endpoints = None;
        self.pending_home = None;
        self.netmap = None;
        self.control_state = SessionState::Connecting;
    }

    async fn on_report(&mut self, report: &Report, ext: &Option<std::net::SocketAddrV4>) {
        if self.session.is_none() {
            // Down: measure, but connect to nothing.
            return;
        }
        if let Some(home) = RegionId::new(report.preferred_relay) {
            if self.relays.home() != Some(home) {
                tracing::info!(region = %home, "home relay region");
                self.relays.set_home(home);
            }
        }
        self.report_home().await;
        self.update_endpoints(report, ext).await;
    }

    /// `agentctl ping`: one disco ping on the path data would take now (directly when
    /// there is a direct path, through the peer's relay otherwise; both while the direct
    /// path is unconfirmed). Counts as traffic, so it also starts path discovery.
    fn api_ping(
        &mut self,
        target: &str,
        tx: tokio::sync::oneshot::Sender<
            Result<proto::localapi::PingResult, crate::api::PingError>,
        >,
        now: Instant,
    ) {
        let Some(key) = self.node.peers().find(target) else {
            let _ = tx.send(Err(PingError::NoSuchPeer(format!(
                "no peer named or addressed {target:?}"
            ))));
            return;
        };
        self.api_waiters.retain(|_, w| {
            now.saturating_duration_since(w.0) < API_PING_FORGET && !w.1.is_closed()
        });
        if self.api_waiters.len() >= MAX_API_PINGS {
            let _ = tx.send(Err(PingError::NotYet("too many pings in flight".into())));
            return;
        }
        let tx_id: disco::TxId = rand::random();
        match self.node.api_ping(&key, tx_id, now) {
            Ok(()) => {
                self.api_waiters.insert(tx_id, (now, tx));
            }
            Err(ApiPingError::NoSuchPeer) => {}
            Err(ApiPingError::NoDiscoKey) => {
                let _ = tx.send(Err(PingError::NotYet(
                    "the peer has no disco key yet".into(),
                )));
            }
            Err(ApiPingError::NoPath) => {
                let _ = tx.send(Err(PingError::NotYet(
                    "no path to the peer yet (no relay, no direct address)".into(),
                )));
            }
        }
    }

    /// Answers `agentctl ping`s whose pongs arrived.
    fn answer_api_pings(&mut self, now: Instant) {
        while let Some((key, tx_id, via)) = self.node.out.api_pongs.pop_front() {
            let name = self
                .node
                .peers()
                .get(&key)
                .map(|p| p.name().trim_end_matches('.').to_string())
                .unwrap_or_default();
            let address = self
                .netmap
                .as_ref()
                .and_then(|nm| nm.peer_by_key(&key))
                .and_then(|n| n.addresses.first())
                .map(|a| a.addr().to_string())
                .unwrap_or_default();
            let Some((sent, tx)) = self.api_waiters.remove(&tx_id) else {
                continue;
            };
            let latency_ms = now.saturating_duration_since(sent).as_secs_f64() * 1000.0;
            let r = match via {
                crate::node::peer::Via::Udp(a) => proto::localapi::PingResult {
                    peer: name.clone(),
                    address: address.clone(),
                    via: PingVia::Direct,
                    endpoint: Some(a.to_string()),
                    latency_ms,
                    ..Default::default()
                },
                crate::node::peer::Via::Relay(r) => proto::localapi::PingResult {
                    peer: name.clone(),
                    address: address.clone(),
                    via: PingVia::Relay,
                    relay_region: Some(r.get()),
                    relay_region_name: self.region_name(r),
                    latency_ms,
                    ..Default::default()
                },
            };
            let _ = tx.send(Ok(r));
        }
    }

    fn on_query(&mut self, q: Query) {
        let now = Instant::now();
        match q {
            Query::Status(tx) => {
                let _ = tx.send(self.status(now));
            }
            Query::Filter(tx) => {
                let _ = tx.send(crate::status::filter(&self.node));
            }
            Query::Ping(target, tx) => self.api_ping(&target, tx, now),
            // Handled in the run loop (it owns the netcheck task and the session's
            // receivers).
            Query::Netcheck(_) | Query::Up(_) | Query::Down(_) => {}
            Query::Whois(ip, tx) => {
                let p = self
                    .node
                    .peers()
                    .route(ip)
                    .and_then(|k| self.node.peers().get(&k))
                    .map(|p| self.status_view().peer(p, now));
                let _ = tx.send(p);
            }
        }
    }

    fn region_name(&self, region: RegionId) -> Option<String> {
        crate::status::region_name(self.relays.map(), region)
    }

    /// What status is rendered from.
    fn status_view(&self) -> crate::status::View<'_> {
        crate::status::View {
            node: &self.node,
            netmap: self.netmap.as_deref(),
            relays: &self.relays,
            control_url: &self.control_url,
            control_state: &self.control_state,
            running: self.session.is_some(),
            last_report: self.last_report.as_ref(),
            tun: self.tun.as_ref().map(|t| t.name()),
            ipv6: &self.ipv6,
        }
    }

    fn status(&self, now: Instant) -> proto::localapi::Status {
        self.status_view().render(now)
    }

    /// Hands the latest endpoints and home region to the control session without waiting:
    /// while control is unreachable its queue fills, and the data path must not stall on
    /// it. What could not be handed over is kept (only the latest value) and retried on
    /// the next pass of the loop.
    fn push_to_control(&mut self) {
        let Some(s) = &self.session else {
            return;
        };
        if let Some(e) = self.pending_endpoints.take() {
            if !s.try_set_endpoints(e.clone()) {
                self.pending_endpoints = Some(e);
            }
        }
        if let Some(h) = self.pending_home.take() {
            if !s.try_set_home_region(h) {
                self.pending_home = Some(h);
            }
        }
    }

    /// Tells control our home region once we are connected there: a peer that learns
    /// it then finds us on that relay (a packet sent to a relay before we are connected
    /// to it is dropped there).
    async fn report_home(&mut self) {
        let Some(home) = self.relays.home() else {
            return;
        };
        if self.reported_home != Some(home) && self.relays.connected(home) {
            self.reported_home = Some(home);
            self.pending_home = Some(home);
            self.push_to_control();
        }
    }

    async fn update_endpoints(&mut self, report: &Report, ext: &Option<std::net::SocketAddrV4>) {
        let mut eps: Vec<SocketAddr> = Vec::new();
        if let Some(e) = ext {
            eps.push(SocketAddr::V4(*e));
        }
        if let Some(g) = report.global_v4 {
            eps.push(g);
            // A hard NAT may still keep our port for some destinations.
            if report.mapping_varies_by_dest_ip == Some(true) {
                eps.push(SocketAddr::new(g.ip(), self.port));
            }
        }
        let port6 = self.port6;
        if let (Some(g), Some(_)) = (report.global_v6, port6) {
            eps.push(g);
        }
        for ip in crate::interfaces::local_addresses(port6.is_some()) {
            let port = if ip.is_ipv6() { port6 } else { Some(self.port) };
            if let Some(port) = port {
                eps.push(SocketAddr::new(ip, port));
            }
        }
        let mut dedup = Vec::new();
        for e in eps {
            if !dedup.contains(&e) {
                dedup.push(e);
            }
        }
        if dedup != self.node.endpoints() {
            tracing::info!(endpoints = ?dedup, "endpoints changed");
            self.node.set_endpoints(dedup.clone(), Instant::now());
            self.pending_endpoints = Some(dedup.iter().map(|e| e.to_string()).collect());
            self.push_to_control();
        }
    }

    /// Carries out what the node asked for: single datagrams and relay sends at once,
    /// complete runs of datagrams, decrypted packets once a batch has gathered; answers
    /// the `agentctl ping`s whose pongs came.
    async fn carry_out(&mut self, now: Instant) {
        while let Some((to, d)) = self.node.out.direct.pop_front() {
            if let Some(sock) = self.sock_for(to) {
                let _ = sock.send_to(&d, to).await;
            }
        }
        while let Some((region, key, d)) = self.node.out.relay.pop_front() {
            self.relays.send(region, key, d, now);
        }
        while let Some(run) = self.node.out.udp.pop_ready() {
            self.send_run(run).await;
        }
        if self.node.out.tun.len() >= BATCH {
            self.flush_tun().await;
        }
        if !self.node.out.api_pongs.is_empty() {
            self.answer_api_pings(now);
        }
    }

    /// Carries out everything, the open run of datagrams and the packets for the TUN
    /// device included (at the end of a batch of work).
    async fn carry_out_all(&mut self, now: Instant) {
        self.carry_out(now).await;
        while let Some(run) = self.node.out.udp.pop_any() {
            self.send_run(run).await;
        }
        self.flush_tun().await;
    }

    /// Sends a run of datagrams in one call.
    async fn send_run(&mut self, run: Run) {
        if let Some(io) = self.io_for(run.to) {
            if let Err(e) = io.send_segments(run.to, &run.buf, run.segment).await {
                self.node.counters.udp_send_errors += 1;
                tracing::debug!(to = %run.to, error = %e, "UDP send failed");
            }
        }
        self.node.out.udp.recycle(run.buf);
    }

    /// The socket for datagrams to `to` (None: an IPv6 address on a host without IPv6).
    fn sock_for(&self, to: SocketAddr) -> Option<Arc<UdpSocket>> {
        match to {
            SocketAddr::V4(_) => Some(Arc::clone(&self.sock)),
            SocketAddr::V6(_) => self.sock6.as_ref().map(|(s, _)| Arc::clone(s)),
        }
    }

    /// The batched I/O for datagrams to `to`.
    fn io_for(&self, to: SocketAddr) -> Option<Arc<UdpIo>> {
        match to {
            SocketAddr::V4(_) => Some(Arc::clone(&self.udp)),
            SocketAddr::V6(_) => self.sock6.as_ref().map(|(_, io)| Arc::clone(io)),
        }
    }

    /// Tells the node what the host has now: IPv6 in the tunnel, an IPv6 socket, and
    /// the sockets' limits for runs of datagrams.
    fn sync_ipv6(&mut self) {
        self.node.set_ipv6(self.ipv6.is_on(), self.sock6.is_some());
        self.node.out.udp.set_max_segments(
            self.udp.max_segments(),
            self.sock6.as_ref().map_or(1, |(_, io)| io.max_segments()),
        );
    }

    async fn on_relay_event(&mut self, region: RegionId, ev: RelayEvent) {
        let now = Instant::now();
        self.relays.note_event(region, &ev, now);
        if matches!(ev, RelayEvent::Connected { .. }) {
            self.report_home().await;
            self.node.relay_connected(region, now);
        }
        if let RelayEvent::Packet { src, payload } = ev {
            self.node.handle_relay(region, src, &payload, now);
        }
        self.carry_out(now).await;
    }

    /// Writes the decrypted packets gathered so far to the TUN device.
    async fn flush_tun(&mut self) {
        if self.node.out.tun.is_empty() {
            return;
        }
        if let Some(tun) = &self.tun {
            if let Err(e) = tun
                .send_batch(&mut self.tun_write, &self.node.out.tun)
                .await
            {
                self.node.counters.tun_write_errors += 1;
                tracing::debug!(error = %e, "TUN write failed");
            }
        }
        self.node.out.tun.clear();
    }

    /// Copies when each relay region was last heard from into the map netcheck reads:
    /// at every WireGuard tick, not under a lock per relayed packet.
    fn sync_heard(&self) {
        if let Ok(mut h) = self.heard.lock() {
            for region in self.relays.map().regions.keys() {
                if let Some(t) = RegionId::new(*region).and_then(|r| self.relays.last_heard(r)) {
                    h.insert(*region, t);
                }
            }
        }
    }
}

/// Waits for a change on `rx`; never resolves while there is no receiver (down).
async fn changed<T>(rx: &mut Option<watch::Receiver<T>>) -> bool {
    match rx {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// A task that stops when its handle drops.
type AbortOnDrop = tokio_util::task::AbortOnDropHandle<()>;

/// Reads the TUN device into the engine's queue. A failed read is reported on `errors`
/// (the engine looks whether the device is gone) and retried after a pause.
fn spawn_tun_reader(
    tun: Arc<TunDevice>,
    tx: mpsc::Sender<Vec<Vec<u8>>>,
    errors: mpsc::Sender<()>,
) -> AbortOnDrop {
    AbortOnDrop::new(tokio::spawn(async move {
        let mut batch = RecvBatch::default();
        loop {
            match tun.recv_batch(&mut batch).await {
                Ok(_) => {
                    let packets: Vec<Vec<u8>> = batch.packets().map(<[u8]>::to_vec).collect();
                    if tx.send(packets).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "TUN read failed");
                    let _ = errors.try_send(());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

/// Reads batches from one shared socket: STUN answers go to netcheck's inbox, everything
/// else to the engine.
async fn read_udp(io: Arc<UdpIo>, inbox: StunInbox, to_engine: mpsc::Sender<Datagrams>) {
    let mut bufs = RecvBuffers::default();
    loop {
        match io.recv(&mut bufs).await {
            Ok(_) => {
                let mut batch = Vec::new();
                for (pkt, from) in bufs.datagrams() {
                    if classify(pkt) == Kind::Stun {
                        inbox.deliver(pkt, from);
                    } else {
                        batch.push((pkt.to_vec(), from));
                    }
                }
                if !batch.is_empty() && to_engine.send(batch).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::trace!(error = %e, "UDP receive error"),
        }
    }
}
