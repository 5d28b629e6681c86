//! Every timer and limit of netcheck in one place, each with the reason for its value.
//! Values follow Tailscale's `net/netcheck` (docs/protocols.md §4) so that our reports
//! and home-region choices behave like tailscaled's.

use std::time::Duration;

/// Budget for a whole report. Tailscale uses 5 s; a report normally ends far sooner,
/// because the STUN phase stops a short while after three regions have answered.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Budget of the STUN phase inside a report; what is left goes to the HTTPS fallback.
pub const STUN_PHASE_TIMEOUT: Duration = Duration::from_secs(3);

/// A full report (every region) is made at least this often; in between, reports are
/// incremental (the few fastest regions plus home).
pub const FULL_REPORT_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Spacing of the retries of one (region, family) set in a full report: 0, 100, 200 ms.
pub const FULL_PROBE_SPACING: Duration = Duration::from_millis(100);
/// Probes per (region, family) in a full report.
pub const FULL_PROBES_PER_REGION: usize = 3;

/// Incremental reports probe this many of the fastest regions (plus the home region).
pub const INCREMENTAL_REGIONS: usize = 3;
/// Retry spacing in an incremental report when a region has no previous latency.
pub const DEFAULT_INITIAL_RETRANSMIT: Duration = Duration::from_millis(200);
/// Extra spacing added per retry beyond the first, so retries back off.
pub const RETRY_BACKOFF_STEP: Duration = Duration::from_millis(50);

/// Once this many regions answered, the STUN phase ends after a short grace period (the
/// slowest latency seen; twice that in a full report) rather than waiting for stragglers.
pub const ENOUGH_REGIONS: usize = 3;

/// History kept for the home-region choice: a region's score is its best latency over
/// this window, so one slow sample does not move the home.
pub const HOME_HISTORY: Duration = Duration::from_secs(5 * 60 + 5);

/// A new home region must be at least this much faster than the old one…
pub const HOME_SWITCH_MIN_GAIN: Duration = Duration::from_millis(10);
/// …and faster than this share of the old home's latency (i.e. > 33 % better).
pub const HOME_SWITCH_MAX_RATIO: f64 = 2.0 / 3.0;

/// The old home still counts as reachable if a relay frame arrived from it this recently,
/// even when its probe went unanswered in this report.
pub const HOME_HEARD_RECENTLY: Duration = Duration::from_secs(8);

/// When nothing could be measured, keep the old home if it was heard from this recently
/// (two relay keep-alive periods).
pub const HOME_KEEP_WHEN_BLIND: Duration = Duration::from_secs(120);

/// Budget of one HTTPS latency check (TLS dial + one GET) in the UDP-blocked fallback.
pub const HTTPS_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Captive-portal check: started this long after the report unless STUN already answered.
pub const CAPTIVE_PORTAL_DELAY: Duration = Duration::from_millis(200);
/// Budget of the captive-portal HTTP request.
pub const CAPTIVE_PORTAL_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest STUN response read; real ones are under 100 bytes.
pub const MAX_STUN_PACKET: usize = 1500;

/// Bound on the queue of STUN packets handed to a running report by the socket owner.
pub const STUN_QUEUE: usize = 256;

/// Budget of the port-mapping service probe (UPnP, NAT-PMP, PCP) run during a report.
pub const PORTMAP_PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
