//! Plumbing below the protocols that the relay, the control server and their clients
//! (and netcheck) all need, written once: reading and parsing HTTP/1.1 heads ([`http`]),
//! rustls client and server configurations ([`tls`]), and jittered reconnect delays
//! ([`backoff`]).
//!
//! Not for: anything that knows a protocol of ours (DERP framing, the control protocol,
//! disco) — that lives in the crate of the protocol.

pub mod backoff;
pub mod http;
pub mod tls;

pub use backoff::Backoff;
