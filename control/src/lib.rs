//! Tailscale's ts2021 coordination protocol.
//!
//! So far: the Noise IK handshake in Tailscale's framing ([`noise`]) and the record layer
//! that carries HTTP/2 after it ([`record`]). Both are pure state machines (bytes in,
//! bytes out) so they can be tested against known vectors and fuzzed. The control client
//! and controld (feature `server`) build on them.

pub mod chunked;
pub mod client;
pub mod deadline;
pub mod defaults;
pub mod dial;
pub mod mapframe;
pub mod noise;
pub mod record;
pub mod session;
pub mod stream;

#[cfg(feature = "server")]
pub mod server;
