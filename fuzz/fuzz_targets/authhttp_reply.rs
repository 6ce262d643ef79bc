//! Authenticator replies (a hostile or broken authenticator): the bounded HTTP/1.x response
//! parser and the nginx auth_http and JSON interpreters. Invariants: no panic; the parse does
//! not depend on how the bytes arrived; an accepted reply from a garbage stream is rare but must
//! still carry a canonical account that passes the username rules once `Checked` validates it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::authn::http::{parse_response, parse_response_at_eof, Parsed};
use portcullis::authn::{json, nginx};

fuzz_target!(|data: &[u8]| {
    // Byte-at-a-time arrival must agree with all-at-once.
    let whole = parse_response(data);
    let mut incremental = None;
    for end in 0..=data.len() {
        if let Ok(Parsed::Complete { consumed, .. }) = parse_response(&data[..end]) {
            incremental = Some(consumed);
            break;
        }
    }
    if let Ok(Parsed::Complete { consumed, .. }) = &whole {
        assert!(*consumed <= data.len());
        assert!(incremental.is_some());
    }
    if let Ok(Parsed::Complete { response, .. }) = whole {
        let _ = nginx::interpret(&response);
        let _ = json::interpret(&response);
    }
    if let Ok(response) = parse_response_at_eof(data) {
        let _ = nginx::interpret(&response);
        let _ = json::interpret(&response);
    }
});
