//! Is a relay connection still alive? A connection whose server stops answering (its
//! packets blackholed, no FIN or RST) would otherwise look healthy until TCP gives up,
//! many minutes later. While frames arrive, nothing is needed; after a short silence the
//! client asks with a DERP Ping, and a silence that outlasts the Ping's deadline means
//! the connection is dead.
//!
//! Pure: time is an argument; the caller sends the Ping it is told to and drops the
//! connection when told it is dead. Not for: reconnecting (`RelayClient`), the write
//! deadline (the caller times each write with [`WRITE_TIMEOUT`]), or the server's own
//! keepalives towards its clients.

use std::time::{Duration, Instant};

/// No frame from the server for this long: send a Ping. The server's keepalive comes
/// only every ~60 s, far too seldom to notice a dead connection quickly, so we ask. Any
/// frame counts as hearing from the server, so a connection carrying traffic never pings;
/// an idle one pings once per 3 s of silence (a 13-byte frame each way). Three seconds
/// plus [`PONG_TIMEOUT`] declares a blackholed connection dead ~6 s after its last frame,
/// which leaves room within 10 s for a late timer and within 12 s for the reconnection.
pub const PING_AFTER_SILENCE: Duration = Duration::from_secs(3);
/// A Ping with no frame at all back within this long means the connection is dead. The
/// Pong needs one round trip plus whatever the server had queued for us ahead of it: a
/// relay across an ocean (~300 ms) with a full queue fits many times over. tailscaled
/// gives its own DERP Ping (after a network change) the same 3 s.
pub const PONG_TIMEOUT: Duration = Duration::from_secs(3);
/// A write to the connection that has not completed within this long means the
/// connection is dead (the send buffer is full and the server acknowledges nothing).
/// One write carries at most ~64 KiB of queued packets, which even a 200 kbit/s uplink
/// takes under 3 s; derper gives its own writes to clients 2 s, its mesh writes 5 s.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The two deadlines of [`Liveness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Silence before a Ping.
    pub ping_after: Duration,
    /// Silence after the Ping before the connection is dead.
    pub pong_timeout: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            ping_after: PING_AFTER_SILENCE,
            pong_timeout: PONG_TIMEOUT,
        }
    }
}

impl LivenessConfig {
    /// The longest silence a live connection can have (after it, [`Liveness`] says dead).
    pub fn dead_after(&self) -> Duration {
        self.ping_after + self.pong_timeout
    }
}

/// What the caller must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivenessAction {
    /// Send a Ping frame with this payload.
    SendPing([u8; 8]),
    /// The connection is dead: nothing heard for `silent_for`, the Ping unanswered.
    Dead { silent_for: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Last frame from the server at `at`; a Ping is due `ping_after` later.
    Heard { at: Instant },
    /// Nothing heard since `heard`; Ping `data` sent at `sent`, dead `pong_timeout` later.
    Pinged {
        heard: Instant,
        sent: Instant,
        data: [u8; 8],
    },
    /// Declared dead; stays so.
    Dead,
}

/// The liveness state of one connection (see the module doc).
#[derive(Debug, Clone)]
pub struct Liveness {
    config: LivenessConfig,
    phase: Phase,
    /// Pings sent so far; the next one's payload is this count, big-endian.
    pings_sent: u64,
}

impl Liveness {
    /// A connection that has just completed its handshake (which counts as hearing from
    /// the server) at `now`.
    pub fn new(config: LivenessConfig, now: Instant) -> Self {
        Liveness {
            config,
            phase: Phase::Heard { at: now },
            pings_sent: 0,
        }
    }

    /// A frame of any kind arrived at `now`: the server is there.
    pub fn on_frame(&mut self, now: Instant) {
        match self.phase {
            Phase::Dead => {}
            Phase::Heard { at } => self.phase = Phase::Heard { at: at.max(now) },
            Phase::Pinged { heard, .. } => self.phase = Phase::Heard { at: heard.max(now) },
        }
    }

    /// A Pong arrived at `now`; like any frame it proves the server is there. Returns
    /// the round trip when it answers the outstanding Ping.
    pub fn on_pong(&mut self, data: [u8; 8], now: Instant) -> Option<Duration> {
        let rtt = match self.phase {
            Phase::Pinged { sent, data: d, .. } if d == data => {
                Some(now.saturating_duration_since(sent))
            }
            _ => None,
        };
        self.on_frame(now);
        rtt
    }

