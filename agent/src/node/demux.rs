//! What a datagram on the shared socket (or from a relay) is: STUN, disco or WireGuard,
//! told apart by its first bytes (docs/protocols.md §2.2). Pure.

/// What a datagram on the shared socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stun,
    Disco,
    WireGuard,
    Unknown,
}

/// Classifies a datagram: STUN binding response, disco (magic + minimum length), or
/// WireGuard (message types 1–4 with three zero bytes).
pub fn classify(pkt: &[u8]) -> Kind {
    if netcheck::stun::looks_like_response(pkt) {
        Kind::Stun
    } else if disco::looks_like_disco(pkt) {
        Kind::Disco
    } else if pkt.len() >= 4 && (1..=4).contains(&pkt[0]) && pkt[1..4] == [0, 0, 0] {
        Kind::WireGuard
    } else {
        Kind::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_told_apart_by_their_first_bytes() {
        // STUN binding success response: type 0x0101, length, magic cookie, tx ID.
        let mut stun = vec![0x01, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        stun.extend_from_slice(&[7; 12]);
        assert_eq!(classify(&stun), Kind::Stun);
        // Without the magic cookie it is not STUN.
        let mut old = stun.clone();
        old[4] = 0;
        assert_eq!(classify(&old), Kind::Unknown);
        // Disco: magic and sender key (and a box behind them).
        let mut d = b"TS\xf0\x9f\x92\xac".to_vec();
        d.extend_from_slice(&[1; 32 + 24 + 16]);
        assert_eq!(classify(&d), Kind::Disco);
        assert_eq!(classify(&d[..20]), Kind::Unknown, "disco magic, too short");
        // WireGuard: message types 1 to 4, then three zero bytes.
        for t in 1..=4u8 {
            let mut w = vec![t, 0, 0, 0];
            w.extend_from_slice(&[0xAB; 32]);
            assert_eq!(classify(&w), Kind::WireGuard, "type {t}");
        }
        assert_eq!(classify(&[5, 0, 0, 0, 1]), Kind::Unknown);
        assert_eq!(classify(&[1, 0, 1, 0, 1]), Kind::Unknown);
        assert_eq!(classify(&[1, 0, 0]), Kind::Unknown);
        assert_eq!(classify(&[]), Kind::Unknown);
    }
}
