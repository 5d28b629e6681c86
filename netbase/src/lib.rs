//! Plumbing below the protocols that the relay, the control server and their clients
//! (and netcheck) all need, written once: reading and parsing HTTP/1.1 heads ([`http`]),
//! rustls client and server configurations ([`tls`]), jittered reconnect delays
//! ([`backoff`]), and counted reasons for drops and closes ([`reasons`]).
//!
//! Not for: anything that knows a protocol of ours (DERP framing, the control protocol,
//! disco) — that lives in the crate of the protocol.

pub mod backoff;
pub mod http;
pub mod reasons;
pub mod tls;

pub use backoff::Backoff;
