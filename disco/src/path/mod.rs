//! Per-peer path selection (docs/protocols.md §3), as a state machine with no I/O and
//! no clock: the caller feeds what happened (`set_endpoints`, `on_ping`, `on_pong`,
//! `on_call_me_maybe`, `on_data_sent`, `handle_timeout`) with the time, and drains what
//! to do (`poll_action`: send a ping, send call-me-maybe, the path changed) and when to
//! call again (`poll_timeout`). `send_targets` answers "where does a packet go now".
//!
//! Choosing follows tailscaled — relay first, a direct path after its first pong,
//! heartbeats to keep it trusted, back to the relay when pongs stop — with a cost that
//! keeps the choice steady: latency is the median of recent pongs, a challenger needs a
//! clear margin, and a candidate whose pings went unanswered is penalised for a while.
//!
//! Where the search stands is one `Phase` (idle, discovering, unanswered, direct,
//! lost), from which the path, the send rule and the status reason are read. Every
//! timer is a `Timer`, and one function, `PathState::deadline`, says when each is due:
//! `poll_timeout` is their minimum and `handle_timeout` runs exactly those due, so the
//! two cannot disagree. How candidates compare is in `score.rs`; the tests are in
//! `tests.rs`.

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
    Relay(proto::RegionId),
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

/// Where the search for a direct path stands. Packets are relayed in every phase but
/// `Direct`; a peer without candidates shows as having no endpoints whatever its phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No ping sent yet, so nothing tried.
    Idle,
    /// Pings are out (the first went at `since`); none lost, none answered.
    Discovering { since: Instant },
    /// A ping was lost at `since`, and nothing has answered since.
    Unanswered { since: Instant },
    /// Packets go to a direct path.
    Direct(DirectPath),
    /// The direct path stopped answering at `at`; relayed until a candidate answers.
    Lost { at: Instant },
}

/// The direct path in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirectPath {
    addr: SocketAddr,
    /// The median of its recent pongs.
    latency: Duration,
    /// Used alone (no relay copy) before this: its last pong plus [`TRUST_UDP_ADDR`], or
    /// earlier when a silence probe went unanswered.
    trust_until: Instant,
    /// When something last came from the peer over this path (a pong, a ping, an
    /// authenticated WireGuard packet)…
    last_heard: Instant,
    /// …and the first ping to it after that (if it is older than `last_heard`, it was
    /// answered or overtaken: there is none).
    quiet_ping: Option<Instant>,
}

impl DirectPath {
    fn trusted(&self, now: Instant) -> bool {
        now < self.trust_until
    }
}

/// The silence check of a trusted direct path (see [`SILENCE_PROBE_AFTER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Silence {
    /// Data went out and nothing came back: ping the path at this instant…
    ProbeAt(Instant),
    /// …and if that ping is still unanswered at this instant, stop trusting the path.
    DistrustAt(Instant),
}

/// Every timer of path selection. [`PathState::deadline`] says when each is due, from
/// the state alone; [`PathState::poll_timeout`] is the earliest of them, and
/// [`PathState::handle_timeout`] walks them in this order and runs those due. Each run
/// moves its own deadline past `now` (or disarms it) and can make due only timers later
/// in the order, so after `handle_timeout(now)` no deadline is at or before `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// A trusted path went quiet while data went out: ping it.
    SilenceProbe,
    /// That ping went unanswered: the path stops being trusted early.
    SilenceDistrust,
    /// The oldest ping awaiting a pong is lost.
    PingTimeout,
    /// The direct path's trust ran out a ping timeout ago: give it up.
    DirectGiveUp,
    /// A call-me-maybe went unanswered while data flows and no direct path exists.
    CallMeMaybeRetry,
    /// While data flows: ping the direct path, and every candidate when a round is due.
    Heartbeat,
    /// A candidate known only from its pings has not pinged us for the session timeout.
    CandidateExpiry,
}

impl Timer {
    const ALL: [Timer; 7] = [
        Timer::SilenceProbe,
        Timer::SilenceDistrust,
        Timer::PingTimeout,
        Timer::DirectGiveUp,
        Timer::CallMeMaybeRetry,
        Timer::Heartbeat,
        Timer::CandidateExpiry,
    ];
}

/// Path selection for one peer.
#[derive(Debug)]
pub struct PathState {
    phase: Phase,
    candidates: BTreeMap<SocketAddr, Candidate>,
    outstanding: BTreeMap<TxId, (SocketAddr, Instant)>,
    has_relay: bool,
    /// The last data sent: the session is active for [`SESSION_ACTIVE_TIMEOUT`] after.
    last_data: Option<Instant>,
    /// The next heartbeat, while the session is (or was until then) active.
    heartbeat_at: Option<Instant>,
    /// The last round of pings to every candidate.
    last_full_ping: Option<Instant>,
    /// The last call-me-maybe, while it may need repeating…
    last_cmm: Option<Instant>,
    /// …and how long after it the repeat is due.
    cmm_retry: Duration,
    actions: VecDeque<Action>,
    rng: StdRng,
    pub counters: PathCounters,
}

