//! Arbitrary bytes as a control server's MapResponse JSON, then merged into a network map.
//!
//! Checks, beyond "never panics":
//! - what parses re-encodes to JSON that parses to the same encoding (one bad entry in
//!   `Addresses` or `AllowedIPs` is set aside, not kept half-parsed);
//! - no prefix list holds more than `MAX_PREFIXES` entries;
//! - merging the same response twice gives the same map as merging it once.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::netmap::NetMap;
use proto::prefix::MAX_PREFIXES;
use proto::tailcfg::MapResponse;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = serde_json::from_slice::<MapResponse>(data) else {
        return;
    };
    let once = serde_json::to_vec(&r).expect("a parsed response encodes");
    let again: MapResponse = serde_json::from_slice(&once).expect("its encoding parses");
    assert_eq!(serde_json::to_vec(&again).expect("encodes"), once);
    for n in r.node.iter().chain(r.peers.iter()) {
        assert!(n.addresses.len() <= MAX_PREFIXES);
        assert!(n.allowed_ips.as_ref().is_none_or(|a| a.len() <= MAX_PREFIXES));
    }
    let mut a = NetMap::default();
    a.apply(r.clone());
    let mut b = a.clone();
    b.apply(r);
    assert_eq!(a, b);
});
