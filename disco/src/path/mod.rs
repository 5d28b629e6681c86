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

mod score;

use score::Contender;

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
        score::median_latency(&self.pongs)
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
                score::beats(
                    Contender {
                        addr: to,
                        latency: cand_latency,
                        penalised: cand_penalised,
                    },
                    Contender {
                        addr: b.addr,
                        latency: b.latency,
                        penalised: best_pen,
                    },
                )
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
mod tests;
