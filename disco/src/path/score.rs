//! How two direct paths compare (docs/protocols.md §3.5): the latency a path is judged
//! by, points for being faster and for the kind of address, a deduction for recent
//! failures, and the margin a challenger needs. It knows nothing of timers or phases;
//! `PathState` asks it only which latency a candidate has and whether a challenger
//! beats the current path.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::defaults::{FAILURE_PENALTY_POINTS, LATENCY_WINDOW, SWITCH_MIN_POINTS};

/// A direct path as scoring sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Contender {
    pub addr: SocketAddr,
    /// Its latency (see [`median_latency`]).
    pub latency: Duration,
    /// Whether a ping to it went unanswered lately.
    pub penalised: bool,
}

/// The latency a candidate is judged by: the median of its last [`LATENCY_WINDOW`]
/// pong round trips (oldest first in `pongs`), so one jittery sample cannot move the
/// path; `None` before its first pong.
pub(super) fn median_latency(pongs: &VecDeque<Duration>) -> Option<Duration> {
    if pongs.is_empty() {
        return None;
    }
    let mut recent: Vec<Duration> = pongs.iter().rev().take(LATENCY_WINDOW).copied().collect();
    recent.sort();
    Some(recent[recent.len() / 2])
}

/// Whether `challenger` scores at least [`SWITCH_MIN_POINTS`] more than `current`.
pub(super) fn beats(challenger: Contender, current: Contender) -> bool {
    let (pc, pb) = points(challenger, current);
    pc - pb >= SWITCH_MIN_POINTS
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
fn points(a: Contender, b: Contender) -> (i64, i64) {
    let (mut pa, mut pb) = (0i64, 0i64);
    let (la, lb) = (a.latency.as_nanos().max(1), b.latency.as_nanos().max(1));
    if la < lb {
        pa += 100 - (100 * la / lb) as i64;
    } else if lb < la {
        pb += 100 - (100 * lb / la) as i64;
    }
    pa += bonus(&a.addr);
    pb += bonus(&b.addr);
    if a.penalised {
        pa -= FAILURE_PENALTY_POINTS;
    }
    if b.penalised {
        pb -= FAILURE_PENALTY_POINTS;
    }
    (pa, pb)
}
