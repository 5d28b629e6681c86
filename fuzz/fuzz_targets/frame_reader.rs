//! Feeds arbitrary bytes to the DERP frame reader as a server would see them: `decode`
//! in a loop with the post-handshake limit, `Frame::parse` on each frame.
//!
//! Checks, beyond "never panics":
//! - `decode` consumes exactly header + body of each frame it returns, and nothing when
//!   it needs more bytes or refuses a frame;
//! - feeding the same bytes in small chunks (as a socket would) yields the same frames;
//! - every frame that parses (except `Unknown`) re-encodes to a single frame that
//!   decodes and parses back to an equal `Frame`.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use relay::frame::{decode, Frame, FrameError, HEADER_LEN, MAX_SERVER_RECV_FRAME};

/// Bytes appended per step in the chunked pass; odd so headers get split.
const CHUNK: usize = 3;

type Decoded = Result<(u8, Bytes), FrameError>;

/// Decodes `buf` to the end: every frame, then the error if one stopped the stream.
fn decode_all(buf: &mut BytesMut, out: &mut Vec<Decoded>) -> bool {
    loop {
        let before = buf.len();
        match decode(buf, MAX_SERVER_RECV_FRAME) {
            Ok(Some((frame_type, body))) => {
                assert!(body.len() <= MAX_SERVER_RECV_FRAME, "body over the limit");
                assert_eq!(
                    before - buf.len(),
                    HEADER_LEN + body.len(),
                    "decode consumed the wrong number of bytes"
                );
                out.push(Ok((frame_type, body)));
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "decode consumed a partial frame");
                return true;
            }
            Err(e) => {
                assert_eq!(buf.len(), before, "decode consumed a refused frame");
                out.push(Err(e));
                return false;
            }
        }
    }
}

fn check_round_trip(frame: &Frame) {
    if matches!(frame, Frame::Unknown { .. }) {
        return;
    }
    let mut wire = BytesMut::new();
    frame.encode(&mut wire);
    // No limit here: the re-encoding may legitimately be larger than the input frame
    // (Health turns each invalid UTF-8 byte into a 3-byte U+FFFD).
    let (frame_type, body) = match decode(&mut wire, usize::MAX) {
        Ok(Some(tb)) => tb,
        other => panic!("re-encoding of {frame:?} does not decode: {other:?}"),
    };
    assert!(
        wire.is_empty(),
        "re-encoding of {frame:?} left {} trailing bytes",
        wire.len()
    );
    match Frame::parse(frame_type, body) {
        Ok(again) => assert_eq!(&again, frame, "frame changed across encode/decode"),
        Err(e) => panic!("re-encoding of {frame:?} does not parse: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // Whole input at once.
    let mut buf = BytesMut::from(data);
    let mut whole = Vec::new();
    decode_all(&mut buf, &mut whole);

    for d in &whole {
        if let Ok((frame_type, body)) = d {
            if let Ok(frame) = Frame::parse(*frame_type, body.clone()) {
                check_round_trip(&frame);
            }
        }
    }

    // Same bytes, arriving a few at a time.
    let mut buf = BytesMut::new();
    let mut chunked = Vec::new();
    for chunk in data.chunks(CHUNK) {
        buf.extend_from_slice(chunk);
        if !decode_all(&mut buf, &mut chunked) {
            break;
        }
    }
    assert_eq!(whole, chunked, "chunked reading differs from whole reading");
});
