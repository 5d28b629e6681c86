//! Per-peer path selection (shared/PROTOCOLS.md §3), as a state machine with no I/O and
//! no clock: the caller feeds what happened (`set_endpoints`, `on_ping`, `on_pong`,
//! `on_call_me_maybe`, `on_data_sent`, `handle_timeout`) with the time, and drains what
//! to do (`poll_action`: send a ping, send call-me-maybe, the path changed) and when to
//! call again (`poll_timeout`). `send_targets` answers "where does a packet go now".
//!
//! Choosing follows tailscaled — relay first, a direct path after its first pong,
//! heartbeats to keep it trusted, back to the relay when pongs stop — with a cost that
//! keeps the choice steady: latency is the median of recent pongs, a challenger needs a
//! clear margin, and a candidate whose pings went unanswered is penalised for a while.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::defaults::*;
use crate::message::TxId;

/// Where a disco message arrived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Udp(SocketAddr),
    /// Through a relay of this region.
    Relay(i32),
}

/// The path packets to the peer take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Relay,
    Direct(SocketAddr),
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Relay => f.write_str("relay"),
            Path::Direct(a) => write!(f, "direct {a}"),
        }
    }
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a disco ping with this transaction ID to `to` over UDP.
    SendPing { to: SocketAddr, tx_id: TxId },
    /// Send a call-me-maybe with our current endpoints through the peer's relay.
    SendCallMeMaybe,
    /// The best path changed.
    PathChanged(Path),
    /// The trusted direct path went quiet while data went out, and was pinged: if the
    /// cause is our NAT forgetting or moving our mapping, our public endpoint has
    /// changed, and the caller should measure it again now (re-STUN) rather than at the
    /// next regular report.
    DirectPathQuiet,
}

/// Where a packet goes now (§3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendTargets {
    pub udp: Option<SocketAddr>,
    pub relay: bool,
}

/// Why the path is what it is, for `agentctl status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathReason {
    /// Direct; `trusted` = a pong within the trust window (no relay copy).
    Direct {
        addr: SocketAddr,
        latency: Duration,
        trusted: bool,
    },
    /// Relayed: the peer has no endpoints to try.
    NoEndpoints,
    /// Relayed: pings are out, no answer yet (since when the first went out).
    Discovering { since: Instant },
    /// Relayed: pings to every candidate went unanswered (the first loss was at `since`).
    PingsUnanswered { since: Instant },
    /// Relayed: the direct path stopped answering at `at`.
    DirectLost { at: Instant },
    /// Nothing sent yet, so nothing tried.
    Idle,
}

impl PathReason {
    /// A sentence a person can read; `now` turns instants into ages.
    pub fn describe(&self, now: Instant) -> String {
        let ago = |t: &Instant| format!("{:.0?} ago", now.saturating_duration_since(*t));
        match self {
            PathReason::Direct {
                addr,
                latency,
                trusted,
            } => format!(
                "direct {addr}, {:.1} ms{}",
                latency.as_secs_f64() * 1000.0,
                if *trusted {
                    ""
                } else {
                    " (unconfirmed: relay used in parallel)"
                }
            ),
            PathReason::NoEndpoints => "relay: the peer has no endpoints to try".into(),
            PathReason::Discovering { since } => {
                format!("relay: looking for a direct path (since {})", ago(since))
            }
            PathReason::PingsUnanswered { since } => {
                format!("relay: pings unanswered since {}", ago(since))
            }
            PathReason::DirectLost { at } => format!("relay: direct path lost {}", ago(at)),
            PathReason::Idle => "relay: idle, no direct path tried yet".into(),
        }
    }
}

/// Counters of one peer's path selection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounters {
    pub pings_sent: u64,
    pub pongs_received: u64,
    pub pings_timed_out: u64,
    /// Pongs whose transaction ID we never sent (or already expired).
    pub unknown_pongs: u64,
    /// Candidates refused because the peer already had the maximum.
    pub candidates_dropped: u64,
    /// Actions dropped because the caller did not drain them.
    pub actions_dropped: u64,
    pub path_changes: u64,
    /// Pings sent because a trusted path went quiet while data went out.
    pub silence_probes: u64,
    /// Times a quiet path lost its trust early because the ping went unanswered.
    pub silence_distrusted: u64,
}

