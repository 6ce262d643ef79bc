//! The HTTP pieces that see client bytes before authentication: the `Authorization` parser, the
//! login-form reader, the anonymous-path matcher and the HTTP/1 framing scanner (fed in chunks).
//! Invariants: no panic; an accepted Basic credential has a non-empty user without a colon or
//! control character and a non-empty password; an accepted Bearer token is an RFC 6750
//! `b64token` (it is copied into a request to the token validator); a path with a dot segment is
//! never anonymous; once the scanner refuses, feeding more never makes it accept again. The
//! token-endpoint error classifier sees the same bytes as an answer body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proto::http::{
    is_anonymous, oauth_failure, parse_authorization, parse_login_form, Authorization,
    Http1Scanner,
};
use portcullis::sasl::oauth::is_b64token;

fuzz_target!(|data: &[u8]| {
    if let Ok(Authorization::Basic(c)) = parse_authorization(data) {
        assert!(!c.user.is_empty() && !c.password.is_empty());
        assert!(!c.user.contains(&b':'));
        assert!(!c.user.iter().any(|b| *b < 0x20 || *b == 0x7f));
    }
    if let Ok(Authorization::Bearer(t)) = parse_authorization(data) {
        assert!(is_b64token(t.expose()));
    }
    let _ = oauth_failure(400, data);
    let _ = parse_login_form(data);
    if let Ok(path) = std::str::from_utf8(data) {
        if is_anonymous(path, &["/.well-known/*".to_owned(), "/login".to_owned()]) {
            assert!(!path.split('/').any(|s| s == ".." || s == "."));
        }
    }
    // First byte chooses the chunk size, so the same input is also seen split.
    let (size, rest) = match data.split_first() {
        Some((n, rest)) => (usize::from(*n % 64) + 1, rest),
        None => (1, data),
    };
    let mut scanner = Http1Scanner::default();
    let mut failed = false;
    for chunk in rest.chunks(size) {
        if scanner.feed(chunk).is_err() {
            failed = true;
            break;
        }
    }
    let whole = Http1Scanner::default().feed(rest).is_err();
    assert_eq!(failed, whole, "chunking changed the scanner's answer");
});
