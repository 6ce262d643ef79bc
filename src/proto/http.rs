//! HTTP pieces that need no socket: `Authorization: Basic` parsing, request-hygiene checks over a
//! header map, the anonymous-path allow-list, and the rewrite of Stalwart's JSON login form
//! (`POST /api/auth`). The driver in [`crate::session::http`] calls these per request.
//!
//! Everything here refuses ambiguity rather than guessing: an HTTP proxy that reads a request one
//! way while the backend reads it another is how smuggling and credential confusion happen.

use base64::Engine as _;
use hyper::header::{
    HeaderMap, HeaderName, AUTHORIZATION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING,
};

use crate::secret::Secret;

/// Longest `Authorization` value looked at; a Basic credential within the username and
/// password limits is far shorter, and a bearer token is at most 8 KiB (SECURITY.md).
pub const MAX_AUTHORIZATION_LEN: usize = 8 * 1024 + 64;

/// Longest password accepted inside a Basic credential, in bytes.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// Longest request target accepted (SECURITY.md: request line <= 8 KiB).
pub const MAX_TARGET_LEN: usize = 8 * 1024;

/// Largest `/api/auth` login form read into memory; the real form is a few hundred bytes.
pub const MAX_LOGIN_FORM: usize = 16 * 1024;

/// What an `Authorization` header carries.
#[derive(Debug)]
pub enum Authorization {
    /// `Basic` with a well-formed user and password.
    Basic(BasicCredentials),
    /// `Bearer <token>` with a well-formed RFC 6750 token (validated by the `oauth` authenticator).
    Bearer(crate::secret::Secret),
    /// Another scheme (Digest, Negotiate, ...), which Portcullis does not speak.
    Other,
}

/// A decoded Basic credential. The user is still unchecked against the identity rules.
#[derive(Debug)]
pub struct BasicCredentials {
    pub user: Vec<u8>,
    pub password: Secret,
}

/// Why an `Authorization` value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BasicError {
    #[error("authorization value too long")]
    TooLong,
    #[error("no credentials after the scheme")]
    Missing,
    #[error("credentials are not strict base64")]
    Base64,
    #[error("credentials are not UTF-8")]
    NotUtf8,
    #[error("credentials have no colon")]
    NoColon,
    #[error("empty user or password")]
    Empty,
    #[error("password too long")]
    PasswordTooLong,
    #[error("control character in credentials")]
    Control,
    #[error("bearer token is not an RFC 6750 b64token")]
    Token,
}

/// Classifies and, for Basic, decodes an `Authorization` value (RFC 7617).
///
/// The scheme is case-insensitive and followed by exactly one space; the credentials are strict
/// padded base64 (no whitespace, no trailing bits); the decoded text is UTF-8 and split at its
/// *first* colon, since a user id cannot contain one while a password may. Control characters
/// anywhere are refused: no password manager types them, and they are how log lines are forged.
///
/// # Errors
/// [`BasicError`] for a malformed Basic credential.
pub fn parse_authorization(value: &[u8]) -> Result<Authorization, BasicError> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(BasicError::TooLong);
    }
    let (scheme, rest) = match memchr::memchr(b' ', value) {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => (value, &b""[..]),
    };
    if scheme.eq_ignore_ascii_case(b"Bearer") {
        if !crate::sasl::oauth::is_b64token(rest) {
            return Err(BasicError::Token);
        }
        return Ok(Authorization::Bearer(crate::secret::Secret::new(
            rest.to_vec(),
        )));
    }
    if !scheme.eq_ignore_ascii_case(b"Basic") {
        return Ok(Authorization::Other);
    }
    if rest.is_empty() {
        return Err(BasicError::Missing);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .map_err(|_| BasicError::Base64)?;
    let decoded = zeroize::Zeroizing::new(decoded);
    let text = std::str::from_utf8(&decoded).map_err(|_| BasicError::NotUtf8)?;
    if text.chars().any(char::is_control) {
        return Err(BasicError::Control);
    }
    let (user, password) = text.split_once(':').ok_or(BasicError::NoColon)?;
    if user.is_empty() || password.is_empty() {
        return Err(BasicError::Empty);
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(BasicError::PasswordTooLong);
    }
    Ok(Authorization::Basic(BasicCredentials {
        user: user.as_bytes().to_vec(),
        password: Secret::new(password.as_bytes().to_vec()),
    }))
}