impl PathCounters {
    /// Every counter by name.
    pub fn named(&self) -> [(&'static str, u64); 9] {
        [
            ("pings_sent", self.pings_sent),
            ("pongs_received", self.pongs_received),
            ("pings_timed_out", self.pings_timed_out),
            ("unknown_pongs", self.unknown_pongs),
            ("candidates_dropped", self.candidates_dropped),
            ("actions_dropped", self.actions_dropped),
            ("path_changes", self.path_changes),
            ("silence_probes", self.silence_probes),
            ("silence_distrusted", self.silence_distrusted),
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sources {
    netmap: bool,
    call_me_maybe: bool,
    /// Last ping received from this address (a runtime-learned candidate).
    pinged_us: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Candidate {
    sources: Sources,
    last_ping_sent: Option<Instant>,
    pongs: VecDeque<Duration>,
    last_pong: Option<Instant>,
    penalty_until: Option<Instant>,
}

impl Candidate {
    fn new() -> Self {
        Candidate {
            sources: Sources {
                netmap: false,
                call_me_maybe: false,
                pinged_us: None,
            },
            last_ping_sent: None,
            pongs: VecDeque::new(),
            last_pong: None,
            penalty_until: None,
        }
    }

    fn latency(&self) -> Option<Duration> {
        if self.pongs.is_empty() {
            return None;
        }
        let mut recent: Vec<Duration> = self
            .pongs
            .iter()
            .rev()
            .take(LATENCY_WINDOW)
            .copied()
            .collect();
        recent.sort();
        Some(recent[recent.len() / 2])
    }

    fn penalised(&self, now: Instant) -> bool {
        self.penalty_until.is_some_and(|t| now < t)
    }

    fn keep(&self, now: Instant) -> bool {
        self.sources.netmap
            || self.sources.call_me_maybe
            || self
                .sources
                .pinged_us
                .is_some_and(|t| now.saturating_duration_since(t) < SESSION_ACTIVE_TIMEOUT)
    }
}

#[derive(Debug, Clone, Copy)]
struct Best {
    addr: SocketAddr,
    latency: Duration,
}

/// Bonus points of an address kind (§3.5): loopback, link-local, private, IPv6.
fn bonus(a: &SocketAddr) -> i64 {
    let ip = a.ip();
    let mut p = if ip.is_loopback() {
        50
    } else if match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xFFC0) == 0xFE80,
    } {
        30
    } else if match ip {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xFE00) == 0xFC00,
    } {
        20
    } else {
        0
    };
    if ip.is_ipv6() {
        p += 10;
    }
    p
}

/// Points of `a` and `b` against each other: the faster gets its percentage advantage,
/// each gets its address bonus and loses the failure penalty if penalised.
fn points(a: (SocketAddr, Duration, bool), b: (SocketAddr, Duration, bool)) -> (i64, i64) {
    let (mut pa, mut pb) = (0i64, 0i64);
    let (la, lb) = (a.1.as_nanos().max(1), b.1.as_nanos().max(1));
    if la < lb {
        pa += 100 - (100 * la / lb) as i64;
    } else if lb < la {
        pb += 100 - (100 * lb / la) as i64;
    }
    pa += bonus(&a.0);
    pb += bonus(&b.0);
    if a.2 {
        pa -= FAILURE_PENALTY_POINTS;
    }
    if b.2 {
        pb -= FAILURE_PENALTY_POINTS;
    }
    (pa, pb)
}

/// Path selection for one peer.
#[derive(Debug)]
pub struct PathState {
    candidates: BTreeMap<SocketAddr, Candidate>,
    outstanding: BTreeMap<TxId, (SocketAddr, Instant)>,
    best: Option<Best>,
    trust_until: Option<Instant>,
    has_relay: bool,
    last_data: Option<Instant>,
    /// When something last came from the peer over the best path (a pong, a ping, an
    /// authenticated WireGuard packet)…
    last_heard: Option<Instant>,
    /// …and the first ping to the best path after that (if it is older than
    /// `last_heard`, it was answered or overtaken: there is none).
    quiet_ping: Option<Instant>,
    heartbeat_at: Option<Instant>,
    last_full_ping: Option<Instant>,
    discovering_since: Option<Instant>,
    unanswered_since: Option<Instant>,
    lost_at: Option<Instant>,
    last_cmm: Option<Instant>,
    cmm_retry: Duration,
    actions: VecDeque<Action>,
    rng: StdRng,
    pub counters: PathCounters,
}

impl PathState {
    /// A fresh state; `seed` seeds the transaction IDs.
    pub fn new(seed: u64, _now: Instant) -> Self {
        PathState {
            candidates: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            best: None,
            trust_until: None,
            has_relay: false,
            last_data: None,
            last_heard: None,
            quiet_ping: None,
            heartbeat_at: None,
            last_full_ping: None,
            discovering_since: None,
            unanswered_since: None,
            lost_at: None,
            last_cmm: None,
            cmm_retry: CMM_RETRY_MIN,
            actions: VecDeque::new(),
            rng: StdRng::seed_from_u64(seed),
            counters: PathCounters::default(),
        }
    }

    fn push(&mut self, a: Action) {
        if self.actions.len() >= MAX_ACTIONS {
            self.counters.actions_dropped += 1;
            return;
        }
        self.actions.push_back(a);
    }

    fn candidate_mut(&mut self, addr: SocketAddr) -> Option<&mut Candidate> {
        if !self.candidates.contains_key(&addr) {
            if self.candidates.len() >= MAX_CANDIDATES {
                self.counters.candidates_dropped += 1;
                return None;
            }
            self.candidates.insert(addr, Candidate::new());
        }
        self.candidates.get_mut(&addr)
    }

    /// The peer's endpoints from the netmap (replacing the previous netmap list).
    pub fn set_endpoints(&mut self, endpoints: &[SocketAddr], now: Instant) {
        for c in self.candidates.values_mut() {
            c.sources.netmap = false;
        }
        for e in endpoints {
            if let Some(c) = self.candidate_mut(*e) {
                c.sources.netmap = true;
            }
        }
        self.prune(now);
    }

    /// Whether the peer can be reached through a relay at all (it has a home region).
    pub fn set_relay(&mut self, has_relay: bool) {
        self.has_relay = has_relay;
    }

    fn trusted(&self, now: Instant) -> bool {
        self.best.is_some() && self.trust_until.is_some_and(|t| now < t)
    }

    /// Where a packet goes now: trusted direct → UDP only; untrusted direct → both;
    /// none → relay.
    pub fn send_targets(&self, now: Instant) -> SendTargets {
        match self.best {
            Some(b) if self.trusted(now) => SendTargets {
                udp: Some(b.addr),
                relay: false,
            },
            Some(b) => SendTargets {
                udp: Some(b.addr),
                relay: true,
            },
            None => SendTargets {
                udp: None,
                relay: true,
            },
        }
    }

    /// The current path.
    pub fn path(&self) -> Path {
        match self.best {
            Some(b) => Path::Direct(b.addr),
            None => Path::Relay,
        }
    }

    /// Why the path is what it is.
    pub fn reason(&self, now: Instant) -> PathReason {
        if let Some(b) = self.best {
            return PathReason::Direct {
                addr: b.addr,
                latency: b.latency,
                trusted: self.trusted(now),
            };
        }
        if self.candidates.is_empty() {
            return PathReason::NoEndpoints;
        }
        if let Some(at) = self.lost_at {
            return PathReason::DirectLost { at };
        }
        if let Some(since) = self.unanswered_since {
            return PathReason::PingsUnanswered { since };
        }
        match self.discovering_since {
            Some(since) => PathReason::Discovering { since },
            None => PathReason::Idle,
        }
    }

    fn send_ping(&mut self, to: SocketAddr, now: Instant) {
        if self.outstanding.len() >= MAX_OUTSTANDING_PINGS {
            // Drop the oldest: it is the most likely to be lost anyway.
            if let Some((&tx, _)) = self.outstanding.iter().min_by_key(|(_, (_, t))| *t) {
                self.outstanding.remove(&tx);
            }
        }
        let tx_id: TxId = self.rng.gen();
        self.outstanding.insert(tx_id, (to, now));
        if self.best.is_some_and(|b| b.addr == to)
            && self
                .quiet_ping
                .is_none_or(|q| self.last_heard.is_some_and(|h| q < h))
        {
            self.quiet_ping = Some(now);
        }
        if let Some(c) = self.candidates.get_mut(&to) {
            c.last_ping_sent = Some(now);
        }
        self.counters.pings_sent += 1;
        self.discovering_since.get_or_insert(now);
        self.push(Action::SendPing { to, tx_id });
    }

    /// Pings every candidate not pinged in the last 5 s; if any went out and the peer is
    /// reachable through a relay, asks it (by call-me-maybe) to ping us back.
    fn discover(&mut self, now: Instant) {
        let due: Vec<SocketAddr> = self
            .candidates
            .iter()
            .filter(|(_, c)| {
                c.last_ping_sent
                    .is_none_or(|t| now.saturating_duration_since(t) >= DISCO_PING_INTERVAL)
            })
            .map(|(a, _)| *a)
            .collect();
        for a in &due {
            self.send_ping(*a, now);
        }
        self.last_full_ping = Some(now);
        if !due.is_empty() {
            self.send_call_me_maybe(now);
        }
    }

    fn send_call_me_maybe(&mut self, now: Instant) {
        // One per instant: a retry and a discovery round due together ask only once.
        if self.has_relay && self.last_cmm != Some(now) {
            self.last_cmm = Some(now);
            self.push(Action::SendCallMeMaybe);
        }
    }

    /// While data flows and no pong came back, call-me-maybe is repeated on a short
    /// backoff (1, 2, 4 s): the first one may have raced the peer's relay connection.
    fn retry_call_me_maybe(&mut self, now: Instant) {
        if self.best.is_some() || self.candidates.is_empty() || !self.has_relay {
            self.cmm_retry = CMM_RETRY_MIN;
            return;
        }
        if let Some(t) = self.last_cmm {
            if now.saturating_duration_since(t) >= self.cmm_retry {
                self.send_call_me_maybe(now);
                self.cmm_retry = (self.cmm_retry * 2).min(DISCO_PING_INTERVAL);
            }
        }
    }

    /// Something changed that may let discovery succeed now (our relay connection came
    /// up, the peer's endpoints or home region changed): if traffic is flowing and there
    /// is no trusted path, ping every candidate and call-me-maybe again at once.
    pub fn rediscover(&mut self, now: Instant) {
        let active = self
            .last_data
            .is_some_and(|d| now.saturating_duration_since(d) < SESSION_ACTIVE_TIMEOUT);
        if !active || self.trusted(now) {
            return;
        }
        for c in self.candidates.values_mut() {
            c.last_ping_sent = None;
        }
        self.cmm_retry = CMM_RETRY_MIN;
        self.discover(now);
    }

    fn want_full_ping(&self, now: Instant) -> bool {
        match (self.best, self.last_full_ping) {
            (None, _) | (_, None) => true,
            _ if !self.trusted(now) => true,
            (Some(b), Some(t)) => {
                b.latency > GOOD_ENOUGH_LATENCY
                    && now.saturating_duration_since(t) >= UPGRADE_INTERVAL
            }
        }
    }

    /// A data packet was sent to the peer: keeps the session active and, while there is
    /// no trusted direct path, starts discovery.
    /// Returns whether it started discovery (pings to send now); otherwise at most a
    /// timer changed, which [`PathState::poll_timeout`] reports.
    pub fn on_data_sent(&mut self, now: Instant) -> bool {
        self.last_data = Some(now);
        if self.heartbeat_at.is_none() {
            self.heartbeat_at = Some(now + HEARTBEAT_INTERVAL);
        }
        if self.trusted(now) {
            return false;
        }
        self.discover(now);
        self.retry_call_me_maybe(now);
        true
    }

    /// A ping arrived. From UDP, its source becomes a candidate (for 45 s after the
    /// last ping from it) and, while we have no trusted path, is pinged back (at most
    /// every 500 ms) so both NATs open. The caller answers the ping with a pong itself.
    pub fn on_ping(&mut self, via: Via, _tx_id: TxId, now: Instant) {
        let Via::Udp(from) = via else { return };
        if self.best.is_some_and(|b| b.addr == from) {
            self.last_heard = Some(now);
        }
        let is_new = !self.candidates.contains_key(&from);
        let Some(c) = self.candidate_mut(from) else {
            return;
        };
        c.sources.pinged_us = Some(now);
        let since = c.last_ping_sent.map(|t| now.saturating_duration_since(t));
        // Our last ping to it is still unanswered: it probably died at the peer's NAT,
        // which this ping has just opened.
        let unanswered = match (c.last_ping_sent, c.last_pong) {
            (Some(s), Some(p)) => p < s,
            (Some(_), None) => true,
            _ => false,
        };
        let trusted = self.trusted(now);
        let due = match since {
            None => true,
            Some(_) if !trusted && unanswered => true,
            Some(d) if !trusted => d >= PING_BACK_INTERVAL,
            Some(d) => is_new && d >= DISCO_PING_INTERVAL,
        };
        if due {
            self.send_ping(from, now);
        }
    }

    /// A pong arrived from `from` for `tx_id`; `_src` is how the peer saw us.
    pub fn on_pong(&mut self, from: SocketAddr, tx_id: TxId, _src: SocketAddr, now: Instant) {
        let Some((to, sent)) = self.outstanding.remove(&tx_id) else {
            self.counters.unknown_pongs += 1;
            return;
        };
        // A pong may come back from another address than the one pinged (a NAT in
        // between rewrote it); the address we pinged is the one that works for sending.
        let _ = from;
        self.counters.pongs_received += 1;
        let latency = now.saturating_duration_since(sent);
        let Some(c) = self.candidates.get_mut(&to) else {
            return;
        };
        c.last_pong = Some(now);
        if c.pongs.len() >= PONG_HISTORY {
            c.pongs.pop_front();
        }
        c.pongs.push_back(latency);
        let cand_latency = c.latency().unwrap_or(latency);
        let cand_penalised = c.penalised(now);
        self.unanswered_since = None;

        let switch = match self.best {
            None => true,
            Some(b) if b.addr == to => false,
            Some(_) if !self.trusted(now) => true,
            Some(b) => {
                let best_pen = self
                    .candidates
                    .get(&b.addr)
                    .is_some_and(|c| c.penalised(now));
                let (pc, pb) = points(
                    (to, cand_latency, cand_penalised),
                    (b.addr, b.latency, best_pen),
                );
                pc - pb >= SWITCH_MIN_POINTS
            }
        };
        if switch {
            self.best = Some(Best {
                addr: to,
                latency: cand_latency,
            });
            self.lost_at = None;
            self.counters.path_changes += 1;
            self.push(Action::PathChanged(Path::Direct(to)));
        }
        if let Some(b) = &mut self.best {
            if b.addr == to {
                b.latency = cand_latency;
                self.trust_until = Some(now + TRUST_UDP_ADDR);
                self.last_heard = Some(now);
            }
        }
    }

    /// An authenticated packet (WireGuard) arrived from the peer over UDP, not through a
    /// relay: the direct path works, inwards at least.
    pub fn on_heard_direct(&mut self, now: Instant) {
        self.last_heard = Some(now);
    }

    /// The silence check's deadline, and whether the quiet path has been pinged since it
    /// went quiet (then the deadline ends its trust; otherwise it is when to ping it).
    /// `None` unless the path is trusted and data went out since anything came back. A
    /// deadline at or past the trust's end is none: the trust ends by itself then (and a
    /// deadline `handle_timeout` would not act on would come back forever).
    fn silence_deadline(&self) -> Option<(Instant, bool)> {
        let (Some(b), Some(trust), Some(heard), Some(sent)) =
            (self.best, self.trust_until, self.last_heard, self.last_data)
        else {
            return None;
        };
        if sent <= heard {
            return None;
        }
        let (due, pinged) = match self.quiet_ping.filter(|q| *q >= heard) {
            Some(q) => (q + SILENCE_PROBE_WAIT.max(b.latency * 4), true),
            None => (heard + SILENCE_PROBE_AFTER, false),
        };
        (due < trust).then_some((due, pinged))
    }

    /// Pings the quiet trusted path, or ends its trust if the ping went unanswered (see
    /// [`SILENCE_PROBE_AFTER`]).
    fn check_silence(&mut self, now: Instant) {
        let (Some((due, pinged)), Some(b)) = (self.silence_deadline(), self.best) else {
            return;
        };
        if now < due {
            return;
        }
        if pinged {
            // The trust ended at the deadline (so the deadline is past it: no repeat).
            self.trust_until = Some(due);
            self.counters.silence_distrusted += 1;
        } else {
            self.counters.silence_probes += 1;
            self.send_ping(b.addr, now);
            self.push(Action::DirectPathQuiet);
        }
    }

    /// Our own endpoints changed (a new public port after a NAT rebinding, a new
    /// network): while traffic flows the peer must learn them now, even over a path
    /// still trusted — its packets to our old endpoint are being dropped. Sends a
    /// call-me-maybe at once (the peer then pings our new endpoints, opening both NATs)
    /// and pings every candidate again.
    pub fn our_endpoints_changed(&mut self, now: Instant) {
        let active = self
            .last_data
            .is_some_and(|d| now.saturating_duration_since(d) < SESSION_ACTIVE_TIMEOUT);
        if !active {
            return;
        }
        let all: Vec<SocketAddr> = self.candidates.keys().copied().collect();
        for a in all {
            self.send_ping(a, now);
        }
        self.last_full_ping = Some(now);
        self.cmm_retry = CMM_RETRY_MIN;
        self.send_call_me_maybe(now);
    }

    /// A call-me-maybe arrived (through the relay, checked by the caller): its endpoints
    /// replace the previous call-me-maybe candidates and are all pinged now.
    pub fn on_call_me_maybe(&mut self, endpoints: &[SocketAddr], now: Instant) {
        for c in self.candidates.values_mut() {
            c.sources.call_me_maybe = false;
        }
        for e in endpoints {
            if let IpAddr::V6(v6) = e.ip() {
                if (v6.segments()[0] & 0xFFC0) == 0xFE80 {
                    continue;
                }
            }
            if let Some(c) = self.candidate_mut(*e) {
                c.sources.call_me_maybe = true;
            }
        }
        self.prune(now);
        let all: Vec<SocketAddr> = self.candidates.keys().copied().collect();
        for a in all {
            self.send_ping(a, now);
        }
        self.last_full_ping = Some(now);
    }

    fn prune(&mut self, now: Instant) {
        let best = self.best.map(|b| b.addr);
        self.candidates
            .retain(|a, c| c.keep(now) || Some(*a) == best);
    }

    fn lose_best(&mut self, now: Instant) {
        if self.best.take().is_some() {
            self.trust_until = None;
            self.lost_at = Some(now);
            self.counters.path_changes += 1;
            self.push(Action::PathChanged(Path::Relay));
        }
    }

    /// Runs the timers due at `now`: lost pings, heartbeats, candidate expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.check_silence(now);
        // Lost pings: the candidate is penalised; a lost ping on an untrusted best path
        // clears it (traffic is on the relay alone until something answers).
        let lost: Vec<(TxId, SocketAddr)> = self
            .outstanding
            .iter()
            .filter(|(_, (_, t))| now.saturating_duration_since(*t) >= PING_TIMEOUT)
            .map(|(tx, (a, _))| (*tx, *a))
            .collect();
        for (tx, addr) in lost {
            self.outstanding.remove(&tx);
            self.counters.pings_timed_out += 1;
            if let Some(c) = self.candidates.get_mut(&addr) {
                let answered_since = c
                    .last_pong
                    .is_some_and(|p| now.saturating_duration_since(p) < PING_TIMEOUT);
                if !answered_since {
                    c.penalty_until = Some(now + FAILURE_PENALTY_TIME);
                }
            }
            if self.best.is_none() {
                self.unanswered_since.get_or_insert(now);
            }
            if self.best.is_some_and(|b| b.addr == addr) && !self.trusted(now) {
                self.lose_best(now);
            }
        }
        // A best path whose trust ran out and which keeps not answering: once it has been
        // untrusted for a full ping timeout, give it up.
        if let (Some(_), Some(t)) = (self.best, self.trust_until) {
            if now >= t + PING_TIMEOUT {
                self.lose_best(now);
            }
        }
        if self
            .last_data
            .is_some_and(|d| now.saturating_duration_since(d) < SESSION_ACTIVE_TIMEOUT)
        {
            self.retry_call_me_maybe(now);
        } else {
            // Idle (or called late, past the active window): no retry is pending, so
            // no retry deadline may stay behind. The next data send starts over.
            self.last_cmm = None;
            self.cmm_retry = CMM_RETRY_MIN;
        }
        // Heartbeat.
        if let Some(at) = self.heartbeat_at {
            if now >= at {
                let active = self
                    .last_data
                    .is_some_and(|d| now.saturating_duration_since(d) < SESSION_ACTIVE_TIMEOUT);
                if !active {
                    self.heartbeat_at = None;
                } else {
                    if let Some(b) = self.best {
                        self.send_ping(b.addr, now);
                    }
                    if self.want_full_ping(now) {
                        self.discover(now);
                    }
                    self.heartbeat_at = Some(now + HEARTBEAT_INTERVAL);
                }
            }
        }
        self.prune(now);
    }

    /// When [`PathState::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = self.heartbeat_at;
        let mut consider = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
        if let Some((due, _)) = self.silence_deadline() {
            consider(due);
        }
        if let Some(oldest) = self.outstanding.values().map(|(_, s)| *s).min() {
            consider(oldest + PING_TIMEOUT);
        }
        if let (Some(_), Some(tu)) = (self.best, self.trust_until) {
            consider(tu + PING_TIMEOUT);
        }
        // The call-me-maybe retry, under exactly the conditions `handle_timeout` retries
        // in (no direct path, something to ping, a relay, the session still active):
        // a deadline that `handle_timeout` would not act on would come back forever.
        if let (None, true, Some(c), Some(d)) =
            (self.best, self.has_relay, self.last_cmm, self.last_data)
        {
            let due = c + self.cmm_retry;
            if !self.candidates.is_empty() && due < d + SESSION_ACTIVE_TIMEOUT {
                consider(due);
            }
        }
        let best = self.best.map(|b| b.addr);
        for (a, c) in &self.candidates {
            // The best path is kept past its expiry (`prune`), so it has no deadline here.
            if Some(*a) == best {
                continue;
            }
            if let (Some(p), false, false) = (
                c.sources.pinged_us,
                c.sources.netmap,
                c.sources.call_me_maybe,
            ) {
                consider(p + SESSION_ACTIVE_TIMEOUT);
            }
        }
        t
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Current candidates (address, latency if answered), for status output.
    pub fn candidates(&self) -> Vec<(SocketAddr, Option<Duration>)> {
        self.candidates
            .iter()
            .map(|(a, c)| (*a, c.latency()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Drains actions; returns the pings (to, tx) and whether a call-me-maybe was asked.
    fn drain(p: &mut PathState) -> (Vec<(SocketAddr, TxId)>, bool, Vec<Path>) {
        let (mut pings, mut cmm, mut changes) = (Vec::new(), false, Vec::new());
        while let Some(a) = p.poll_action() {
            match a {
                Action::SendPing { to, tx_id } => pings.push((to, tx_id)),
                Action::SendCallMeMaybe => cmm = true,
                Action::PathChanged(x) => changes.push(x),
                Action::DirectPathQuiet => {}
            }
        }
        (pings, cmm, changes)
    }

    fn peer(eps: &[&str], t0: Instant) -> PathState {
        let mut p = PathState::new(1, t0);
        p.set_relay(true);
        let eps: Vec<SocketAddr> = eps.iter().map(|e| addr(e)).collect();
        p.set_endpoints(&eps, t0);
        p
    }

    /// Answers every ping in `pings` to `ok` addresses after `rtt`.
    fn answer(
        p: &mut PathState,
        pings: &[(SocketAddr, TxId)],
        ok: &[(SocketAddr, Duration)],
        sent: Instant,
    ) {
        for (to, tx) in pings {
            if let Some((_, rtt)) = ok.iter().find(|(a, _)| a == to) {
                p.on_pong(*to, *tx, addr("192.0.2.200:1"), sent + *rtt);
            }
        }
    }

    #[test]
    fn relay_first_then_direct_after_first_pong() {
        let t0 = Instant::now();
        let mut p = peer(&["198.51.100.2:41641"], t0);
        assert_eq!(
            p.send_targets(t0),
            SendTargets {
                udp: None,
                relay: true
            }
        );
        assert_eq!(p.reason(t0), PathReason::Idle);
        assert!(p.on_data_sent(t0), "no trusted path: discovery starts");
        let (pings, cmm, _) = drain(&mut p);
        assert_eq!(pings.len(), 1);
        assert!(cmm, "discovery also asks the peer to ping back");
        assert!(matches!(p.reason(t0), PathReason::Discovering { .. }));
        // Still relay until the pong.
        assert_eq!(p.send_targets(t0 + ms(10)).udp, None);
        answer(&mut p, &pings, &[(addr("198.51.100.2:41641"), ms(20))], t0);
        let (_, _, changes) = drain(&mut p);
        assert_eq!(changes, vec![Path::Direct(addr("198.51.100.2:41641"))]);
        let now = t0 + ms(21);
        assert_eq!(
            p.send_targets(now),
            SendTargets {
                udp: Some(addr("198.51.100.2:41641")),
                relay: false
            }
        );
        assert!(p
            .reason(now)
            .describe(now)
            .starts_with("direct 198.51.100.2:41641"));
        // Data on the trusted path asks for nothing to be sent.
        assert!(!p.on_data_sent(now));
        assert_eq!(drain(&mut p).0.len(), 0);
    }

    #[test]
    fn heartbeat_keeps_path_trusted() {
        let t0 = Instant::now();
        let ep = addr("198.51.100.2:41641");
        let mut p = peer(&["198.51.100.2:41641"], t0);
        settle(&mut p, &[(ep, ms(10))], t0);
        // Traffic for 30 s, the peer answers every heartbeat: never untrusted.
        let mut now = t0;
        while now < t0 + Duration::from_secs(30) {
            now += ms(100);
            p.on_data_sent(now);
            run_due(&mut p, now);
            let (pings, _, changes) = drain(&mut p);
            assert!(changes.is_empty(), "path changed at {:?}", now - t0);
            answer(&mut p, &pings, &[(ep, ms(10))], now);
            assert_eq!(
                p.send_targets(now + ms(10)),
                SendTargets {
                    udp: Some(ep),
                    relay: false
                }
            );
        }
        assert!(p.counters.pings_sent >= 9, "heartbeats every 3 s");
    }

    #[test]
    fn pongs_stop_falls_back_to_relay_within_trust_window() {
        let t0 = Instant::now();
        let ep = addr("198.51.100.2:41641");
        let mut p = peer(&["198.51.100.2:41641"], t0);
        settle(&mut p, &[(ep, ms(10))], t0);
        let last_pong = t0 + ms(10);
        // From now on nothing answers, traffic keeps flowing.
        let mut now = t0;
        let mut relay_again = None;
        let mut lost = None;
        while now < t0 + Duration::from_secs(20) {
            now += ms(100);
            p.on_data_sent(now);
            run_due(&mut p, now);
            let (_, _, changes) = drain(&mut p);
            if relay_again.is_none() && p.send_targets(now).relay {
                relay_again = Some(now);
            }
            if changes.contains(&Path::Relay) {
                lost = Some(now);
            }
        }
        let relay_again = relay_again.expect("relay used again");
        assert!(relay_again - last_pong <= TRUST_UDP_ADDR + ms(100));
        assert!(lost.is_some(), "the dead path is given up");
        assert!(matches!(p.reason(now), PathReason::DirectLost { .. }));
        assert_eq!(
            p.send_targets(now),
            SendTargets {
                udp: None,
                relay: true
            }
        );
    }

    /// A direct path carrying traffic both ways, then blackholed at `cut`: returns the
    /// state and the time (after `cut`) the relay was first used again, the time the
    /// path was given up, and how often `handle_timeout` ran.
    fn blackhole_after(cut: Duration, until: Duration) -> (PathState, Duration, Duration, usize) {
        let t0 = Instant::now();
        let ep = addr("198.51.100.2:41641");
        let mut p = peer(&["198.51.100.2:41641"], t0);
        settle(&mut p, &[(ep, ms(10))], t0);
        let (mut relay_at, mut lost_at, mut runs) = (None, None, 0);
        let mut now = t0;
        while now < t0 + until {
            now += ms(10);
            p.on_data_sent(now);
            let alive = now < t0 + cut;
            if alive {
                // The peer's packets (TCP acknowledgements, say) come back directly.
                p.on_heard_direct(now);
            }
            runs += usize::from(run_due(&mut p, now));
            let (pings, _, changes) = drain(&mut p);
            if alive {
                answer(&mut p, &pings, &[(ep, ms(10))], now);
                assert!(
                    !p.send_targets(now).relay,
                    "relay used while the path works"
                );
            } else {
                if relay_at.is_none() && p.send_targets(now).relay {
                    relay_at = Some(now - (t0 + cut));
                }
                if changes.contains(&Path::Relay) {
                    lost_at.get_or_insert(now - (t0 + cut));
                }
            }
        }
        (
            p,
            relay_at.expect("relay used again"),
            lost_at.expect("path given up"),
            runs,
        )
    }

    #[test]
    fn quiet_path_is_probed_and_distrusted_long_before_the_trust_window_ends() {
        // Cut at several points of the heartbeat rhythm.
        for cut_ms in [10_000, 10_700, 11_400, 12_100, 12_900] {
            let (p, relay_at, lost_at, runs) = blackhole_after(ms(cut_ms), ms(cut_ms + 15_000));
            // Quiet for 1.5 s, then a ping unanswered for 1 s (a heartbeat that went
            // out during the quiet counts as that ping): relay copies within 2.5 s.
            assert!(
                relay_at <= SILENCE_PROBE_AFTER + SILENCE_PROBE_WAIT + ms(20),
                "cut at {cut_ms} ms: relay again after {relay_at:?}"
            );
            // The path itself is given up when that ping is lost (5 s).
            assert!(
                lost_at <= SILENCE_PROBE_AFTER + PING_TIMEOUT + ms(20),
                "cut at {cut_ms} ms: given up after {lost_at:?}"
            );
            assert_eq!(p.counters.silence_distrusted, 1);
            // The timer ran a bounded number of times (no deadline that stays due).
            assert!(runs < 200, "handle_timeout ran {runs} times");
        }
    }

    #[test]
    fn traffic_coming_back_keeps_the_path_trusted_without_extra_pings() {
        // Never cut: 30 s of traffic both ways.
        let t0 = Instant::now();
        let ep = addr("198.51.100.2:41641");
        let mut p = peer(&["198.51.100.2:41641"], t0);
        settle(&mut p, &[(ep, ms(10))], t0);
        let mut now = t0;
        while now < t0 + Duration::from_secs(30) {
            now += ms(10);
            p.on_data_sent(now);
            p.on_heard_direct(now);
            run_due(&mut p, now);
            let (pings, _, _) = drain(&mut p);
            answer(&mut p, &pings, &[(ep, ms(10))], now);
            assert!(!p.send_targets(now).relay);
        }
        assert_eq!(p.counters.silence_probes, 0);
        assert!(p.counters.pings_sent <= 12, "{:?}", p.counters);
    }

    #[test]
    fn one_way_traffic_is_probed_but_stays_trusted_while_pongs_come() {
        // Data goes out, nothing comes back but the pongs.
        let t0 = Instant::now();
        let ep = addr("198.51.100.2:41641");
        let mut p = peer(&["198.51.100.2:41641"], t0);
        settle(&mut p, &[(ep, ms(10))], t0);
        let mut now = t0;
        let mut runs = 0;
        while now < t0 + Duration::from_secs(30) {
            now += ms(10);
            p.on_data_sent(now);
            runs += usize::from(run_due(&mut p, now));
            let (pings, _, changes) = drain(&mut p);
            assert!(changes.is_empty());
            answer(&mut p, &pings, &[(ep, ms(10))], now);
            assert!(!p.send_targets(now + ms(10)).relay, "at {:?}", now - t0);
        }
        // A ping about every 1.5 s instead of every 3 s; never distrusted.
        assert!(p.counters.silence_probes >= 10, "{:?}", p.counters);
        assert!(p.counters.pings_sent <= 30, "{:?}", p.counters);
        assert_eq!(p.counters.silence_distrusted, 0);
        assert!(runs < 100, "handle_timeout ran {runs} times");
    }

    #[test]
    fn a_late_pong_restores_the_trust_a_quiet_path_lost() {
        let t0 = Instant::now();
        let ep = addr("198.51.100.2:41641");
        let mut p = peer(&["198.51.100.2:41641"], t0);
        settle(&mut p, &[(ep, ms(10))], t0);
        let mut probe = None;
        let mut now = t0;
        while now < t0 + Duration::from_secs(4) {
            now += ms(10);
            p.on_data_sent(now);
            run_due(&mut p, now);
            let (pings, _, _) = drain(&mut p);
            probe = probe.or(pings.first().copied());
        }
        assert!(
            p.send_targets(now).relay,
            "distrusted while the pong is late"
        );
        // The pong of that ping arrives late (a delay spike, not a dead path).
        let (to, tx) = probe.expect("the quiet path was pinged");
        p.on_pong(to, tx, addr("192.0.2.200:1"), now);
        assert_eq!(
            p.send_targets(now),
            SendTargets {
                udp: Some(ep),
                relay: false
            }
        );
        assert_eq!(p.path(), Path::Direct(ep));
    }

    /// Two peers on a simulated network where each can reach the other only after it
    /// has itself sent to it (two port-restricted NATs): call-me-maybe makes both ping.
    #[test]
    fn call_me_maybe_makes_both_sides_ping() {
        let t0 = Instant::now();
        let a_addr = addr("198.51.100.1:41641");
        let b_addr = addr("198.51.100.2:41641");
        let mut a = peer(&["198.51.100.2:41641"], t0);
        let mut b = peer(&["198.51.100.1:41641"], t0);
        let mut opened_a = false; // a's NAT has sent to b
        let mut opened_b = false;
        a.on_data_sent(t0);
        let (pings_a, cmm, _) = drain(&mut a);
        assert!(cmm);
        opened_a = opened_a || !pings_a.is_empty();
        // a's pings die at b's NAT (b never sent to a). The call-me-maybe reaches b via
        // the relay; b pings a's endpoints at once and does not call back.
        assert!(!opened_b);
        let now = t0 + ms(30);
        b.on_call_me_maybe(&[a_addr], now);
        let (pings_b, cmm_b, _) = drain(&mut b);
        assert!(!cmm_b, "no call-me-maybe in reply to one");
        assert_eq!(
            pings_b.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![a_addr]
        );
        opened_b = true;
        // b's ping passes a's NAT (a has sent to b): a answers; b gets its direct path.
        assert!(opened_a && opened_b);
        a.on_ping(Via::Udp(b_addr), pings_b[0].1, now + ms(10));
        b.on_pong(a_addr, pings_b[0].1, b_addr, now + ms(20));
        assert_eq!(b.path(), Path::Direct(a_addr));
        // a learned b's address from the ping and pinged it back; b answers that.
        let (pings_a2, _, _) = drain(&mut a);
        let back = pings_a2
            .iter()
            .find(|(t, _)| *t == b_addr)
            .expect("a pings b back");
        a.on_pong(b_addr, back.1, a_addr, now + ms(30));
        assert_eq!(a.path(), Path::Direct(b_addr));
    }

    /// Runs the timers if one is due; returns whether it did.
    fn run_due(p: &mut PathState, now: Instant) -> bool {
        let due = p.poll_timeout().is_some_and(|t| t <= now);
        if due {
            p.handle_timeout(now);
        }
        due
    }

    fn settle(p: &mut PathState, eps: &[(SocketAddr, Duration)], t0: Instant) -> Instant {
        p.on_data_sent(t0);
        let (pings, _, _) = drain(p);
        answer(p, &pings, eps, t0);
        drain(p);
        t0 + ms(100)
    }

    #[test]
    fn slightly_faster_candidate_does_not_steal_path() {
        let t0 = Instant::now();
        let a = addr("198.51.100.2:41641");
        let b = addr("203.0.113.9:41641");
        let mut p = peer(&["198.51.100.2:41641"], t0);
        let mut now = settle(&mut p, &[(a, ms(20))], t0);
        assert_eq!(p.path(), Path::Direct(a));
        // b appears and keeps answering 5 % faster (then 10 %): the path stays on a.
        for rtt_b in [19, 19, 18, 18, 18, 18, 18, 18].map(ms) {
            p.on_call_me_maybe(&[b], now);
            let (pings, _, _) = drain(&mut p);
            answer(&mut p, &pings, &[(a, ms(20)), (b, rtt_b)], now);
            let (_, _, changes) = drain(&mut p);
            assert!(changes.is_empty(), "{changes:?}");
            now += Duration::from_secs(6);
        }
        assert_eq!(p.path(), Path::Direct(a));
    }

    #[test]
    fn much_faster_candidate_takes_path() {
        let t0 = Instant::now();
        let a = addr("198.51.100.2:41641");
        let b = addr("203.0.113.9:41641");
        let mut p = peer(&["198.51.100.2:41641"], t0);
        let now = settle(&mut p, &[(a, ms(20))], t0);
        assert_eq!(p.path(), Path::Direct(a));
        // b answers in 40 % of the time: it takes over at its first pong.
        let later = now + Duration::from_secs(6);
        p.on_call_me_maybe(&[b], later);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(a, ms(20)), (b, ms(8))], later);
        let (_, _, changes) = drain(&mut p);
        assert_eq!(changes, vec![Path::Direct(b)]);
        // And keeps it while it stays that fast.
        let mut t = later;
        for _ in 0..LATENCY_WINDOW {
            t += Duration::from_secs(6);
            p.on_call_me_maybe(&[b], t);
            let (pings, _, _) = drain(&mut p);
            answer(&mut p, &pings, &[(a, ms(20)), (b, ms(8))], t);
        }
        assert_eq!(p.path(), Path::Direct(b));
    }

    #[test]
    fn lan_address_preferred_over_public_when_close() {
        let t0 = Instant::now();
        let public = addr("198.51.100.2:41641");
        let lan = addr("10.1.0.20:41641");
        let mut p = peer(&["198.51.100.2:41641", "10.1.0.20:41641"], t0);
        p.on_data_sent(t0);
        let (pings, _, _) = drain(&mut p);
        // The public answer comes first and is 3 % faster; the LAN one wins anyway.
        let pub_tx = pings.iter().find(|(a, _)| *a == public).unwrap().1;
        let lan_tx = pings.iter().find(|(a, _)| *a == lan).unwrap().1;
        p.on_pong(public, pub_tx, public, t0 + ms(1));
        p.on_pong(lan, lan_tx, lan, t0 + Duration::from_micros(1030));
        assert_eq!(p.path(), Path::Direct(lan));
        // And a public path much faster than a slow LAN one still wins.
        let mut q = peer(&["198.51.100.2:41641", "10.1.0.20:41641"], t0);
        q.on_data_sent(t0);
        let (pings, _, _) = drain(&mut q);
        let lan_tx = pings.iter().find(|(a, _)| *a == lan).unwrap().1;
        let pub_tx = pings.iter().find(|(a, _)| *a == public).unwrap().1;
        q.on_pong(lan, lan_tx, lan, t0 + ms(40));
        assert_eq!(
            q.path(),
            Path::Direct(lan),
            "first answer while nothing else is known"
        );
        q.on_pong(public, pub_tx, public, t0 + ms(10));
        assert_eq!(
            q.path(),
            Path::Direct(public),
            "4× faster beats the LAN bonus"
        );
    }

    #[test]
    fn unanswered_candidate_is_penalised_then_forgiven() {
        let t0 = Instant::now();
        let steady = addr("198.51.100.2:41641");
        let flaky = addr("203.0.113.9:41641");
        let mut p = peer(&["198.51.100.2:41641", "203.0.113.9:41641"], t0);
        p.on_data_sent(t0);
        let (pings, _, _) = drain(&mut p);
        // Only steady answers; flaky's ping times out → penalised.
        answer(&mut p, &pings, &[(steady, ms(20))], t0);
        drain(&mut p);
        let t1 = t0 + PING_TIMEOUT + ms(1);
        p.handle_timeout(t1);
        drain(&mut p);
        assert!(p.candidates[&flaky].penalised(t1));
        // Flaky now answers 15 % faster: with the penalty that is not enough.
        p.on_call_me_maybe(&[flaky], t1);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(steady, ms(20)), (flaky, ms(17))], t1);
        drain(&mut p);
        assert_eq!(p.path(), Path::Direct(steady));
        // After the penalty runs out the same margin wins.
        let t2 = t1 + FAILURE_PENALTY_TIME + ms(1);
        p.on_call_me_maybe(&[flaky], t2);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(steady, ms(20)), (flaky, ms(17))], t2);
        assert_eq!(p.path(), Path::Direct(flaky));
    }

    #[test]
    fn ping_learned_candidate_expires_after_45s() {
        let t0 = Instant::now();
        let mut p = peer(&[], t0);
        assert_eq!(p.reason(t0), PathReason::NoEndpoints);
        let from = addr("198.51.100.77:5555");
        p.on_ping(Via::Udp(from), [1; 12], t0);
        let (pings, _, _) = drain(&mut p);
        assert_eq!(pings.len(), 1, "a new source is pinged back");
        assert_eq!(p.candidates().len(), 1);
        p.handle_timeout(t0 + SESSION_ACTIVE_TIMEOUT - ms(1));
        assert_eq!(p.candidates().len(), 1);
        p.handle_timeout(t0 + SESSION_ACTIVE_TIMEOUT);
        assert!(p.candidates().is_empty());
    }

    #[test]
    fn heartbeats_stop_after_45s_idle() {
        let t0 = Instant::now();
        let ep = addr("198.51.100.2:41641");
        let mut p = peer(&["198.51.100.2:41641"], t0);
        let mut now = settle(&mut p, &[(ep, ms(10))], t0);
        let sent_before = p.counters.pings_sent;
        // No more data: heartbeats continue until 45 s, then stop.
        let end = t0 + Duration::from_secs(120);
        let mut rounds = 0;
        while let Some(t) = p.poll_timeout() {
            if t > end {
                break;
            }
            rounds += 1;
            assert!(rounds < 1000, "timer stuck at {:?}", t - t0);
            now = t.max(now);
            p.handle_timeout(now);
            let (pings, _, _) = drain(&mut p);
            answer(&mut p, &pings, &[(ep, ms(10))], now);
        }
        let hb = p.counters.pings_sent - sent_before;
        assert!((13..=16).contains(&hb), "{hb} heartbeats in 45 s");
        assert!(p.heartbeat_at.is_none());
    }

    #[test]
    fn no_flapping_between_similar_paths() {
        let t0 = Instant::now();
        let a = addr("198.51.100.2:41641");
        let b = addr("203.0.113.9:41641");
        let mut p = peer(&["198.51.100.2:41641", "203.0.113.9:41641"], t0);
        p.on_data_sent(t0);
        let mut seed = 7u64;
        let mut jitter = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ms(18 + (seed >> 60) % 5) // 18..22 ms
        };
        let mut now = t0;
        let mut changes = 0;
        for _ in 0..500 {
            let (pings, _, ch) = drain(&mut p);
            changes += ch.len();
            for (to, tx) in pings {
                let _ = to;
                p.on_pong(to, tx, to, now + jitter());
            }
            now += Duration::from_millis(700);
            p.on_data_sent(now);
            p.handle_timeout(now);
            // Every 5 s both candidates are pinged again (a full round).
            p.on_call_me_maybe(&[a, b], now);
        }
        let (_, _, ch) = drain(&mut p);
        changes += ch.len();
        assert!(
            changes <= 3,
            "path changed {changes} times between two equal paths"
        );
    }

    #[test]
    fn bounded_candidates_and_unknown_pongs_are_counted() {
        let t0 = Instant::now();
        let mut p = peer(&[], t0);
        let many: Vec<SocketAddr> = (0..100)
            .map(|i| SocketAddr::from(([198, 51, 100, i], 1)))
            .collect();
        p.on_call_me_maybe(&many, t0);
        assert_eq!(p.candidates().len(), MAX_CANDIDATES);
        assert_eq!(p.counters.candidates_dropped, 100 - MAX_CANDIDATES as u64);
        p.on_pong(many[0], [0xEE; 12], many[0], t0);
        assert_eq!(p.counters.unknown_pongs, 1);
        assert_eq!(p.path(), Path::Relay);
    }

    /// Drives `p` through its own deadlines up to `end`, answering no ping; returns
    /// the instants at which a call-me-maybe was asked for.
    fn run_unanswered(p: &mut PathState, end: Instant) -> Vec<Instant> {
        let mut cmm_at = Vec::new();
        let mut rounds = 0;
        while let Some(t) = p.poll_timeout() {
            if t > end {
                break;
            }
            rounds += 1;
            assert!(rounds < 1000, "timer stuck at {t:?}");
            p.handle_timeout(t);
            assert!(
                p.poll_timeout().is_none_or(|n| n > t),
                "deadline did not move"
            );
            if drain(p).1 {
                cmm_at.push(t);
            }
        }
        cmm_at
    }

    #[test]
    fn unanswered_call_me_maybe_is_repeated_with_backoff_until_idle() {
        let t0 = Instant::now();
        let mut p = peer(&["198.51.100.2:41641"], t0);
        p.on_data_sent(t0);
        assert!(drain(&mut p).1);
        let mut cmm_at = vec![t0];
        cmm_at.extend(run_unanswered(&mut p, t0 + Duration::from_secs(300)));
        let gaps: Vec<Duration> = cmm_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps[..2], [CMM_RETRY_MIN, 2 * CMM_RETRY_MIN], "{gaps:?}");
        assert!(
            gaps.iter()
                .all(|g| *g >= CMM_RETRY_MIN && *g <= DISCO_PING_INTERVAL),
            "{gaps:?}"
        );
        let last = *cmm_at.last().unwrap();
        assert!(last < t0 + SESSION_ACTIVE_TIMEOUT, "asked while idle");
        assert!(last >= t0 + SESSION_ACTIVE_TIMEOUT - DISCO_PING_INTERVAL);
        assert_eq!(
            p.poll_timeout(),
            None,
            "an idle peer with no path needs no timer"
        );
    }

    #[test]
    fn call_me_maybe_is_not_retried_without_a_relay() {
        let t0 = Instant::now();
        let mut p = peer(&["198.51.100.2:41641"], t0);
        p.on_data_sent(t0);
        assert!(drain(&mut p).1);
        // The peer's home region goes away: no more call-me-maybe, and no timer spins.
        p.set_relay(false);
        let cmm_at = run_unanswered(&mut p, t0 + Duration::from_secs(300));
        assert!(cmm_at.is_empty(), "{cmm_at:?}");
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn ping_learned_best_path_outlives_45s_without_a_stale_timer() {
        let t0 = Instant::now();
        let from = addr("198.51.100.77:5555");
        let mut p = peer(&[], t0);
        p.on_ping(Via::Udp(from), [1; 12], t0);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(from, ms(10))], t0);
        drain(&mut p);
        assert_eq!(p.path(), Path::Direct(from));
        // We keep sending, the peer answers our heartbeats but never pings us again:
        // the address is still the best path after its 45 s as a ping-learned candidate.
        let mut now = t0;
        while now < t0 + Duration::from_secs(90) {
            now += ms(500);
            p.on_data_sent(now);
            run_due(&mut p, now);
            assert!(
                p.poll_timeout().is_none_or(|t| t > now),
                "deadline in the past at {:?}",
                now - t0
            );
            let (pings, _, _) = drain(&mut p);
            answer(&mut p, &pings, &[(from, ms(10))], now);
        }
        assert_eq!(p.path(), Path::Direct(from));
    }

    #[test]
    fn our_new_endpoints_are_announced_at_once_even_over_a_trusted_path() {
        let t0 = Instant::now();
        let a = addr("198.51.100.2:41641");
        let mut p = peer(&["198.51.100.2:41641", "203.0.113.9:41641"], t0);
        // Idle: nothing to announce (the next data starts discovery anyway).
        p.our_endpoints_changed(t0);
        assert_eq!(p.poll_action(), None);
        p.on_data_sent(t0);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(a, ms(10))], t0);
        drain(&mut p);
        let t1 = t0 + ms(300);
        p.on_data_sent(t1);
        assert!(p.send_targets(t1).udp == Some(a) && !p.send_targets(t1).relay);
        p.our_endpoints_changed(t1);
        let (pings, cmm, changes) = drain(&mut p);
        assert!(cmm, "no call-me-maybe for our new endpoints");
        assert_eq!(pings.len(), 2, "every candidate pinged again");
        assert!(changes.is_empty(), "the trusted path stays: {changes:?}");
        assert_eq!(p.path(), Path::Direct(a));
    }

    #[test]
    fn a_quiet_trusted_path_asks_for_a_new_measurement_once() {
        let t0 = Instant::now();
        let a = addr("198.51.100.2:41641");
        let mut p = peer(&["198.51.100.2:41641"], t0);
        p.on_data_sent(t0);
        let (pings, _, _) = drain(&mut p);
        answer(&mut p, &pings, &[(a, ms(10))], t0);
        drain(&mut p);
        // Data keeps going out; nothing comes back.
        let mut quiet = 0;
        let mut now = t0;
        while now < t0 + SILENCE_PROBE_AFTER + SILENCE_PROBE_WAIT {
            now += ms(50);
            p.on_data_sent(now);
            p.handle_timeout(now);
            while let Some(x) = p.poll_action() {
                quiet += usize::from(x == Action::DirectPathQuiet);
            }
        }
        assert_eq!(quiet, 1, "one request per quiet spell");
    }

    #[test]
    fn rediscover_pings_every_candidate_again_while_untrusted() {
        let t0 = Instant::now();
        let a = addr("198.51.100.2:41641");
        let mut p = peer(&["198.51.100.2:41641", "203.0.113.9:41641"], t0);
        p.rediscover(t0);
        assert_eq!(p.poll_action(), None, "nothing while no data flows");
        p.on_data_sent(t0);
        let (pings, cmm, _) = drain(&mut p);
        assert_eq!((pings.len(), cmm), (2, true));
        // Half a second later the 5 s spacing would hold pings back; rediscover does not.
        let t1 = t0 + ms(500);
        p.rediscover(t1);
        let (pings, cmm, _) = drain(&mut p);
        assert_eq!((pings.len(), cmm), (2, true));
        // With a trusted direct path there is nothing to rediscover.
        answer(&mut p, &pings, &[(a, ms(10))], t1);
        drain(&mut p);
        p.rediscover(t1 + ms(20));
        assert_eq!(p.poll_action(), None);
    }

    /// Random inputs (endpoints, call-me-maybe, pings, pongs with loss, relay on and
    /// off, data or silence) never leave a deadline in the past after `handle_timeout`,
    /// never break the send rule, and keep the state bounded.
    #[test]
    fn timers_always_move_forward_under_random_events() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let t0 = Instant::now();
        let pool: Vec<SocketAddr> = [
            "198.51.100.2:41641",
            "203.0.113.9:41641",
            "10.0.0.5:41641",
            "[2001:db8::7]:41641",
            "[fe80::1]:41641",
            "127.0.0.1:41641",
        ]
        .iter()
        .map(|a| addr(a))
        .collect();
        for seed in 0..48u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut p = PathState::new(seed, t0);
            let mut now = t0;
            // Pongs on their way: (arrives at, pinged address, tx).
            let mut wire: Vec<(Instant, SocketAddr, TxId)> = Vec::new();
            for _ in 0..400 {
                // Mostly small steps; sometimes the caller is late by a lot.
                now += if rng.gen_bool(0.03) {
                    Duration::from_secs(rng.gen_range(5..120))
                } else {
                    ms(rng.gen_range(0..2500))
                };
                let pick = |rng: &mut StdRng| -> Vec<SocketAddr> {
                    pool.iter().copied().filter(|_| rng.gen_bool(0.4)).collect()
                };
                match rng.gen_range(0..10) {
                    0..=2 => {
                        p.on_data_sent(now);
                    }
                    3 => p.set_endpoints(&pick(&mut rng), now),
                    4 => p.on_call_me_maybe(&pick(&mut rng), now),
                    5 => p.on_ping(Via::Udp(pool[rng.gen_range(0..pool.len())]), rng.gen(), now),
                    6 => p.on_ping(Via::Relay(1), rng.gen(), now),
                    7 => p.set_relay(rng.gen_bool(0.8)),
                    8 => p.rediscover(now),
                    _ => {}
                }
                // Deliver what has arrived, in order.
                wire.sort_by_key(|w| w.0);
                while wire.first().is_some_and(|w| w.0 <= now) {
                    let (_, to, tx) = wire.remove(0);
                    p.on_pong(to, tx, to, now);
                }
                if p.poll_timeout().is_some_and(|t| t <= now) {
                    p.handle_timeout(now);
                }
                assert!(
                    p.poll_timeout().is_none_or(|t| t > now),
                    "seed {seed}: deadline in the past at {:?}",
                    now - t0
                );
                let targets = p.send_targets(now);
                assert!(targets.relay || targets.udp.is_some());
                let _ = p.reason(now).describe(now);
                assert!(p.candidates().len() <= MAX_CANDIDATES);
                assert!(p.outstanding.len() <= MAX_OUTSTANDING_PINGS);
                let (pings, _, _) = drain(&mut p);
                for (to, tx) in pings {
                    if rng.gen_bool(0.7) {
                        wire.push((now + ms(rng.gen_range(1..80)), to, tx));
                    }
                }
            }
        }
    }
}