    /// When [`Liveness::handle_timeout`] must next be called (`None`: never again).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Heard { at } => Some(at + self.config.ping_after),
            Phase::Pinged { sent, .. } => Some(sent + self.config.pong_timeout),
            Phase::Dead => None,
        }
    }

    /// Time has passed; calling it early, or more than once, is harmless. A Ping is
    /// always sent before the connection is called dead, even when this runs late (a
    /// starved task or a suspended machine must not condemn a live connection).
    pub fn handle_timeout(&mut self, now: Instant) -> Option<LivenessAction> {
        match self.phase {
            Phase::Heard { at } if now >= at + self.config.ping_after => {
                self.pings_sent += 1;
                let data = self.pings_sent.to_be_bytes();
                self.phase = Phase::Pinged {
                    heard: at,
                    sent: now,
                    data,
                };
                Some(LivenessAction::SendPing(data))
            }
            Phase::Pinged { heard, sent, .. } if now >= sent + self.config.pong_timeout => {
                self.phase = Phase::Dead;
                Some(LivenessAction::Dead {
                    silent_for: now.saturating_duration_since(heard),
                })
            }
            _ => None,
        }
    }

    /// Whether the connection has been declared dead.
    pub fn is_dead(&self) -> bool {
        self.phase == Phase::Dead
    }

    /// Pings sent on this connection.
    pub fn pings_sent(&self) -> u64 {
        self.pings_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs every timeout due up to `until` (as a timer-driven caller would), returning
    /// the actions with their times.
    fn run_until(l: &mut Liveness, until: Instant) -> Vec<(Instant, LivenessAction)> {
        let mut out = Vec::new();
        while let Some(at) = l.poll_timeout() {
            if at > until {
                break;
            }
            if let Some(a) = l.handle_timeout(at) {
                out.push((at, a));
            }
        }
        out
    }

    #[test]
    fn a_connection_carrying_traffic_never_pings() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        // A relayed ping at 20/s: a frame every 50 ms for a minute.
        for i in 1..=1200 {
            let now = t0 + ms(50 * i);
            assert_eq!(run_until(&mut l, now), vec![]);
            l.on_frame(now);
        }
        assert_eq!(l.pings_sent(), 0);
    }

    #[test]
    fn an_idle_healthy_connection_pings_once_per_silence_and_lives() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        let mut pings = Vec::new();
        let mut now = t0;
        // A minute of silence, each Ping answered 40 ms later.
        while now < t0 + Duration::from_secs(60) {
            let at = l.poll_timeout().unwrap();
            match l.handle_timeout(at) {
                Some(LivenessAction::SendPing(data)) => {
                    pings.push(at);
                    now = at + ms(40);
                    assert_eq!(l.on_pong(data, now), Some(ms(40)));
                }
                other => panic!("unexpected {other:?} at {:?}", at - t0),
            }
        }
        assert!(!l.is_dead());
        // One Ping per PING_AFTER_SILENCE (+ the round trip), no more.
        assert_eq!(pings.len(), 20, "{pings:?}");
        for w in pings.windows(2) {
            assert_eq!(w[1] - w[0], PING_AFTER_SILENCE + ms(40));
        }
        assert_eq!(pings[0] - t0, PING_AFTER_SILENCE);
    }

    #[test]
    fn a_blackholed_connection_is_dead_within_ten_seconds_of_its_last_frame() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        l.on_frame(t0 + ms(1000));
        // The blackhole starts right after that frame: nothing more arrives.
        let acts = run_until(&mut l, t0 + Duration::from_secs(60));
        assert_eq!(
            acts,
            vec![
                (
                    t0 + ms(1000) + PING_AFTER_SILENCE,
                    LivenessAction::SendPing(1u64.to_be_bytes())
                ),
                (
                    t0 + ms(1000) + PING_AFTER_SILENCE + PONG_TIMEOUT,
                    LivenessAction::Dead {
                        silent_for: PING_AFTER_SILENCE + PONG_TIMEOUT
                    }
                ),
            ]
        );
        assert!(l.is_dead());
        assert_eq!(l.poll_timeout(), None, "dead is final");
        assert!(LivenessConfig::default().dead_after() <= Duration::from_secs(10));
        // Frames after the verdict change nothing.
        l.on_frame(t0 + Duration::from_secs(61));
        assert!(l.is_dead());
    }

    #[test]
    fn any_frame_after_the_ping_proves_life_and_a_stale_pong_is_no_answer() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        let first = match l.handle_timeout(t0 + PING_AFTER_SILENCE) {
            Some(LivenessAction::SendPing(d)) => d,
            other => panic!("{other:?}"),
        };
        // A packet rather than the Pong: alive; the silence clock restarts from it.
        let heard = t0 + PING_AFTER_SILENCE + ms(500);
        l.on_frame(heard);
        assert_eq!(l.poll_timeout(), Some(heard + PING_AFTER_SILENCE));
        assert_eq!(
            l.handle_timeout(t0 + PING_AFTER_SILENCE + PONG_TIMEOUT),
            None
        );
        // The next Ping carries a new payload; the first one's late Pong is no answer
        // to it (no round trip), though it still counts as a frame.
        let second = match l.handle_timeout(heard + PING_AFTER_SILENCE) {
            Some(LivenessAction::SendPing(d)) => d,
            other => panic!("{other:?}"),
        };
        assert_ne!(first, second);
        let late = heard + PING_AFTER_SILENCE + ms(10);
        assert_eq!(l.on_pong(first, late), None);
        assert!(!l.is_dead());
        assert_eq!(l.poll_timeout(), Some(late + PING_AFTER_SILENCE));
    }

    #[test]
    fn early_calls_do_nothing_and_a_late_one_pings_before_condemning() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        assert_eq!(l.handle_timeout(t0 + ms(10)), None);
        assert_eq!(l.pings_sent(), 0);
        // The task slept through both deadlines (a suspended laptop): ask first.
        let late = t0 + Duration::from_secs(30);
        assert!(matches!(
            l.handle_timeout(late),
            Some(LivenessAction::SendPing(_))
        ));
        assert_eq!(l.handle_timeout(late), None, "no second ping at once");
        assert!(matches!(
            l.handle_timeout(late + PONG_TIMEOUT),
            Some(LivenessAction::Dead { .. })
        ));
    }

    #[test]
    fn frames_out_of_order_never_move_the_clock_back() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        l.on_frame(t0 + ms(2000));
        l.on_frame(t0 + ms(1000));
        assert_eq!(l.poll_timeout(), Some(t0 + ms(2000) + PING_AFTER_SILENCE));
    }

    /// Random frames, pongs and timer calls: pings are at least `ping_after` apart, the
    /// verdict never comes before `dead_after` of silence, and a timer-driven caller
    /// always reaches it by then.
    #[test]
    fn random_schedules_keep_the_invariants() {
        let cfg = LivenessConfig {
            ping_after: ms(300),
            pong_timeout: ms(200),
        };
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let t0 = Instant::now();
            let mut l = Liveness::new(cfg, t0);
            let mut now = t0;
            let mut last_heard = t0;
            let mut last_ping: Option<Instant> = None;
            let mut outstanding: Option<[u8; 8]> = None;
            for _ in 0..500 {
                now += ms(rng.gen_range(0..250));
                // Timers the caller would have run meanwhile (or late, at `now`).
                let due = l.poll_timeout();
                let at = match due {
                    Some(d) if d <= now && rng.gen_bool(0.8) => d,
                    _ => now,
                };
                match l.handle_timeout(at) {
                    Some(LivenessAction::SendPing(d)) => {
                        if let Some(p) = last_ping {
                            assert!(at - p >= cfg.ping_after, "seed {seed}: pings too close");
                        }
                        assert!(at - last_heard >= cfg.ping_after, "seed {seed}");
                        last_ping = Some(at);
                        outstanding = Some(d);
                    }
                    Some(LivenessAction::Dead { silent_for }) => {
                        assert!(silent_for >= cfg.dead_after(), "seed {seed}");
                        assert_eq!(silent_for, at - last_heard, "seed {seed}");
                        break;
                    }
                    None => {}
                }
                if l.is_dead() {
                    break;
                }
                // While a verdict is not due, the caller is never told to wait past it.
                if let Some(next) = l.poll_timeout() {
                    assert!(
                        next <= at.max(last_heard + cfg.ping_after) + cfg.pong_timeout,
                        "seed {seed}"
                    );
                }
                match rng.gen_range(0..4) {
                    0 => {
                        l.on_frame(now.max(at));
                        last_heard = now.max(at);
                    }
                    1 => {
                        if let Some(d) = outstanding.take() {
                            l.on_pong(d, now.max(at));
                            last_heard = now.max(at);
                        }
                    }
                    _ => {}
                }
                now = now.max(at);
            }
        }
    }
}
