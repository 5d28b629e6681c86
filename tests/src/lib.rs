//! The network lab: network namespaces wired into an internet, NAT routers of every kind,
//! LANs, emulated links with delay and loss, miniupnpd routers and a STUN responder — for
//! end-to-end tests that run the real programs over real sockets (tests/tests/*.rs).
//!
//! ```no_run
//! use tests::{lab_or_skip, LinkParams, RouterSpec};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let lab = lab_or_skip!(); // skips without root; fails under CI=true
//! let relay = lab.add_server_with_link("relay", LinkParams::delay_ms(10))?;
//! let home = lab.add_router("home", RouterSpec::easy())?;
//! let alice = lab.add_lan_host("alice", &home)?;
//! let relayd = lab.spawn(&relay, tests::process::relayd()?, ["--help"])?;
//! let out = lab.exec_ok(&alice, "ping", ["-c1", &relay.ip.to_string()])?;
//! relay.uplink.as_ref().unwrap().set(LinkParams::delay_ms(25))?; // region gets slower
//! # drop((relayd, out)); Ok(()) }
//! ```
//!
//! Everything a [`Lab`] makes (namespaces, links, processes, services) is removed when it
//! drops, also when the test panics; namespaces of crashed earlier runs are removed by the
//! next [`Lab::new`]. Labs in parallel test threads do not collide. Facts about this
//! machine that shaped the lab are in docs/lab.md.

pub mod emulator;
pub mod error;
pub mod lab;
pub mod link;
pub mod netfilter;
pub mod netns;
pub mod process;
pub mod router;
pub mod scenario;
pub mod stun;
pub mod tailscale;
pub mod upnp;

pub use error::{LabError, Result};
pub use lab::{have_program, Host, Lab, Node, Router, INTERNET_IP, INTERNET_STUN_PORT};
pub use link::{EmuLink, LinkParams, LinkStats, Way, WayStats};
pub use netfilter::PacketCounter;
pub use process::ChildGuard;
pub use router::{Filtering, Nat, RouterSpec};

pub use testkit::{in_ci, interop, recv_from};

/// Handles a lab that could not be made: returns (so the caller skips) when this machine
/// cannot host labs and this is not CI; panics otherwise (CI, or a real error).
#[allow(clippy::print_stderr)] // the skip notice is for the person running the tests
pub fn skip_or_fail(err: &LabError) {
    match err {
        LabError::Unavailable(_) if !in_ci() => {
            // Each reason once per test program, not once per test: one line says what
            // to install.
            static SAID: std::sync::Mutex<std::collections::BTreeSet<String>> =
                std::sync::Mutex::new(std::collections::BTreeSet::new());
            let first = SAID
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(err.to_string());
            if first {
                eprintln!("SKIPPED (not CI): lab tests here: {err}");
            }
        }
        LabError::Unavailable(_) => panic!("{err} — under CI=true the lab must work"),
        other => panic!("cannot build the lab: {other}"),
    }
}

/// What a skipped test returns: `()`, or `Ok(())` for tests returning `Result`.
pub trait SkipReturn {
    /// The value a skipped test returns.
    fn skipped() -> Self;
}

impl SkipReturn for () {
    fn skipped() {}
}

impl<E> SkipReturn for std::result::Result<(), E> {
    fn skipped() -> Self {
        Ok(())
    }
}

/// Makes a [`Lab`], or skips the calling test (returns from it) when this machine cannot
/// host one — except under `CI=true`, where that fails the test.
///
/// `lab_or_skip!(requires: ["miniupnpd", "upnpc"])` also skips when a program is missing.
/// The calling test may return `()` or `Result<(), E>`.
#[macro_export]
macro_rules! lab_or_skip {
    () => {
        $crate::lab_or_skip!(requires: [])
    };
    (requires: [$($program:expr),* $(,)?]) => {
        match $crate::Lab::new_requiring(&[$($program),*]) {
            Ok(lab) => lab,
            Err(err) => {
                $crate::skip_or_fail(&err);
                return $crate::SkipReturn::skipped();
            }
        }
    };
}
