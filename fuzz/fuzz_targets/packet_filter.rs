//! Arbitrary bytes as a `PacketFilter` (JSON, up to the first 0xff byte) and as packets
//! (the rest) through agentd's packet filter.
//!
//! Checks, beyond "never panics": the verdict for a packet does not depend on what other
//! packets were checked before it (checking is read-only); a filter of `[]` lets in no new
//! TCP connection or UDP packet, whatever the packet; recording a packet as outbound never
//! lets the table grow past its bound.

#![no_main]

use std::time::Instant;

use agent::node::filter::{Deny, PacketFilter, MAX_FLOWS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (rules, packets) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let now = Instant::now();
    let mut f = PacketFilter::default();
    f.set_local(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rules) {
        f.set_rules(Some(&v));
    }
    let mut empty = PacketFilter::default();
    empty.set_local(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
    empty.set_rules(Some(&serde_json::json!([])));
    for p in packets.chunks(64) {
        let first = f.check_inbound(p, now);
        assert_eq!(f.check_inbound(p, now), first);
        if let Err(e) = empty.check_inbound(p, now) {
            assert!(matches!(e, Deny::Malformed | Deny::NoRule), "{e:?}");
        }
        f.note_outbound(p, now);
        assert!(f.flow_count() <= MAX_FLOWS);
    }
});
