//! Every timer and threshold of path selection, each with the reason for its value.
//! The first group follows tailscaled (docs/protocols.md §3.1) so both ends agree on
//! rhythm; the second group is ours (the cost that keeps paths from flapping).

use std::time::Duration;

/// While traffic flows, the current direct path is pinged this often to keep it trusted.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// A direct path is used alone (no relay copy) only this long after its last pong: two
/// lost heartbeats put the relay back in parallel.
pub const TRUST_UDP_ADDR: Duration = Duration::from_millis(6500);
/// With no data sent for this long the session is idle: heartbeats stop, and candidates
/// learned from pings expire.
pub const SESSION_ACTIVE_TIMEOUT: Duration = Duration::from_secs(45);
/// Even with a good direct path, all candidates are pinged again this often…
pub const UPGRADE_INTERVAL: Duration = Duration::from_secs(60);
/// …unless the current path is at least this fast (nothing much better can exist).
pub const GOOD_ENOUGH_LATENCY: Duration = Duration::from_millis(5);
/// Minimum spacing of discovery pings to one candidate.
pub const DISCO_PING_INTERVAL: Duration = Duration::from_secs(5);
/// A ping without a pong after this long is lost.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Pong latencies remembered per candidate.
pub const PONG_HISTORY: usize = 64;

/// Latency used for comparisons is the median of this many recent pongs, so one
/// jittery sample cannot move the path.
pub const LATENCY_WINDOW: usize = 8;
/// A candidate must score this many points more than the current path to replace it
/// (points are Tailscale's: percent faster, plus bonuses for LAN, loopback and IPv6).
/// Tailscale switches at 2 points; 15 means "about 15 % better", which keeps two paths
/// with ±10 % jitter from trading places, while a LAN address (20 bonus points) still
/// wins over a public one of about the same latency.
pub const SWITCH_MIN_POINTS: i64 = 15;
/// A ping from a candidate we have no trusted path to is answered with a ping of our
/// own at most this often: our earlier ping may have died at the peer's NAT before the
/// peer's own ping opened it.
pub const PING_BACK_INTERVAL: Duration = Duration::from_millis(500);
/// How long a candidate whose ping went unanswered stays penalised…
pub const FAILURE_PENALTY_TIME: Duration = Duration::from_secs(30);
/// …and the points it loses meanwhile: a flaky path is not re-chosen at once over a
/// steady one, yet still wins when it is clearly better or the only one.
pub const FAILURE_PENALTY_POINTS: i64 = 30;
/// Candidates held per peer (netmap, call-me-maybe and ping-learned together).
pub const MAX_CANDIDATES: usize = 32;
/// Pings awaiting a pong per peer.
pub const MAX_OUTSTANDING_PINGS: usize = 128;
/// Actions queued for the caller per peer.
pub const MAX_ACTIONS: usize = 256;
/// While data goes out on a trusted direct path and nothing has come back over it for
/// this long, the path is pinged at once rather than at the next heartbeat…
pub const SILENCE_PROBE_AFTER: Duration = Duration::from_millis(1500);
/// …and when that ping (or a heartbeat sent during the silence) is not answered within
/// this long, or four of the path's round trips if that is longer, the path stops being
/// trusted early: packets go through the relay as well until a pong comes back, so a
/// path that died costs about 2.5 s of traffic instead of up to the 6.5 s trust window.
/// Ours, not tailscaled's (its heartbeat rhythm is unchanged); a false alarm, say one
/// lost ping while the peer has nothing to send, costs only relay copies for a moment.
pub const SILENCE_PROBE_WAIT: Duration = Duration::from_secs(1);
/// First retry of an unanswered call-me-maybe (doubling up to the ping interval).
pub const CMM_RETRY_MIN: Duration = Duration::from_secs(1);
