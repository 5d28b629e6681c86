//! DERP relaying: the frame codec, the client, and (feature `server`) the relay server
//! `relayd` with its mesh, STUN server, client verification and metrics.
//!
//! Module map: [`frame`] (pure codec), [`handshake`] (ClientInfo/ServerInfo sealing),
//! [`io`] (async frame reading), [`ws`] (DERP over WebSocket), [`client`] (connect and
//! a reconnecting client), and `server`. Backoff, TLS configurations and HTTP heads are
//! in `netbase`.

pub mod client;
pub mod frame;
pub mod handshake;
pub mod io;
pub mod ws;

#[cfg(feature = "server")]
pub mod server;
