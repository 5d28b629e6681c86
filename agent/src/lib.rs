//! agentd, the daemon on every device: keeps the control session, measures the network,
//! holds relay connections, chooses paths with disco, and carries IP packets between the
//! TUN device and peers inside WireGuard.

pub mod acl;
#[cfg(windows)]
mod acl_windows;
pub mod api;
pub mod engine;
pub mod interfaces;
pub mod ipv6;
pub mod node;
pub mod relays;
pub mod service;
pub mod sock;
pub mod state;
pub mod status;
pub mod tundev;
#[cfg(windows)]
mod winpipe;