impl PathState {
    /// A fresh state; `seed` seeds the transaction IDs.
    pub fn new(seed: u64, _now: Instant) -> Self {
        PathState {
            phase: Phase::Idle,
            candidates: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            has_relay: false,
            last_data: None,
            heartbeat_at: None,
            last_full_ping: None,
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

    /// The direct path, if there is one.
    fn direct(&self) -> Option<&DirectPath> {
        match &self.phase {
            Phase::Direct(d) => Some(d),
            _ => None,
        }
    }

    fn session_active(&self, now: Instant) -> bool {
        self.last_data
            .is_some_and(|d| now.saturating_duration_since(d) < SESSION_ACTIVE_TIMEOUT)
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
        if !has_relay {
            // No call-me-maybe can go out: the next one starts a fresh backoff.
            self.cmm_retry = CMM_RETRY_MIN;
        }
    }

    fn trusted(&self, now: Instant) -> bool {
        self.direct().is_some_and(|d| d.trusted(now))
    }

    /// Where a packet goes now: trusted direct → UDP only; untrusted direct → both;
    /// none → relay.
    pub fn send_targets(&self, now: Instant) -> SendTargets {
        match self.direct() {
            Some(d) => SendTargets {
                udp: Some(d.addr),
                relay: !d.trusted(now),
            },
            None => SendTargets {
                udp: None,
                relay: true,
            },
        }
    }

    /// The current path.
    pub fn path(&self) -> Path {
        match self.direct() {
            Some(d) => Path::Direct(d.addr),
            None => Path::Relay,
        }
    }

    /// Why the path is what it is.
    pub fn reason(&self, now: Instant) -> PathReason {
        match self.phase {
            Phase::Direct(d) => PathReason::Direct {
                addr: d.addr,
                latency: d.latency,
                trusted: d.trusted(now),
            },
            _ if self.candidates.is_empty() => PathReason::NoEndpoints,
            Phase::Lost { at } => PathReason::DirectLost { at },
            Phase::Unanswered { since } => PathReason::PingsUnanswered { since },
            Phase::Discovering { since } => PathReason::Discovering { since },
            Phase::Idle => PathReason::Idle,
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
        match &mut self.phase {
            Phase::Idle => self.phase = Phase::Discovering { since: now },
            // The first ping to the path since we last heard from it.
            Phase::Direct(d) if d.addr == to && d.quiet_ping.is_none_or(|q| q < d.last_heard) => {
                d.quiet_ping = Some(now);
            }
            _ => {}
        }
        if let Some(c) = self.candidates.get_mut(&to) {
            c.last_ping_sent = Some(now);
        }
        self.counters.pings_sent += 1;
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

    /// Whether an unanswered call-me-maybe would be repeated: no direct path, something
    /// to ping, and a relay to send it through.
    fn cmm_retry_applies(&self) -> bool {
        self.direct().is_none() && !self.candidates.is_empty() && self.has_relay
    }

    /// While data flows and no pong came back, call-me-maybe is repeated on a short
    /// backoff (1, 2, 4 s): the first one may have raced the peer's relay connection.
    fn retry_call_me_maybe(&mut self, now: Instant) {
        if !self.cmm_retry_applies() {
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
        if !self.session_active(now) || self.trusted(now) {
            return;
        }
        for c in self.candidates.values_mut() {
            c.last_ping_sent = None;
        }
        self.cmm_retry = CMM_RETRY_MIN;
        self.discover(now);
    }

    fn want_full_ping(&self, now: Instant) -> bool {
        match (self.direct(), self.last_full_ping) {
            (None, _) | (_, None) => true,
            _ if !self.trusted(now) => true,
            (Some(d), Some(t)) => {
                d.latency > GOOD_ENOUGH_LATENCY
                    && now.saturating_duration_since(t) >= UPGRADE_INTERVAL
            }
        }
    }

    /// A data packet was sent to the peer: keeps the session active and, while there is
    /// no trusted direct path, starts discovery.
    /// Returns whether it started discovery (pings to send now); otherwise at most a
    /// timer changed, which [`PathState::poll_timeout`] reports.
    pub fn on_data_sent(&mut self, now: Instant) -> bool {
        if !self.session_active(now) {
            // A session starts (or starts over after being idle): no earlier
            // call-me-maybe is waiting for an answer.
            self.last_cmm = None;
            self.cmm_retry = CMM_RETRY_MIN;
        }
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
        if let Phase::Direct(d) = &mut self.phase {
            if d.addr == from {
                d.last_heard = now;
            }
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
        let challenger = Contender {
            addr: to,
            latency: c.latency().unwrap_or(latency),
            penalised: c.penalised(now),
        };
        // A ping to it at this very instant is one after we last heard from it.
        let pinged_now = c.last_ping_sent.filter(|t| *t >= now);

        let switch = match self.direct() {
            None => true,
            Some(d) if d.addr == to => false,
            Some(_) if !self.trusted(now) => true,
            // The path went quiet while data went out, and its probe is unanswered,
            // while this one answers: take it now, not when the quiet path's trust runs
            // out.
            Some(d)
                if matches!(self.silence(), Some(Silence::DistrustAt(_)))
                    && now >= d.last_heard + SILENCE_PROBE_AFTER =>
            {
                true
            }
            Some(d) => score::beats(
                challenger,
                Contender {
                    addr: d.addr,
                    latency: d.latency,
                    penalised: self
                        .candidates
                        .get(&d.addr)
                        .is_some_and(|c| c.penalised(now)),
                },
            ),
        };
        if switch {
            if self.direct().is_none() {
                // A direct path ends the search: a later one starts a fresh backoff.
                self.cmm_retry = CMM_RETRY_MIN;
            }
            self.phase = Phase::Direct(DirectPath {
                addr: to,
                latency: challenger.latency,
                trust_until: now + TRUST_UDP_ADDR,
                last_heard: now,
                quiet_ping: pinged_now,
            });
            self.counters.path_changes += 1;
            self.push(Action::PathChanged(Path::Direct(to)));
            // The path left behind may have been kept only for being the path.
            self.prune(now);
        } else if let Phase::Direct(d) = &mut self.phase {
            if d.addr == to {
                d.latency = challenger.latency;
                d.trust_until = now + TRUST_UDP_ADDR;
                d.last_heard = now;
            }
        }
    }

    /// An authenticated packet (WireGuard) arrived from the peer over UDP, not through a
    /// relay: the direct path works, inwards at least.
    pub fn on_heard_direct(&mut self, now: Instant) {
        if let Phase::Direct(d) = &mut self.phase {
            d.last_heard = now;
        }
    }

    /// The silence check of the direct path: `None` unless the path is trusted and data
    /// went out since anything came back. A deadline at or past the trust's end is none:
    /// the trust ends by itself then.
    fn silence(&self) -> Option<Silence> {
        let (Some(d), Some(sent)) = (self.direct(), self.last_data) else {
            return None;
        };
        if sent <= d.last_heard {
            return None;
        }
        let check = match d.quiet_ping.filter(|q| *q >= d.last_heard) {
            Some(q) => Silence::DistrustAt(q + SILENCE_PROBE_WAIT.max(d.latency * 4)),
            None => Silence::ProbeAt(d.last_heard + SILENCE_PROBE_AFTER),
        };
        let (Silence::ProbeAt(due) | Silence::DistrustAt(due)) = check;
        (due < d.trust_until).then_some(check)
    }

    /// Our own endpoints changed (a new public port after a NAT rebinding, a new
    /// network): while traffic flows the peer must learn them now, even over a path
    /// still trusted — its packets to our old endpoint are being dropped. Sends a
    /// call-me-maybe at once (the peer then pings our new endpoints, opening both NATs)
    /// and pings every candidate again.
    pub fn our_endpoints_changed(&mut self, now: Instant) {
        if !self.session_active(now) {
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

    /// Drops the candidates no source vouches for any more (the direct path stays).
    fn prune(&mut self, now: Instant) {
        let direct = self.direct().map(|d| d.addr);
        self.candidates
            .retain(|a, c| c.keep(now) || Some(*a) == direct);
        if self.candidates.is_empty() {
            // Nothing to ping: the next call-me-maybe starts a fresh backoff.
            self.cmm_retry = CMM_RETRY_MIN;
        }
    }

    fn lose_direct(&mut self, now: Instant) {
        if self.direct().is_some() {
            self.phase = Phase::Lost { at: now };
            self.counters.path_changes += 1;
            self.push(Action::PathChanged(Path::Relay));
            // The lost path may have been kept only for being the path.
            self.prune(now);
        }
    }

    /// When `timer` is next due, from the state alone; `None` while it is not armed.
    fn deadline(&self, timer: Timer) -> Option<Instant> {
        match timer {
            Timer::SilenceProbe => match self.silence()? {
                Silence::ProbeAt(t) => Some(t),
                Silence::DistrustAt(_) => None,
            },
            Timer::SilenceDistrust => match self.silence()? {
                Silence::DistrustAt(t) => Some(t),
                Silence::ProbeAt(_) => None,
            },
            Timer::PingTimeout => {
                let oldest = self.outstanding.values().map(|(_, sent)| *sent).min()?;
                Some(oldest + PING_TIMEOUT)
            }
            Timer::DirectGiveUp => Some(self.direct()?.trust_until + PING_TIMEOUT),
            Timer::CallMeMaybeRetry => {
                // Only while the session is active: past that there is nothing to retry.
                let due = self.last_cmm? + self.cmm_retry;
                let idle_at = self.last_data? + SESSION_ACTIVE_TIMEOUT;
                (self.cmm_retry_applies() && due < idle_at).then_some(due)
            }
            Timer::Heartbeat => self.heartbeat_at,
            Timer::CandidateExpiry => {
                let direct = self.direct().map(|d| d.addr);
                self.candidates
                    .iter()
                    // The direct path is kept past its expiry (`prune`): no deadline.
                    .filter(|(a, c)| {
                        Some(**a) != direct && !c.sources.netmap && !c.sources.call_me_maybe
                    })
                    .filter_map(|(_, c)| c.sources.pinged_us)
                    .map(|p| p + SESSION_ACTIVE_TIMEOUT)
                    .min()
            }
        }
    }

    /// Runs `timer`, which is due at `now`.
    fn run(&mut self, timer: Timer, now: Instant) {
        match timer {
            Timer::SilenceProbe => {
                if let Some(addr) = self.direct().map(|d| d.addr) {
                    self.counters.silence_probes += 1;
                    self.send_ping(addr, now);
                    self.push(Action::DirectPathQuiet);
                }
            }
            Timer::SilenceDistrust => {
                let due = self.deadline(Timer::SilenceDistrust);
                if let (Phase::Direct(d), Some(due)) = (&mut self.phase, due) {
                    // The trust ended at the deadline (so the deadline is past it: no
                    // repeat).
                    d.trust_until = due;
                    self.counters.silence_distrusted += 1;
                    // Look for another way at once rather than at the next 5 s round:
                    // after a NAT rebinding the peer's new address is often a candidate
                    // already (from its call-me-maybe), and its first pong takes over.
                    for c in self.candidates.values_mut() {
                        c.last_ping_sent = None;
                    }
                    self.discover(now);
                }
            }
            Timer::PingTimeout => self.expire_pings(now),
            Timer::DirectGiveUp => self.lose_direct(now),
            Timer::CallMeMaybeRetry => {
                if self.session_active(now) {
                    self.retry_call_me_maybe(now);
                } else {
                    // Run late, past the active window: nothing to retry any more.
                    self.last_cmm = None;
                    self.cmm_retry = CMM_RETRY_MIN;
                }
            }
            Timer::Heartbeat => {
                if !self.session_active(now) {
                    // The session went idle: heartbeats stop, and no call-me-maybe is
                    // waiting to be repeated.
                    self.heartbeat_at = None;
                    self.last_cmm = None;
                    self.cmm_retry = CMM_RETRY_MIN;
                    return;
                }
                if let Some(addr) = self.direct().map(|d| d.addr) {
                    self.send_ping(addr, now);
                }
                if self.want_full_ping(now) {
                    self.discover(now);
                }
                self.heartbeat_at = Some(now + HEARTBEAT_INTERVAL);
            }
            Timer::CandidateExpiry => self.prune(now),
        }
    }

    /// Lost pings: the candidate is penalised; a lost ping on an untrusted direct path
    /// ends it (traffic is on the relay alone until something answers).
    fn expire_pings(&mut self, now: Instant) {
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
            match self.phase {
                Phase::Idle | Phase::Discovering { .. } => {
                    self.phase = Phase::Unanswered { since: now };
                }
                Phase::Direct(d) if d.addr == addr && !d.trusted(now) => self.lose_direct(now),
                Phase::Unanswered { .. } | Phase::Direct(_) | Phase::Lost { .. } => {}
            }
        }
    }

    /// Runs the timers due at `now`, and only those: lost pings, heartbeats, the
    /// silence check, call-me-maybe repeats, the direct path given up, candidate expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        for timer in Timer::ALL {
            if self.deadline(timer).is_some_and(|t| t <= now) {
                self.run(timer, now);
            }
        }
    }

    /// When [`PathState::handle_timeout`] should next run: the earliest deadline of any
    /// timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Timer::ALL
            .into_iter()
            .filter_map(|t| self.deadline(t))
            .min()
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
