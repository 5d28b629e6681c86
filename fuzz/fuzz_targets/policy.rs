//! Arbitrary UTF-8 as a tailnet policy file (HuJSON); what parses is compiled for three
//! fixed nodes (two users' and one tagged).
//!
//! Checks, beyond "never panics" (deep nesting, unterminated comments, huge ports and
//! protocol numbers included):
//! - a refusal points at a line of the text;
//! - compiling is deterministic: twice gives the same filters and peers;
//! - peers are symmetric and never include the node itself;
//! - every `DstPorts` address and `CapGrant` destination in a node's filter is one of
//!   that node's own addresses.

#![no_main]

use control::server::policy::{Identity, Policy};
use libfuzzer_sys::fuzz_target;

fn node(id: i64, user: &str, tags: &[&str]) -> Identity {
    Identity {
        id,
        user: user.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        addresses: vec![
            format!("100.64.0.{id}").parse().unwrap(),
            format!("fd7a:115c:a1e0::{id}").parse().unwrap(),
        ],
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match Policy::parse(text) {
        Ok(p) => p,
        Err(e) => {
            assert!(e.line >= 1 && e.line <= text.split('\n').count(), "{e}");
            return;
        }
    };
    let nodes = [node(1, "alice", &[]), node(2, "bob", &[]), node(3, "alice", &["tag:server"])];
    let a = policy.compile(&nodes);
    let b = policy.compile(&nodes);
    for n in &nodes {
        assert_eq!(a.filter_for(n.id), b.filter_for(n.id));
        assert_eq!(a.peers_of(n.id), b.peers_of(n.id));
        assert!(!a.peers_of(n.id).contains(&n.id));
        for p in a.peers_of(n.id) {
            assert!(a.peers_of(*p).contains(&n.id), "peers are symmetric");
        }
        let own: Vec<String> = n.addresses.iter().map(|ip| ip.to_string()).collect();
        for rule in a.filter_for(n.id) {
            assert!(rule.dst_ports.iter().all(|d| own.contains(&d.ip)));
            for g in &rule.cap_grant {
                assert!(g.dsts.iter().all(|d| own.iter().any(|o| d.starts_with(&format!("{o}/")))));
            }
        }
    }
});
