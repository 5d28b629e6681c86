//! Wire types every agentd program shares.
//!
//! This crate holds values, not behaviour: the key types with their text forms
//! (`nodekey:…`, `discokey:…`, `mkey:…`, `privkey:…`), the NaCl box used by DERP and
//! disco, the relay map (DERPMap) and the control-protocol messages with Tailscale's JSON
//! field names, and the merged network map. Its only I/O is reading a relay-map file
//! ([`RelayMap::load`]) and private-key files ([`secretfile`]).

pub mod keys;
pub mod localapi;
pub mod nacl;
pub mod netmap;
pub mod prefix;
pub mod relaymap;
pub mod secretfile;
pub mod tailcfg;

pub use ipnet::IpNet;
pub use keys::{
    DiscoPrivate, DiscoPublic, KeyParseError, MachinePrivate, MachinePublic, MeshKey, NodePrivate,
    NodePublic,
};
pub use prefix::Prefixes;
pub use relaymap::{NodeAddr, RegionId, RelayMap, RelayNode, RelayRegion};
