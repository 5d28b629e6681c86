//! Arbitrary bytes through the disco opener (as the receive path sees them: sender key
//! read first, then the box opened) and through the plaintext parser. Neither may panic,
//! and every plaintext that parses must re-encode to something that parses the same.
#![no_main]

use disco::{DiscoBox, Message};
use libfuzzer_sys::fuzz_target;
use proto::DiscoPrivate;

fuzz_target!(|data: &[u8]| {
    let me = DiscoPrivate::from_bytes([1; 32]);
    let peer = DiscoPrivate::from_bytes([2; 32]);
    let bx = DiscoBox::new(&me, &peer.public());
    let _ = disco::sender_key(data);
    let _ = bx.open(data);
    // Plaintexts sealed with the right key reach the parser through the opener too.
    let sealed = DiscoBox::new(&peer, &me.public()).seal_plaintext(&peer.public(), data);
    let opened = bx.open(&sealed);
    if let Ok(m) = Message::parse(data) {
        assert_eq!(opened.as_ref().ok(), Some(&m));
        if !matches!(m, Message::Unknown { .. }) {
            assert_eq!(Message::parse(&m.encode()).ok(), Some(m));
        }
    }
});
