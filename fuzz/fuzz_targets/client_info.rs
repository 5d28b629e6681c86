//! The server's side of the ClientInfo handshake message.
//!
//! 1. The input as a ClientInfo frame body: client key (32 bytes) ‖ sealed box, opened with
//!    a fixed server key. Random bytes almost never authenticate, so this mostly exercises
//!    the box's length and tag checks.
//! 2. To reach the JSON parser behind the crypto: if the first byte is even, the rest of
//!    the input is sealed as plaintext from a fixed client key to the server key and then
//!    opened, so arbitrary JSON reaches serde. What opens must survive a seal/open round
//!    trip unchanged, and a box sealed with the right keys must never fail to open.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use proto::nacl::SharedBox;
use proto::{NodePrivate, NodePublic};
use relay::handshake::{open_client_info, seal_client_info, HandshakeError};

const SERVER_PRIVATE: [u8; 32] = [0x5e; 32];
const CLIENT_PRIVATE: [u8; 32] = [0xc1; 32];
const NONCE: [u8; 24] = [0x4e; 24];

struct Keys {
    server: NodePrivate,
    server_public: NodePublic,
    client: NodePrivate,
    client_public: NodePublic,
    /// Client → server box, computed once.
    client_to_server: SharedBox,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let server = NodePrivate::from_bytes(SERVER_PRIVATE);
    let client = NodePrivate::from_bytes(CLIENT_PRIVATE);
    let server_public = server.public();
    let client_public = client.public();
    let client_to_server = SharedBox::new(&CLIENT_PRIVATE, server_public.as_bytes());
    Keys {
        server,
        server_public,
        client,
        client_public,
        client_to_server,
    }
});

fuzz_target!(|data: &[u8]| {
    let keys = &*KEYS;

    // 1. Raw frame body: key ‖ sealed.
    if let Some((key, sealed)) = data.split_first_chunk::<32>() {
        let client = NodePublic::from_bytes(*key);
        if let Ok(info) = open_client_info(&keys.server, &client, sealed) {
            let _ = info.mesh_key();
        }
    }

    // 2. Arbitrary JSON, sealed correctly so it gets past the box.
    let Some((&selector, json)) = data.split_first() else {
        return;
    };
    if selector % 2 != 0 {
        return;
    }
    let sealed = keys.client_to_server.seal_with_nonce(&NONCE, json);
    match open_client_info(&keys.server, &keys.client_public, &sealed) {
        Ok(info) => {
            let _ = info.mesh_key();
            let resealed = seal_client_info(&keys.client, &keys.server_public, &info);
            match open_client_info(&keys.server, &keys.client_public, &resealed) {
                Ok(again) => assert_eq!(again, info, "ClientInfo changed across seal/open"),
                Err(e) => panic!("re-sealed {info:?} does not open: {e}"),
            }
        }
        Err(HandshakeError::BadJson(..)) => {}
        Err(e @ HandshakeError::DoesNotOpen(_)) => {
            panic!("box sealed with the right keys does not open: {e}")
        }
    }
});
