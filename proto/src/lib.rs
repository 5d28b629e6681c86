//! Wire types every agentd program shares.
//!
//! This crate holds values, not behaviour: the key types with their text forms
//! (`nodekey:…`, `discokey:…`, `mkey:…`, `privkey:…`), the NaCl box used by DERP and
//! disco, and the relay map (DERPMap) with Tailscale's JSON field names. It does no I/O
//! apart from [`RelayMap::load`], which reads a file.

pub mod keys;
pub mod nacl;
pub mod netmap;
pub mod relaymap;
pub mod tailcfg;

pub use keys::{
    DiscoPrivate, DiscoPublic, KeyParseError, MachinePrivate, MachinePublic, MeshKey, NodePrivate,
    NodePublic,
};
pub use relaymap::{NodeAddr, RelayMap, RelayNode, RelayRegion};
