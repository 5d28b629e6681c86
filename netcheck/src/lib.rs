//! netcheck: what this network lets us do. STUN probes to every relay region give our
//! public address, whether the NAT keeps one mapping for all destinations, and each
//! region's latency; the home region follows with hysteresis; UPnP / NAT-PMP / PCP are
//! probed and used to open a port. The plan, the report and the home choice are pure
//! (`plan`, `report`, `home`); `client` and `portmap` are the thin I/O around them.

pub mod captive;
pub mod client;
pub mod defaults;
pub mod home;
pub mod plan;
pub mod portmap;
pub mod report;
pub mod stun;
pub mod text;

pub use client::{Netchecker, ReportDetails, StunInbox};
pub use home::{HomeChooser, HomeReason};
pub use portmap::{PortMapper, PortmapServices};
pub use report::{Mapping, NatType, Report};
