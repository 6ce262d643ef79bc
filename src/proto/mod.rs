//! Sans-I/O protocol state machines: bytes in, events and bytes to send out. No tokio here, so
//! every parser can be unit-tested, property-tested and fuzzed without sockets.

pub mod http;
pub mod imap;
pub mod line;
pub mod pop3;
pub mod prelogin;
pub mod sieve;
pub mod smtp;

/// True if `line` looks like an HTTP request line (`GET / HTTP/1.1`). A mail port that receives
/// one closes the connection at once (cross-protocol attacks).
pub fn looks_like_http(line: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"CONNECT ",
        b"PATCH ",
        b"TRACE ",
    ];
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    METHODS
        .iter()
        .any(|m| line.len() > m.len() && line[..m.len()].eq_ignore_ascii_case(m))
        && (line.ends_with(b" HTTP/1.0") || line.ends_with(b" HTTP/1.1"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_detection() {
        assert!(super::looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(super::looks_like_http(b"post /x HTTP/1.0\n"));
        assert!(!super::looks_like_http(b"a LOGIN GET HTTP/1.1\r\n"));
        assert!(!super::looks_like_http(b"GET CAPABILITY\r\n"));
    }
}
