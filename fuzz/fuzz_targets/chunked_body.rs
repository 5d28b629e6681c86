//! Arbitrary bytes through the control client's HTTP/1.1 chunked-body decoder (the `/key`
//! answer), under a small and the real body limit.
//!
//! Checks, beyond "never panics" (overflowing sizes like `ffffffffffffffff` included):
//! - a decoded body is within the limit and consumed no more than the input;
//! - the bytes it consumed decode alone to the same body, and any shorter prefix of
//!   them asks for more rather than failing or decoding differently;
//! - what decodes under the small limit decodes the same under the large one;
//! - the body re-encoded as one chunk decodes back to itself.

#![no_main]

use control::chunked::decode;
use libfuzzer_sys::fuzz_target;

const SMALL: usize = 16;
const LARGE: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let small = decode(data, SMALL);
    let large = decode(data, LARGE);
    if let Ok(Some(d)) = &small {
        assert_eq!(large.as_ref().ok().and_then(|l| l.as_ref()), Some(d));
    }
    let Ok(Some(d)) = large else {
        return;
    };
    assert!(d.body.len() <= LARGE);
    assert!(d.consumed <= data.len());
    assert_eq!(decode(&data[..d.consumed], LARGE), Ok(Some(d.clone())));
    for cut in [0, d.consumed / 2, d.consumed.saturating_sub(1)] {
        if cut < d.consumed {
            assert_eq!(decode(&data[..cut], LARGE), Ok(None), "prefix of {cut} bytes");
        }
    }
    let mut again = format!("{:x}\r\n", d.body.len()).into_bytes();
    again.extend_from_slice(&d.body);
    again.extend_from_slice(b"\r\n0\r\n\r\n");
    if d.body.is_empty() {
        again = b"0\r\n\r\n".to_vec();
    }
    assert_eq!(decode(&again, LARGE).map(|r| r.map(|r| r.body)), Ok(Some(d.body)));
});
