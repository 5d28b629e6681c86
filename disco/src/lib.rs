//! Disco: the messages two nodes exchange to find a direct path through their NATs
//! (Ping, Pong, CallMeMaybe, sealed as tailscaled seals them), and the per-peer
//! path-selection state machine that decides, with time passed in, whether packets go
//! direct or through a relay.

pub mod defaults;
pub mod message;
pub mod path;

pub use message::{looks_like_disco, sender_key, DiscoBox, DiscoError, Message, TxId};
pub use path::{Action, Path, PathReason, PathState, SendTargets, Via};