/// The value of the `Authorization` header sent to the backend: the master login for `account`.
pub fn master_basic(account: &str, separator: &str, master: &str, secret: &Secret) -> Vec<u8> {
    let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(
        account.len() + separator.len() + master.len() + 1 + secret.len(),
    ));
    plain.extend_from_slice(account.as_bytes());
    plain.extend_from_slice(separator.as_bytes());
    plain.extend_from_slice(master.as_bytes());
    plain.push(b':');
    plain.extend_from_slice(secret.expose());
    let mut out = b"Basic ".to_vec();
    out.extend_from_slice(
        base64::engine::general_purpose::STANDARD
            .encode(&*plain)
            .as_bytes(),
    );
    out
}

/// Why a request was refused before any authentication (answered 400 and the connection closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Hygiene {
    #[error("Content-Length together with Transfer-Encoding")]
    LengthAndChunked,
    #[error("more than one Content-Length")]
    RepeatedLength,
    #[error("malformed Content-Length")]
    BadLength,
    #[error("Transfer-Encoding other than exactly chunked")]
    BadTransferEncoding,
    #[error("more than one Host")]
    RepeatedHost,
    #[error("more than one Authorization")]
    RepeatedAuthorization,
    #[error("header value with a line break or NUL")]
    BadValue,
    #[error("request target too long")]
    TargetTooLong,
}

/// Checks a request's headers for ambiguous framing and duplicated identity (SECURITY.md, HTTP).
///
/// hyper already refuses some of these while parsing; checking the map again keeps the rule in
/// one place whatever hyper's version does, and covers what it tolerates (a repeated identical
/// Content-Length, Content-Length next to chunked).
///
/// # Errors
/// The first [`Hygiene`] problem found.
pub fn check_headers(headers: &HeaderMap, target_len: usize) -> Result<(), Hygiene> {
    if target_len > MAX_TARGET_LEN {
        return Err(Hygiene::TargetTooLong);
    }
    let lengths = headers.get_all(CONTENT_LENGTH).iter().count();
    let encodings: Vec<_> = headers.get_all(TRANSFER_ENCODING).iter().collect();
    if lengths > 0 && !encodings.is_empty() {
        return Err(Hygiene::LengthAndChunked);
    }
    if lengths > 1 {
        return Err(Hygiene::RepeatedLength);
    }
    if let Some(v) = headers.get(CONTENT_LENGTH) {
        let b = v.as_bytes();
        if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
            return Err(Hygiene::BadLength);
        }
    }
    match encodings.as_slice() {
        [] => {}
        [one] if one.as_bytes().eq_ignore_ascii_case(b"chunked") => {}
        _ => return Err(Hygiene::BadTransferEncoding),
    }
    if count(headers, &HOST) > 1 {
        return Err(Hygiene::RepeatedHost);
    }
    if count(headers, &AUTHORIZATION) > 1 {
        return Err(Hygiene::RepeatedAuthorization);
    }
    if headers.values().any(|v| {
        v.as_bytes()
            .iter()
            .any(|&b| b == b'\r' || b == b'\n' || b == 0)
    }) {
        return Err(Hygiene::BadValue);
    }
    Ok(())
}

fn count(headers: &HeaderMap, name: &HeaderName) -> usize {
    headers.get_all(name).iter().count()
}

/// True if `path` may be requested without credentials under `patterns`.
///
/// A pattern ending in `*` matches by prefix, any other exactly. A path with a dot segment, an
/// empty segment or a percent-encoded `.`, `/` or `\` never matches: the backend normalizes such
/// paths, and `/.well-known/../jmap/session` must not become anonymous.
/// The OAuth error in an authorization server's answer that counts as an attack signal
/// (DESIGN.md §2): a guessed or replayed grant (`invalid_grant`), a guessed client secret
/// (`invalid_client`), or device-code polling that ignores `slow_down`. `authorization_pending`
/// and other answers are a client doing its job. Only `400`/`401` JSON bodies are read.
pub fn oauth_failure(status: u16, body: &[u8]) -> Option<&'static str> {
    if !matches!(status, 400 | 401) {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    match doc.get("error")?.as_str()? {
        "invalid_grant" => Some("invalid_grant"),
        "invalid_client" => Some("invalid_client"),
        "slow_down" => Some("slow_down"),
        _ => None,
    }
}

pub fn is_anonymous(path: &str, patterns: &[String]) -> bool {
    if !is_plain_path(path) {
        return false;
    }
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => path == p,
    })
}

/// True if `path` is absolute and free of anything a server might normalize away.
pub fn is_plain_path(path: &str) -> bool {
    if !path.starts_with('/') || path.contains("//") || path.contains('\\') {
        return false;
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    !(lower.contains("%2e")
        || lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%00"))
}

/// The credentials in Stalwart's JSON login form (`POST /api/auth`, v0.16).
#[derive(Debug)]
pub struct LoginForm {
    pub account_name: Vec<u8>,
    pub account_secret: Secret,
    /// Every other member, passed on unchanged.
    rest: serde_json::Map<String, serde_json::Value>,
}

/// Why a login form was refused (answered 400, never forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("login form too large")]
    TooLarge,
    #[error("login form is not a JSON object")]
    NotObject,
    #[error("login form lacks a string accountName or accountSecret")]
    Missing,
    #[error("login form repeats a member")]
    Repeated,
}

/// Reads Stalwart's login form: a JSON object with string members `accountName` and
/// `accountSecret` (other members, such as a TOTP code, are kept as they are).
///
/// A member that appears twice is refused: JSON parsers disagree about which one wins, and the
/// proxy and Stalwart must agree on whose password was checked.
///
/// # Errors
/// [`FormError`].
pub fn parse_login_form(body: &[u8]) -> Result<LoginForm, FormError> {
    if body.len() > MAX_LOGIN_FORM {
        return Err(FormError::TooLarge);
    }
    if has_repeated_member(body)? {
        return Err(FormError::Repeated);
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| FormError::NotObject)?;
    let serde_json::Value::Object(mut rest) = value else {
        return Err(FormError::NotObject);
    };
    let (Some(serde_json::Value::String(name)), Some(serde_json::Value::String(secret))) =
        (rest.remove("accountName"), rest.remove("accountSecret"))
    else {
        return Err(FormError::Missing);
    };
    Ok(LoginForm {
        account_name: name.into_bytes(),
        account_secret: Secret::new(secret.into_bytes()),
        rest,
    })
}

/// Detects a repeated top-level member by deserializing into a list of pairs.
fn has_repeated_member(body: &[u8]) -> Result<bool, FormError> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    let Keys(mut keys) = serde_json::from_slice(body).map_err(|_| FormError::NotObject)?;
    let n = keys.len();
    keys.sort_unstable();
    keys.dedup();
    Ok(keys.len() != n)
}

impl LoginForm {
    /// The form as sent to the backend: the master login for `account`, other members kept.
    pub fn rewritten(
        &self,
        account: &str,
        separator: &str,
        master: &str,
        secret: &Secret,
    ) -> zeroize::Zeroizing<Vec<u8>> {
        let mut map = self.rest.clone();
        map.insert(
            "accountName".into(),
            serde_json::Value::String(format!("{account}{separator}{master}")),
        );
        map.insert(
            "accountSecret".into(),
            serde_json::Value::String(String::from_utf8_lossy(secret.expose()).into_owned()),
        );
        let out = serde_json::to_vec(&serde_json::Value::Object(map)).unwrap_or_default();
        zeroize::Zeroizing::new(out)
    }
}

/// Why the HTTP/1 byte scanner closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Framing {
    #[error("Content-Length together with Transfer-Encoding")]
    LengthAndChunked,
    #[error("more than one Content-Length")]
    RepeatedLength,
    #[error("bare LF in a request head")]
    BareLf,
    #[error("malformed chunk size")]
    BadChunk,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Most bytes of one request head the scanner keeps; hyper refuses larger heads itself.
const SCAN_HEAD_MAX: usize = 32 * 1024;
/// Longest chunk-size line (with extensions) accepted.
const SCAN_CHUNK_LINE_MAX: usize = 1024;

#[derive(Debug)]
enum ScanState {
    /// Collecting a request head.
    Head(Vec<u8>),
    /// Inside a body of known length.
    Fixed(u64),
    /// Reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// Inside chunk data, then its CRLF (`n` counts both).
    ChunkData(u64),
    /// Reading trailer lines after the last chunk (the bytes of the current line).
    Trailer(Vec<u8>),
    /// Not HTTP/1 framing any more (HTTP/2 preface, an upgrade, a head hyper will refuse).
    Off,
}

/// Watches the bytes of an HTTP/1 connection on their way to hyper and fails the connection on
/// framing that hyper tolerates but SECURITY.md refuses: Content-Length next to
/// Transfer-Encoding (hyper lets chunked win and drops the length), repeated Content-Length
/// (hyper merges equal values) and bare LF line ends. It follows request heads and bodies so that
/// every head on a keep-alive connection is seen; anything it cannot follow it leaves to hyper.
#[derive(Debug)]
pub struct Http1Scanner {
    state: ScanState,
    first: bool,
}

impl Default for Http1Scanner {
    fn default() -> Self {
        Self {
            state: ScanState::Head(Vec::new()),
            first: true,
        }
    }
}

impl Http1Scanner {
    /// Feeds the next bytes read from the client.
    ///
    /// # Errors
    /// [`Framing`] on the first refused construct; the connection must then be closed.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), Framing> {
        while !input.is_empty() {
            match &mut self.state {
                ScanState::Off => return Ok(()),
                ScanState::Head(buf) => {
                    // Leading empty lines before a request line are allowed (RFC 9112 §2.2).
                    if buf.is_empty() {
                        let skip = input
                            .iter()
                            .take_while(|&&b| b == b'\r' || b == b'\n')
                            .count();
                        input = &input[skip..];
                        if input.is_empty() {
                            return Ok(());
                        }
                    }
                    let before = buf.len();
                    let room = SCAN_HEAD_MAX.saturating_sub(before);
                    let take = input.len().min(room);
                    buf.extend_from_slice(&input[..take]);
                    if self.first && buf.len() >= H2_PREFACE.len() {
                        // Prior-knowledge HTTP/2 (cleartext): not ours to follow.
                        self.first = false;
                        if buf.starts_with(H2_PREFACE) {
                            self.state = ScanState::Off;
                            return Ok(());
                        }
                    }
                    let end = memchr::memmem::find(buf, b"\r\n\r\n");
                    // Every LF of the head must end a CRLF, checked as the bytes arrive (a head
                    // ending in `\n\r\n` has no `\r\n\r\n` to wait for). The body after the
                    // head is not looked at here.
                    let upto = end.map_or(buf.len(), |e| e + 4);
                    let from = before.min(upto);
                    if memchr::memchr_iter(b'\n', &buf[from..upto])
                        .any(|i| from + i == 0 || buf[from + i - 1] != b'\r')
                    {
                        return Err(Framing::BareLf);
                    }
                    let Some(end) = end else {
                        if take < input.len() {
                            // Larger than any head hyper accepts: hyper answers 431.
                            self.state = ScanState::Off;
                        }
                        input = &input[take..];
                        continue;
                    };
                    self.first = false;
                    let head_len = end + 4;
                    let consumed = head_len - before;
                    let head = std::mem::take(buf);
                    input = &input[consumed..];
                    self.state = Self::after_head(&head[..head_len])?;
                }
                ScanState::Fixed(n) => {
                    let take = (*n).min(input.len() as u64);
                    *n -= take;
                    input = &input[take as usize..];
                    if *n == 0 {
                        self.state = ScanState::Head(Vec::new());
                    }
                }
                ScanState::ChunkSize(line) => {
                    let Some(i) = memchr::memchr(b'\n', input) else {
                        line.extend_from_slice(input);
                        if line.len() > SCAN_CHUNK_LINE_MAX {
                            return Err(Framing::BadChunk);
                        }
                        return Ok(());
                    };
                    line.extend_from_slice(&input[..=i]);
                    input = &input[i + 1..];
                    let size = parse_chunk_size(line)?;
                    self.state = if size == 0 {
                        ScanState::Trailer(Vec::new())
                    } else {
                        ScanState::ChunkData(size.saturating_add(2))
                    };
                }
                ScanState::ChunkData(n) => {
                    let take = (*n).min(input.len() as u64);
                    *n -= take;
                    input = &input[take as usize..];
                    if *n == 0 {
                        self.state = ScanState::ChunkSize(Vec::new());
                    }
                }
                ScanState::Trailer(line) => {
                    let Some(i) = memchr::memchr(b'\n', input) else {
                        line.extend_from_slice(input);
                        if line.len() > SCAN_HEAD_MAX {
                            self.state = ScanState::Off;
                        }
                        return Ok(());
                    };
                    line.extend_from_slice(&input[..=i]);
                    input = &input[i + 1..];
                    if line.as_slice() == b"\r\n" {
                        self.state = ScanState::Head(Vec::new());
                    } else {
                        line.clear();
                    }
                }
            }
        }
        Ok(())
    }

    fn after_head(head: &[u8]) -> Result<ScanState, Framing> {
        if head
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
        {
            return Err(Framing::BareLf);
        }
        let mut fields = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut fields);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            // hyper will refuse it and close.
            return Ok(ScanState::Off);
        }
        let mut length: Option<u64> = None;
        let mut lengths = 0;
        let mut chunked = false;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if chunked && lengths > 0 {
            return Err(Framing::LengthAndChunked);
        }
        if lengths > 1 {
            return Err(Framing::RepeatedLength);
        }
        if upgrade || req.method == Some("CONNECT") {
            // After a 101 the bytes are another protocol's.
            return Ok(ScanState::Off);
        }
        Ok(match (chunked, length) {
            (true, _) => ScanState::ChunkSize(Vec::new()),
            (false, Some(n)) if n > 0 => ScanState::Fixed(n),
            (false, Some(_)) => ScanState::Head(Vec::new()),
            // A malformed length: hyper answers 400 and closes.
            (false, None) if lengths > 0 => ScanState::Off,
            (false, None) => ScanState::Head(Vec::new()),
        })
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, Framing> {
    let line = line.strip_suffix(b"\r\n").ok_or(Framing::BadChunk)?;
    let hex = match memchr::memchr(b';', line) {
        Some(i) => &line[..i],
        None => line,
    };
    if hex.is_empty() || hex.len() > 16 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(Framing::BadChunk);
    }
    let text = std::str::from_utf8(hex).map_err(|_| Framing::BadChunk)?;
    u64::from_str_radix(text, 16).map_err(|_| Framing::BadChunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use proptest::prelude::*;

    fn basic(s: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
        .into_bytes()
    }

    #[test]
    fn basic_splits_at_the_first_colon() {
        let Ok(Authorization::Basic(c)) = parse_authorization(&basic("alice:pa:ss")) else {
            panic!("not basic");
        };
        assert_eq!(c.user, b"alice");
        assert_eq!(c.password.expose(), b"pa:ss");
        assert!(matches!(
            parse_authorization(b"bAsIc YWxpY2U6cHc="),
            Ok(Authorization::Basic(_))
        ));
    }

    #[test]
    fn basic_is_strict() {
        let cases: &[(&[u8], BasicError)] = &[
            (b"Basic", BasicError::Missing),
            (b"Basic ", BasicError::Missing),
            (b"Basic  YWxpY2U6cHc=", BasicError::Base64),
            (b"Basic YWxpY2U6cHc", BasicError::Base64),
            (b"Basic YWxpY2U6cHc= ", BasicError::Base64),
            (b"Basic YWxp Y2U6cHc=", BasicError::Base64),
            (b"Basic YWxpY2U6cHc==", BasicError::Base64),
            (b"Basic YWxpY2Vwdw==", BasicError::NoColon),
            (b"Basic OnB3", BasicError::Empty),
            (b"Basic YWxpY2U6", BasicError::Empty),
            (b"Basic /w==", BasicError::NotUtf8),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_authorization(input).err(),
                Some(*want),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            parse_authorization(&basic("al\nice:pw")).err(),
            Some(BasicError::Control)
        );
        assert_eq!(
            parse_authorization(&vec![b'a'; MAX_AUTHORIZATION_LEN + 1]).err(),
            Some(BasicError::TooLong)
        );
    }

    #[test]
    fn oauth_endpoint_failures() {
        assert_eq!(
            oauth_failure(400, br#"{"error":"invalid_grant","error_description":"x"}"#),
            Some("invalid_grant")
        );
        assert_eq!(
            oauth_failure(401, br#"{"error":"invalid_client"}"#),
            Some("invalid_client")
        );
        assert_eq!(
            oauth_failure(400, br#"{"error":"slow_down"}"#),
            Some("slow_down")
        );
        assert_eq!(
            oauth_failure(400, br#"{"error":"authorization_pending"}"#),
            None
        );
        assert_eq!(oauth_failure(200, br#"{"error":"invalid_grant"}"#), None);
        assert_eq!(oauth_failure(400, b"<html>"), None);
        assert_eq!(oauth_failure(400, br#"{"error":7}"#), None);
    }

    #[test]
    fn other_schemes_are_classified() {
        match parse_authorization(b"Bearer abc.d-e_f~g+h/i==") {
            Ok(Authorization::Bearer(t)) => assert!(t.ct_eq(b"abc.d-e_f~g+h/i==")),
            other => panic!("{other:?}"),
        }
        for bad in [&b"Bearer "[..], b"Bearer a b", b"Bearer a", b"bearer =x"] {
            assert_eq!(
                parse_authorization(bad).err(),
                Some(BasicError::Token),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_authorization(b"Digest x=y"),
            Ok(Authorization::Other)
        ));
        assert!(matches!(parse_authorization(b""), Ok(Authorization::Other)));
    }

    #[test]
    fn master_basic_is_the_master_form() {
        let v = master_basic("alice@example.org", "%", "proxy", &Secret::from("s:e"));
        let Ok(Authorization::Basic(c)) = parse_authorization(&v) else {
            panic!("not basic");
        };
        assert_eq!(c.user, b"alice@example.org%proxy");
        assert_eq!(c.password.expose(), b"s:e");
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hygiene_refuses_ambiguous_framing_and_identity() {
        let bad: &[(&[(&str, &str)], Hygiene)] = &[
            (
                &[("content-length", "3"), ("transfer-encoding", "chunked")],
                Hygiene::LengthAndChunked,
            ),
            (
                &[("content-length", "3"), ("content-length", "3")],
                Hygiene::RepeatedLength,
            ),
            (&[("content-length", "+3")], Hygiene::BadLength),
            (&[("content-length", "3 ")], Hygiene::BadLength),
            (
                &[("transfer-encoding", "gzip, chunked")],
                Hygiene::BadTransferEncoding,
            ),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                Hygiene::BadTransferEncoding,
            ),
            (
                &[("transfer-encoding", "xchunked")],
                Hygiene::BadTransferEncoding,
            ),
            (&[("host", "a"), ("host", "b")], Hygiene::RepeatedHost),
            (
                &[("authorization", "Basic x"), ("authorization", "Basic y")],
                Hygiene::RepeatedAuthorization,
            ),
        ];
        for (pairs, want) in bad {
            assert_eq!(check_headers(&map(pairs), 1), Err(*want), "{pairs:?}");
        }
        assert_eq!(
            check_headers(&map(&[("content-length", "10"), ("host", "x")]), 1),
            Ok(())
        );
        assert_eq!(
            check_headers(&map(&[("transfer-encoding", "Chunked")]), 1),
            Ok(())
        );
        assert_eq!(
            check_headers(&HeaderMap::new(), MAX_TARGET_LEN + 1),
            Err(Hygiene::TargetTooLong)
        );
    }

    #[test]
    fn anonymous_paths_match_by_prefix_or_exactly() {
        let p: Vec<String> = ["/.well-known/*", "/login", "/auth/*"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert!(is_anonymous("/.well-known/caldav", &p));
        assert!(is_anonymous("/login", &p));
        assert!(is_anonymous("/auth/token", &p));
        assert!(!is_anonymous("/login/x", &p));
        assert!(!is_anonymous("/jmap/session", &p));
        assert!(!is_anonymous("/.well-known/../jmap/session", &p));
        assert!(!is_anonymous("/.well-known/%2e%2e/jmap", &p));
        assert!(!is_anonymous("/.well-known/%2E%2E%2Fjmap", &p));
        assert!(!is_anonymous("/auth//../dav", &p));
        assert!(!is_anonymous("/auth/.\\..\\dav", &p));
        assert!(!is_anonymous("*", &p));
    }

    #[test]
    fn login_form_is_rewritten_for_the_master() {
        let f = parse_login_form(br#"{"accountName":"Alice","accountSecret":"pw","totp":"1"}"#)
            .unwrap();
        assert_eq!(f.account_name, b"Alice");
        assert_eq!(f.account_secret.expose(), b"pw");
        let out = f.rewritten("alice@example.org", "%", "proxy", &Secret::from("m\"s"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["accountName"], "alice@example.org%proxy");
        assert_eq!(v["accountSecret"], "m\"s");
        assert_eq!(v["totp"], "1");
        for bad in [
            &br#"{"accountName":"a","accountSecret":"b","accountName":"c"}"#[..],
            br#"{"accountName":"a"}"#,
            br#"{"accountName":1,"accountSecret":"b"}"#,
            br#"["accountName"]"#,
            b"not json",
        ] {
            assert!(
                parse_login_form(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn scan(chunks: &[&[u8]]) -> Result<(), Framing> {
        let mut s = Http1Scanner::default();
        for c in chunks {
            s.feed(c)?;
        }
        Ok(())
    }

    /// Feeds `input` split at every byte position, expecting the same answer each time.
    fn scan_split(input: &[u8]) -> Result<(), Framing> {
        let whole = scan(&[input]);
        for i in 0..input.len() {
            assert_eq!(scan(&[&input[..i], &input[i..]]), whole, "split at {i}");
        }
        whole
    }

    #[test]
    fn scanner_refuses_what_hyper_tolerates_on_every_head() {
        let ok: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n";
        assert_eq!(scan_split(ok), Ok(()));
        let after = |bad: &[u8]| [ok, bad].concat();
        assert_eq!(
            scan_split(&after(
                b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            Err(Framing::LengthAndChunked)
        );
        assert_eq!(
            scan_split(&after(
                b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n"
            )),
            Err(Framing::RepeatedLength)
        );
        assert_eq!(
            scan_split(&after(b"GET / HTTP/1.1\nHost: x\r\n\r\n")),
            Err(Framing::BareLf)
        );
        // A head ending in `\n\r\n` never shows `\r\n\r\n`: refused as it arrives, not
        // waited on.
        assert_eq!(
            scan_split(&after(b"GET / HTTP/1.1\r\nHost: x\n\r\n")),
            Err(Framing::BareLf)
        );
        assert_eq!(
            scan(&[b"GET / HTTP/1.1\r\nHost: x\n", b"\r\n"]),
            Err(Framing::BareLf)
        );
        assert_eq!(
            scan(&[b"GET / HTTP/1.1\r\nHost: x\n"]),
            Err(Framing::BareLf)
        );
        assert_eq!(
            scan_split(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            Err(Framing::BadChunk)
        );
        // A body that looks like a bad head is only body.
        assert_eq!(
            scan_split(b"POST / HTTP/1.1\r\nContent-Length: 20\r\n\r\nGET /\nX\n\nabcdefghijk"),
            Ok(())
        );
        assert_eq!(scan(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\n\n"]), Ok(()));
    }

    proptest! {
        #[test]
        fn basic_round_trips(user in "[a-zA-Z0-9@._-]{1,40}", pw in "[ -~]{1,60}") {
            let v = basic(&format!("{user}:{pw}"));
            let Ok(Authorization::Basic(c)) = parse_authorization(&v) else {
                return Err(TestCaseError::fail("not basic"));
            };
            prop_assert_eq!(c.user, user.as_bytes());
            prop_assert_eq!(c.password.expose(), pw.as_bytes());
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_authorization(&bytes);
            let _ = parse_login_form(&bytes);
            let _ = Http1Scanner::default().feed(&bytes);
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = is_anonymous(s, &["/a/*".to_owned()]);
            }
        }
    }
}
