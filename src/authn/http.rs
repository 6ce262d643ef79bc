//! A small, bounded HTTP/1.x client for the `nginx` and `json` authenticators.
//!
//! Hand-written rather than hyper because nginx's `auth_http` protocol is defined by the exact
//! bytes nginx sends (HTTP/1.0, header names, case and order), which hyper does not let a caller
//! control. The caller builds the whole request; this module only writes those bytes and reads one
//! response under hard limits.
//!
//! The response parser ([`parse_response`]) is pure so that it can be unit-, property- and
//! fuzz-tested without sockets. It is strict where ambiguity could be abused (Content-Length with
//! Transfer-Encoding, repeated Content-Length, bare LF, obs-fold) and bounded everywhere: a head of
//! at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields, a decoded body of at most [`MAX_BODY`].

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zeroize::{Zeroize, Zeroizing};

/// Largest response head (status line, headers, and any 1xx interim responses before it).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields accepted in one response head.
pub const MAX_HEADERS: usize = 64;
/// Largest (decoded) response body.
pub const MAX_BODY: usize = 64 * 1024;
/// Framing bytes allowed on top of the body in a chunked response (sizes, extensions, trailers),
/// so that a server cannot make us buffer far more than [`MAX_BODY`] through tiny chunks.
pub const MAX_CHUNK_OVERHEAD: usize = 16 * 1024;
/// Longest chunk-size line (size plus extensions).
const MAX_CHUNK_LINE: usize = 1024;

/// Idle pooled connections kept at most; more are closed, the authenticator sees a bounded fan-in.
pub const DEFAULT_MAX_IDLE: usize = 32;
/// How long an idle pooled connection is kept; servers typically close idle ones after 60–75 s,
/// so staying below avoids sending into a connection the server is closing.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Endpoint

/// Why an authenticator URL was refused. Messages are printed as `authenticator.url: <message>`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EndpointError {
    #[error("must start with http:// or https://")]
    UnsupportedScheme,
    #[error("has no host")]
    MissingHost,
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    #[error("invalid port {0:?} (expected 1-65535)")]
    InvalidPort(String),
    #[error("must not contain user info (put credentials in authenticator.headers)")]
    UserInfo,
    #[error("must not contain a fragment (#...)")]
    Fragment,
    #[error("path and query may only contain visible ASCII characters")]
    InvalidPath,
}

/// Where the authenticator lives, parsed from `authenticator.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://`.
    pub tls: bool,
    /// DNS name (lower-cased), IPv4 literal, or IPv6 literal *without* brackets.
    pub host: String,
    /// Explicit port, or 80 / 443.
    pub port: u16,
    /// Path and query as sent in the request line; `/` when the URL has none.
    pub path: String,
}

impl Endpoint {
    /// Parses an `http://` or `https://` URL.
    ///
    /// # Errors
    /// [`EndpointError`] saying what is wrong.
    pub fn parse(url: &str) -> Result<Self, EndpointError> {
        let (tls, rest) = if let Some(rest) = strip_prefix_ignore_case(url, "http://") {
            (false, rest)
        } else if let Some(rest) = strip_prefix_ignore_case(url, "https://") {
            (true, rest)
        } else {
            return Err(EndpointError::UnsupportedScheme);
        };
        if rest.contains('#') {
            return Err(EndpointError::Fragment);
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(EndpointError::UserInfo);
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((literal, after)) = v6.split_once(']') else {
                return Err(EndpointError::InvalidHost(authority.to_owned()));
            };
            let ip: Ipv6Addr = literal
                .parse()
                .map_err(|_| EndpointError::InvalidHost(literal.to_owned()))?;
            let port = match after {
                "" => default_port,
                p => parse_port(
                    p.strip_prefix(':')
                        .ok_or_else(|| EndpointError::InvalidHost(authority.to_owned()))?,
                )?,
            };
            (ip.to_string(), port)
        } else {
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) => (h, parse_port(p)?),
                None => (authority, default_port),
            };
            if host.is_empty() {
                return Err(EndpointError::MissingHost);
            }
            let valid = host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            if !valid || host.starts_with(['.', '-']) || host.contains("..") {
                return Err(EndpointError::InvalidHost(host.to_owned()));
            }
            (host.to_ascii_lowercase(), port)
        };
        if host.is_empty() {
            return Err(EndpointError::MissingHost);
        }
        // The path goes byte for byte into the request line: only visible ASCII may appear.
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(EndpointError::InvalidPath);
        }
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        Ok(Self {
            tls,
            host,
            port,
            path,
        })
    }

    /// The `Host` header value: host (IPv6 in brackets), plus `:port` unless it is the default.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == self.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    fn default_port(&self) -> u16 {
        if self.tls {
            443
        } else {
            80
        }
    }
}

impl fmt::Display for Endpoint {
    /// The URL again, for logs (it holds no credentials: user info is refused).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(f, "{scheme}://{host}:{}{}", self.port, self.path)
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn parse_port(p: &str) -> Result<u16, EndpointError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(EndpointError::InvalidPort(p.to_owned()));
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(EndpointError::InvalidPort(p.to_owned())),
        Ok(port) => Ok(port),
    }
}

// ---------------------------------------------------------------------------------------------
// Static headers

/// Checks operator-configured static headers, so that a typo cannot inject a header line or
/// override a header the protocol itself sends (`reserved`, compared case-insensitively).
///
/// # Errors
/// A message naming the offending header (never its value: it may be a shared secret).
pub fn validate_static_headers<'a>(
    headers: impl IntoIterator<Item = (&'a String, &'a String)>,
    reserved: &[&str],
) -> Result<Vec<(String, String)>, String> {
    const ALWAYS_RESERVED: &[&str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "expect",
        "trailer",
    ];
    let mut out = Vec::new();
    for (name, value) in headers {
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(format!("invalid header name {name:?}"));
        }
        if ALWAYS_RESERVED
            .iter()
            .chain(reserved)
            .any(|r| r.eq_ignore_ascii_case(name))
        {
            return Err(format!(
                "header {name} is set by Portcullis and cannot be configured"
            ));
        }
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(format!(
                "value of header {name} contains a control character"
            ));
        }
        out.push((name.clone(), value.clone()));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Response parsing (pure)

/// Why a request to the authenticator failed. Never contains request bytes or header values.
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    #[error("write failed: {0}")]
    Write(std::io::Error),
    #[error("read failed: {0}")]
    Read(std::io::Error),
    #[error("exchange timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection closed before a complete response")]
    Truncated,
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} response header fields")]
    TooManyHeaders,
    #[error("response body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// One HTTP response, fully read.
///
/// Header values and the body are wiped on drop, and `Debug` prints header names only: an
/// auth_http server may answer with `Auth-Pass` (nginx's own master-login mode).
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// In received order, names as received.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The server allows another request on this connection (version, `Connection`, framing).
    pub keep_alive: bool,
}

impl Response {
    /// Values of every header named `name` (case-insensitive), in received order.
    pub fn header_values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let name = name.to_owned();
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(&name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether a `Connection` header lists `token` (case-insensitive).
    pub fn connection_has(&self, token: &str) -> bool {
        connection_tokens(&self.headers).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("header_names", &names)
            .field("body_len", &self.body.len())
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

impl Drop for Response {
    fn drop(&mut self) {
        for (_, value) in &mut self.headers {
            value.zeroize();
        }
        self.body.zeroize();
    }
}

/// The result of feeding bytes to [`parse_response`].
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed (or, for a body delimited by closing, the end of the stream).
    Incomplete,
    /// A whole response, taking the first `consumed` bytes of the input.
    Complete { response: Response, consumed: usize },
}

/// Parses one response from the start of `buf`, without knowing whether the stream has ended.
///
/// A body delimited by the connection closing (no Content-Length, no chunked) is therefore
/// always [`Parsed::Incomplete`] here; see [`parse_response_at_eof`].
///
/// # Errors
/// [`HttpError`] for malformed, ambiguous or oversized responses; never panics.
pub fn parse_response(buf: &[u8]) -> Result<Parsed, HttpError> {
    parse(buf, false)
}

/// Parses one response from `buf`, knowing that the peer has closed the stream after it.
///
/// # Errors
/// As [`parse_response`], plus [`HttpError::Truncated`] if the response is incomplete.
pub fn parse_response_at_eof(buf: &[u8]) -> Result<Response, HttpError> {
    match parse(buf, true)? {
        Parsed::Complete { response, .. } => Ok(response),
        Parsed::Incomplete => Err(HttpError::Truncated),
    }
}

fn incomplete(eof: bool) -> Result<Parsed, HttpError> {
    if eof {
        Err(HttpError::Truncated)
    } else {
        Ok(Parsed::Incomplete)
    }
}

fn connection_tokens(headers: &[(String, Vec<u8>)]) -> impl Iterator<Item = &[u8]> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
}

fn parse(buf: &[u8], eof: bool) -> Result<Parsed, HttpError> {
    let mut offset = 0;
    loop {
        let rest = buf.get(offset..).unwrap_or_default();
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = httparse::Response::new(&mut fields);
        let head_len = match head.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(HttpError::HeadTooLarge);
                }
                return incomplete(eof);
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
            Err(_) => return Err(HttpError::Malformed("invalid status line or header field")),
        };
        if offset + head_len > MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
        if has_bare_lf(&rest[..head_len]) {
            return Err(HttpError::Malformed("bare LF in response head"));
        }
        let (Some(status), Some(version)) = (head.code, head.version) else {
            return Err(HttpError::Malformed("incomplete status line"));
        };
        if status == 101 {
            return Err(HttpError::Malformed("unexpected protocol switch"));
        }
        if (100..200).contains(&status) {
            // Interim responses carry no body; the final response follows.
            offset += head_len;
            continue;
        }
        let headers: Vec<(String, Vec<u8>)> = head
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect();
        let body_start = offset + head_len;
        let data = buf.get(body_start..).unwrap_or_default();
        let framing = framing(version, status, &headers)?;
        let persistent_version = version == 1;
        let mut close = false;
        let mut keep = false;
        for t in connection_tokens(&headers) {
            close |= t.eq_ignore_ascii_case(b"close");
            keep |= t.eq_ignore_ascii_case(b"keep-alive");
        }
        let reusable = !close && (persistent_version || keep);
        let (body, used, keep_alive) = match framing {
            Framing::Empty => (Vec::new(), 0, reusable),
            Framing::Length(len) => {
                let Some(body) = data.get(..len) else {
                    return incomplete(eof);
                };
                (body.to_vec(), len, reusable)
            }
            Framing::Chunked => match decode_chunked(data)? {
                Some((body, used)) => (body, used, reusable),
                None => return incomplete(eof),
            },
            Framing::UntilClose => {
                if data.len() > MAX_BODY {
                    return Err(HttpError::BodyTooLarge);
                }
                if !eof {
                    return Ok(Parsed::Incomplete);
                }
                (data.to_vec(), data.len(), false)
            }
        };
        return Ok(Parsed::Complete {
            response: Response {
                status,
                headers,
                body,
                keep_alive,
            },
            consumed: body_start + used,
        });
    }
}

fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

fn framing(version: u8, status: u16, headers: &[(String, Vec<u8>)]) -> Result<Framing, HttpError> {
    let mut lengths = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    let mut encodings = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    let length = lengths.next();
    let encoding = encodings.next();
    if lengths.next().is_some() {
        return Err(HttpError::Malformed("repeated Content-Length"));
    }
    if encodings.next().is_some() {
        return Err(HttpError::Malformed("repeated Transfer-Encoding"));
    }
    if length.is_some() && encoding.is_some() {
        return Err(HttpError::Malformed(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if let Some((_, value)) = encoding {
        if version == 0 {
            return Err(HttpError::Malformed(
                "Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        if !value.eq_ignore_ascii_case(b"chunked") {
            return Err(HttpError::Malformed("unsupported Transfer-Encoding"));
        }
    }
    if status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    if encoding.is_some() {
        return Ok(Framing::Chunked);
    }
    match length {
        None => Ok(Framing::UntilClose),
        Some((_, value)) => {
            if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                return Err(HttpError::Malformed("invalid Content-Length"));
            }
            let len = value
                .iter()
                .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
            match usize::try_from(len) {
                Ok(len) if len <= MAX_BODY => Ok(Framing::Length(len)),
                _ => Err(HttpError::BodyTooLarge),
            }
        }
    }
}

/// Decodes a chunked body from the start of `data`: `Ok(None)` if more bytes are needed,
/// otherwise the body and the number of bytes the framing took (trailers included).
fn decode_chunked(data: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        if pos > MAX_BODY + MAX_CHUNK_OVERHEAD {
            return Err(HttpError::Malformed("chunked framing overhead too large"));
        }
        let Some(line) = chunk_line(&data[pos..])? else {
            return Ok(None);
        };
        let size_part = match line.iter().position(|&b| b == b';') {
            Some(i) => &line[..i],
            None => line,
        };
        let size_part = size_part.trim_ascii_end();
        if size_part.is_empty()
            || size_part.len() > 16
            || !size_part.iter().all(u8::is_ascii_hexdigit)
        {
            return Err(HttpError::Malformed("invalid chunk size"));
        }
        let size = size_part.iter().fold(0u64, |acc, &d| {
            let digit = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                _ => d - b'A' + 10,
            };
            (acc << 4) | u64::from(digit)
        });
        pos += line.len() + 2;
        if size == 0 {
            // Trailer section: fields we ignore, then an empty line.
            loop {
                if pos > MAX_BODY + MAX_CHUNK_OVERHEAD {
                    return Err(HttpError::Malformed("chunked framing overhead too large"));
                }
                let Some(trailer) = chunk_line(&data[pos..])? else {
                    return Ok(None);
                };
                pos += trailer.len() + 2;
                if trailer.is_empty() {
                    return Ok(Some((body, pos)));
                }
            }
        }
        let size = match usize::try_from(size) {
            Ok(s) if s <= MAX_BODY - body.len() => s,
            _ => return Err(HttpError::BodyTooLarge),
        };
        let Some(chunk) = data.get(pos..pos + size + 2) else {
            return Ok(None);
        };
        if &chunk[size..] != b"\r\n" {
            return Err(HttpError::Malformed("chunk not followed by CRLF"));
        }
        body.extend_from_slice(&chunk[..size]);
        pos += size + 2;
    }
}

/// One CRLF-terminated line of chunked framing (without the CRLF), bounded and free of control
/// bytes other than HTAB; `Ok(None)` if the line is not complete yet.
fn chunk_line(data: &[u8]) -> Result<Option<&[u8]>, HttpError> {
    let window = &data[..data.len().min(MAX_CHUNK_LINE + 2)];
    let end = window.windows(2).position(|w| w == b"\r\n");
    let scanned = match end {
        Some(i) => &window[..i],
        None => window,
    };
    // A stray CR or LF (or other control byte) can never become valid with more bytes, except a
    // final CR that may be the start of the CRLF still to come.
    let checked = match end {
        Some(_) => scanned,
        None => scanned.strip_suffix(b"\r").unwrap_or(scanned),
    };
    if checked
        .iter()
        .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return Err(HttpError::Malformed("control byte in chunked framing"));
    }
    match end {
        Some(i) => Ok(Some(&window[..i])),
        None if window.len() > MAX_CHUNK_LINE => {
            Err(HttpError::Malformed("chunked framing line too long"))
        }
        None => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// How an [`HttpClient`] behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bounds connecting (TCP + TLS handshake) and, separately, one request/response exchange,
    /// so that nothing hangs even if the caller forgets a deadline.
    pub timeout: Duration,
    /// Keep connections the server allows to keep, for the next request.
    pub keepalive: bool,
    /// PEM CA bundle for `https` (default: the web PKI roots of webpki-roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// Idle connections kept at most ([`DEFAULT_MAX_IDLE`]).
    pub max_idle: usize,
    /// How long an idle connection is kept ([`DEFAULT_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(3),
            keepalive: true,
            ca_file: None,
            max_idle: DEFAULT_MAX_IDLE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct Idle {
    stream: Box<dyn Stream>,
    since: Instant,
    /// The runtime whose reactor the connection is registered with (see
    /// [`crate::server::workers`]): only that runtime's tasks reuse it.
    worker: usize,
}

/// Sends pre-built requests to one endpoint, reusing connections the server allows to keep.
/// What the `nginx` and `json` authenticators share: the client, the static headers (often a
/// shared secret, so `Debug` names them and never shows their values) and the keep-alive choice.
pub struct Service {
    pub client: HttpClient,
    pub static_headers: Vec<(String, String)>,
    pub keepalive: bool,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .static_headers
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        f.debug_struct("Service")
            .field("client", &self.client)
            .field("static_headers", &names)
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

pub struct HttpClient {
    endpoint: Endpoint,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    options: ClientOptions,
    idle: Mutex<Vec<Idle>>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("endpoint", &self.endpoint.to_string())
            .field("keepalive", &self.options.keepalive)
            .finish_non_exhaustive()
    }
}

/// A failed exchange, and whether any response byte had arrived (only then is a retry unsafe).
struct ExchangeError {
    error: HttpError,
    response_started: bool,
}

impl HttpClient {
    /// Builds a client; for `https`, loads the trust roots now so errors show at start-up.
    ///
    /// # Errors
    /// [`HttpError::TlsConfig`] if the CA file cannot be used or the host is not a valid TLS name.
    pub fn new(endpoint: Endpoint, options: ClientOptions) -> Result<Self, HttpError> {
        let tls = if endpoint.tls {
            let config = client_tls_config(options.ca_file.as_deref())?;
            let name = ServerName::try_from(endpoint.host.clone()).map_err(|_| {
                HttpError::TlsConfig(format!("invalid TLS name {:?}", endpoint.host))
            })?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Self {
            endpoint,
            tls,
            options,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Where requests go; request builders take the path and `Host` value from it.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Writes `head_and_body` exactly as given and reads one bounded response.
    ///
    /// A pooled connection that fails before any response byte arrives (the server closed it
    /// while idle) is retried once on a fresh connection.
    ///
    /// # Errors
    /// [`HttpError`] for connection, TLS, timeout or parse failures.
    pub async fn send(&self, head_and_body: &[u8]) -> Result<Response, HttpError> {
        let http10 = request_is_http10(head_and_body);
        if let Some(stream) = self.take_idle() {
            match self.exchange(stream, head_and_body, http10).await {
                Ok(resp) => return Ok(resp),
                Err(ExchangeError {
                    response_started: false,
                    error,
                }) => {
                    tracing::debug!(error = %error, "pooled authenticator connection failed; retrying on a new one");
                }
                Err(e) => return Err(e.error),
            }
        }
        let stream = self.connect().await?;
        self.exchange(stream, head_and_body, http10)
            .await
            .map_err(|e| e.error)
    }

    /// Connections currently idle in the pool (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn take_idle(&self) -> Option<Box<dyn Stream>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        idle.retain(|c| now.duration_since(c.since) < self.options.idle_timeout);
        let here = crate::server::workers::current();
        let at = idle.iter().rposition(|c| c.worker == here)?;
        Some(idle.swap_remove(at).stream)
    }

    fn put_idle(&self, stream: Box<dyn Stream>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        idle.retain(|c| now.duration_since(c.since) < self.options.idle_timeout);
        if idle.len() < self.options.max_idle {
            idle.push(Idle {
                stream,
                since: now,
                worker: crate::server::workers::current(),
            });
        }
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, HttpError> {
        let limit = self.options.timeout;
        let work = async {
            let host = self.endpoint.host.as_str();
            let addrs: Vec<std::net::SocketAddr> = match host.parse::<IpAddr>() {
                Ok(ip) => vec![(ip, self.endpoint.port).into()],
                Err(_) => tokio::net::lookup_host((host, self.endpoint.port))
                    .await
                    .map_err(|source| HttpError::Resolve {
                        host: host.to_owned(),
                        source,
                    })?
                    .collect(),
            };
            let mut last = None;
            let mut tcp = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        tcp = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let tcp = match (tcp, last) {
                (Some(s), _) => s,
                (None, Some(e)) => return Err(HttpError::Connect(e)),
                (None, None) => {
                    return Err(HttpError::NoAddress {
                        host: host.to_owned(),
                    })
                }
            };
            // Requests are small and latency-bound: never wait for Nagle.
            tcp.set_nodelay(true).map_err(HttpError::Connect)?;
            match &self.tls {
                None => Ok(Box::new(tcp) as Box<dyn Stream>),
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(HttpError::Tls)?;
                    Ok(Box::new(tls) as Box<dyn Stream>)
                }
            }
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| HttpError::ConnectTimeout(limit))?
    }

    async fn exchange(
        &self,
        mut stream: Box<dyn Stream>,
        request: &[u8],
        http10: bool,
    ) -> Result<Response, ExchangeError> {
        let limit = self.options.timeout;
        let mut buf = ReadBuffer::new();
        let work = async {
            stream.write_all(request).await.map_err(HttpError::Write)?;
            stream.flush().await.map_err(HttpError::Write)?;
            let mut chunk = Zeroizing::new([0u8; 8192]);
            loop {
                let n = stream.read(&mut chunk[..]).await.map_err(HttpError::Read)?;
                if n == 0 {
                    return parse_response_at_eof(buf.as_slice()).map(|r| (r, false));
                }
                buf.extend(&chunk[..n]);
                match parse_response(buf.as_slice())? {
                    Parsed::Incomplete => {
                        // The parser errors before this can grow past its own bounds; this is
                        // the belt to its braces.
                        if buf.len() > MAX_HEAD + MAX_BODY + MAX_CHUNK_OVERHEAD + chunk.len() {
                            return Err(HttpError::BodyTooLarge);
                        }
                    }
                    Parsed::Complete { response, consumed } => {
                        let clean = consumed == buf.len();
                        return Ok((response, clean));
                    }
                }
            }
        };
        let outcome = tokio::time::timeout(limit, work)
            .await
            .unwrap_or(Err(HttpError::Timeout(limit)));
        match outcome {
            Ok((response, clean)) => {
                // An HTTP/1.0 request stays open only if the server said so explicitly.
                let reuse = self.options.keepalive
                    && response.keep_alive
                    && clean
                    && (!http10 || response.connection_has("keep-alive"));
                if reuse {
                    self.put_idle(stream);
                }
                Ok(response)
            }
            Err(error) => Err(ExchangeError {
                error,
                response_started: buf.len() > 0,
            }),
        }
    }
}

fn request_is_http10(request: &[u8]) -> bool {
    let line_end = request
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(request.len());
    request[..line_end].ends_with(b" HTTP/1.0")
}

/// A read buffer that never leaves an unwiped copy behind when it grows (responses may carry
/// `Auth-Pass`).
struct ReadBuffer(Zeroizing<Vec<u8>>);

impl ReadBuffer {
    fn new() -> Self {
        Self(Zeroizing::new(Vec::with_capacity(4096)))
    }

    fn extend(&mut self, data: &[u8]) {
        let needed = self.0.len() + data.len();
        if needed > self.0.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(needed.max(self.0.capacity() * 2)));
            bigger.extend_from_slice(&self.0);
            // The old allocation is wiped when it drops here.
            self.0 = bigger;
        }
        self.0.extend_from_slice(data);
    }

    fn as_slice(&self) -> &[u8] {
        &self.0
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

fn client_tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, HttpError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                HttpError::TlsConfig(format!("cannot read {}: {e}", path.display()))
            })?;
            for cert in certs {
                let cert = cert.map_err(|e| {
                    HttpError::TlsConfig(format!("cannot parse {}: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    HttpError::TlsConfig(format!(
                        "unusable CA certificate in {}: {e}",
                        path.display()
                    ))
                })?;
            }
            if roots.is_empty() {
                return Err(HttpError::TlsConfig(format!(
                    "no certificate found in {}",
                    path.display()
                )));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn complete(buf: &[u8]) -> (Response, usize) {
        match parse_response(buf) {
            Ok(Parsed::Complete { response, consumed }) => (response, consumed),
            other => panic!("expected a complete response, got {other:?}"),
        }
    }

    #[test]
    fn endpoint_parses_the_usual_forms() {
        let e = Endpoint::parse("http://127.0.0.1:9100/auth").unwrap();
        assert_eq!(
            e,
            Endpoint {
                tls: false,
                host: "127.0.0.1".into(),
                port: 9100,
                path: "/auth".into()
            }
        );
        assert_eq!(e.host_header(), "127.0.0.1:9100");
        let e = Endpoint::parse("HTTPS://Auth.Example.org").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port, e.path.as_str()),
            (true, "auth.example.org", 443, "/")
        );
        assert_eq!(e.host_header(), "auth.example.org");
        let e = Endpoint::parse("http://[::1]:8080/a/b?x=1&y=%20").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("::1", 8080, "/a/b?x=1&y=%20")
        );
        assert_eq!(e.host_header(), "[::1]:8080");
        let e = Endpoint::parse("http://[::1]").unwrap();
        assert_eq!(e.host_header(), "[::1]");
        let e = Endpoint::parse("http://h?q").unwrap();
        assert_eq!(e.path, "/?q");
        let e = Endpoint::parse("https://h:443/").unwrap();
        assert_eq!(e.host_header(), "h");
    }

    #[test]
    fn endpoint_refuses_what_it_cannot_send() {
        use EndpointError::*;
        for (url, want) in [
            ("ftp://x", UnsupportedScheme),
            ("127.0.0.1:80", UnsupportedScheme),
            ("http://", MissingHost),
            ("http://:80/", MissingHost),
            ("http://h:0/", InvalidPort("0".into())),
            ("http://h:65536/", InvalidPort("65536".into())),
            ("http://h:/", InvalidPort(String::new())),
            ("http://h:8x/", InvalidPort("8x".into())),
            ("http://u:p@h/", UserInfo),
            ("http://h/#f", Fragment),
            ("http://h/a b", InvalidPath),
            ("http://h/a\r\nX: y", InvalidPath),
            ("http://h/ä", InvalidPath),
            ("http://[::1/", InvalidHost("[::1".into())),
            ("http://[zz]/", InvalidHost("zz".into())),
            ("http://[::1]x/", InvalidHost("[::1]x".into())),
            ("http://a..b/", InvalidHost("a..b".into())),
            ("http://a b/", InvalidHost("a b".into())),
        ] {
            assert_eq!(Endpoint::parse(url), Err(want), "{url}");
        }
        assert!(Endpoint::parse("ftp://x")
            .unwrap_err()
            .to_string()
            .contains("http://"));
    }

    #[test]
    fn static_headers_are_checked() {
        let ok = [("X-Secret".to_string(), "s3cret".to_string())];
        assert_eq!(
            validate_static_headers(ok.iter().map(|(a, b)| (a, b)), &[]).unwrap(),
            ok.to_vec()
        );
        for (name, value) in [
            ("X Bad", "v"),
            ("", "v"),
            ("X-Inject", "a\r\nAuth-User: root"),
            ("Host", "h"),
            ("content-length", "1"),
            ("Auth-User", "x"),
        ] {
            let (n, v) = (name.to_string(), value.to_string());
            let e = validate_static_headers([(&n, &v)], &["Auth-User"]).unwrap_err();
            assert!(!e.contains("root"), "{e}");
        }
    }

    #[test]
    fn content_length_response() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhelloEXTRA";
        let (r, n) = complete(raw);
        assert_eq!(
            (r.status, r.body.as_slice(), n),
            (200, &b"hello"[..], raw.len() - 5)
        );
        assert!(r.keep_alive);
        assert_eq!(r.header_values("x-a").collect::<Vec<_>>(), vec![&b"b"[..]]);
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |raw: &[u8]| complete(raw).0.keep_alive;
        assert!(!ka(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(ka(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!ka(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!ka(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(ka(b"HTTP/1.1 204 No Content\r\n\r\n"));
        let r = parse_response_at_eof(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nbody")
            .unwrap();
        assert_eq!(r.body, b"body");
        assert!(!r.keep_alive, "a body delimited by close can never be kept");
    }

    #[test]
    fn read_to_close_needs_eof() {
        let raw = b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), Parsed::Incomplete);
        let r = parse_response_at_eof(raw).unwrap();
        assert_eq!((r.status, r.body.len()), (200, 0));
        assert!(matches!(
            parse_response_at_eof(b"HTTP/1.0 200 OK\r\nAuth-Sta"),
            Err(HttpError::Truncated)
        ));
        assert!(matches!(
            parse_response_at_eof(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"),
            Err(HttpError::Truncated)
        ));
    }

    #[test]
    fn chunked_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-T: y\r\n\r\nnext";
        let (r, n) = complete(raw);
        assert_eq!(r.body, b"hello!");
        assert_eq!(n, raw.len() - 4);
        assert!(r.keep_alive);
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ] {
            assert!(
                matches!(parse_response(bad), Err(HttpError::Malformed(_))),
                "{bad:?}"
            );
        }
        let huge = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFF\r\n";
        assert!(matches!(parse_response(huge), Err(HttpError::BodyTooLarge)));
        let mut many = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..20_000 {
            many.extend_from_slice(b"1;aaaaaaaaaaaaaaaaaaaaaaaa\r\nx\r\n");
        }
        assert!(matches!(
            parse_response(&many),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\nx",
            b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 1\r\n\r\nx",
            b"HTTP/1.1 101 Switching\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(
                matches!(parse_response(bad), Err(HttpError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 65537\r\n\r\n"),
            Err(HttpError::BodyTooLarge)
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn limits_hold() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        head.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        assert!(matches!(
            parse_response(&head),
            Err(HttpError::HeadTooLarge)
        ));
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(
            parse_response(&many),
            Err(HttpError::TooManyHeaders)
        ));
        let mut body = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
        body.extend(std::iter::repeat_n(b'x', MAX_BODY + 1));
        assert!(matches!(
            parse_response(&body),
            Err(HttpError::BodyTooLarge)
        ));
    }

    #[test]
    fn interim_responses_are_skipped() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (r, n) = complete(raw);
        assert_eq!(
            (r.status, r.body.as_slice(), n),
            (200, &b"ok"[..], raw.len())
        );
    }

    #[test]
    fn debug_shows_no_header_values() {
        let (r, _) =
            complete(b"HTTP/1.1 200 OK\r\nAuth-Pass: hunter2\r\nContent-Length: 7\r\n\r\nhunter2");
        let shown = format!("{r:?}");
        assert!(
            shown.contains("Auth-Pass") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    /// A one-shot HTTPS server with a fresh self-signed certificate for 127.0.0.1; returns its
    /// address and the certificate as PEM.
    async fn tls_server(reply: &'static [u8]) -> (std::net::SocketAddr, String) {
        use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let pem = ck.cert.pem();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tls.write_all(reply).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (addr, pem)
    }

    #[tokio::test]
    async fn https_with_a_configured_ca() {
        let (addr, pem) =
            tls_server(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nContent-Length: 2\r\n\r\nok").await;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pem).unwrap();
        let endpoint = Endpoint::parse(&format!("https://{addr}/auth")).unwrap();
        let options = ClientOptions {
            ca_file: Some(ca),
            ..ClientOptions::default()
        };
        let client = HttpClient::new(endpoint.clone(), options).unwrap();
        let r = client
            .send(b"GET /auth HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));

        // The same server is refused against the web PKI roots.
        let client = HttpClient::new(endpoint, ClientOptions::default()).unwrap();
        let e = client
            .send(b"GET /auth HTTP/1.0\r\n\r\n")
            .await
            .unwrap_err();
        assert!(matches!(e, HttpError::Tls(_)), "{e}");
    }

    #[test]
    fn unusable_ca_file_is_reported() {
        let endpoint = Endpoint::parse("https://auth.example.org/").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for path in [empty, dir.path().join("missing.pem")] {
            let options = ClientOptions {
                ca_file: Some(path.clone()),
                ..ClientOptions::default()
            };
            let e = HttpClient::new(endpoint.clone(), options)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
    }

    fn arb_response() -> impl Strategy<Value = (Vec<u8>, bool)> {
        let name =
            "[A-Za-z][A-Za-z0-9-]{0,12}".prop_filter("framing headers are chosen below", |n| {
                !["content-length", "transfer-encoding", "connection"]
                    .contains(&n.to_ascii_lowercase().as_str())
            });
        let value = "[ -~]{0,30}".prop_map(|v| v.trim().to_string());
        (
            prop_oneof![Just("1.0"), Just("1.1")],
            200u16..600,
            proptest::collection::vec((name, value), 0..8),
            proptest::collection::vec(any::<u8>(), 0..300),
            0u8..3,
            proptest::collection::vec(1usize..40, 0..10),
            any::<bool>(),
        )
            .prop_map(|(version, status, headers, body, framing, cuts, conn)| {
                let status = if status == 204 || status == 304 {
                    200
                } else {
                    status
                };
                let mut raw = format!("HTTP/{version} {status} Reason\r\n").into_bytes();
                for (n, v) in headers {
                    raw.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
                }
                if conn {
                    raw.extend_from_slice(b"Connection: keep-alive\r\n");
                }
                let framing = if version == "1.0" && framing == 1 {
                    0
                } else {
                    framing
                };
                match framing {
                    0 => {
                        raw.extend_from_slice(
                            format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
                        );
                        raw.extend_from_slice(&body);
                    }
                    1 => {
                        raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                        let mut rest = body.as_slice();
                        for cut in cuts {
                            if rest.is_empty() {
                                break;
                            }
                            let (a, b) = rest.split_at(cut.min(rest.len()));
                            raw.extend_from_slice(format!("{:x}\r\n", a.len()).as_bytes());
                            raw.extend_from_slice(a);
                            raw.extend_from_slice(b"\r\n");
                            rest = b;
                        }
                        if !rest.is_empty() {
                            raw.extend_from_slice(format!("{:X}\r\n", rest.len()).as_bytes());
                            raw.extend_from_slice(rest);
                            raw.extend_from_slice(b"\r\n");
                        }
                        raw.extend_from_slice(b"0\r\n\r\n");
                    }
                    _ => {
                        raw.extend_from_slice(b"\r\n");
                        raw.extend_from_slice(&body);
                    }
                }
                (raw, framing == 2)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn never_panics_on_random_bytes(raw in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(Parsed::Complete { response, consumed }) = parse_response(&raw) {
                prop_assert!(consumed <= raw.len());
                prop_assert!(response.body.len() <= MAX_BODY);
            }
            let _ = parse_response_at_eof(&raw);
        }

        #[test]
        fn never_panics_on_mutated_responses(
            (raw, _) in arb_response(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut raw = raw;
            let i = at.index(raw.len());
            raw[i] = byte;
            let _ = parse_response(&raw);
            let _ = parse_response_at_eof(&raw);
        }

        #[test]
        fn every_prefix_is_incomplete_until_the_end((raw, until_close) in arb_response()) {
            if until_close {
                for k in 0..=raw.len() {
                    prop_assert_eq!(parse_response(&raw[..k]).unwrap(), Parsed::Incomplete);
                }
                let r = parse_response_at_eof(&raw).unwrap();
                prop_assert!(!r.keep_alive);
            } else {
                let (whole, consumed) = complete(&raw);
                prop_assert_eq!(consumed, raw.len());
                for k in 0..raw.len() {
                    prop_assert_eq!(parse_response(&raw[..k]).unwrap(), Parsed::Incomplete, "prefix {}", k);
                }
                let mut extended = raw.clone();
                extended.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
                let (again, consumed_again) = complete(&extended);
                prop_assert_eq!(consumed_again, raw.len());
                prop_assert_eq!(&again, &whole);
                prop_assert_eq!(parse_response_at_eof(&raw).unwrap(), whole);
            }
        }
    }
}

/// A scripted authenticator on 127.0.0.1 for the `nginx` and `json` tests: it records each request
/// and answers canned bytes, so tests can play a server that is correct, broken, slow or closes.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod test_server {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// One scripted answer.
    #[derive(Clone)]
    pub(crate) struct Canned {
        pub bytes: Vec<u8>,
        /// Close the connection after answering.
        pub close: bool,
        /// Wait this long before answering.
        pub delay: Duration,
    }

    impl Canned {
        pub(crate) fn close(bytes: &[u8]) -> Self {
            Self {
                bytes: bytes.to_vec(),
                close: true,
                delay: Duration::ZERO,
            }
        }

        pub(crate) fn keep(bytes: &[u8]) -> Self {
            Self {
                close: false,
                ..Self::close(bytes)
            }
        }
    }

    pub(crate) struct TestServer {
        pub addr: SocketAddr,
        pub requests: Arc<Mutex<Vec<Vec<u8>>>>,
        pub connections: Arc<AtomicUsize>,
    }

    impl TestServer {
        pub(crate) fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        pub(crate) fn requests(&self) -> Vec<Vec<u8>> {
            self.requests.lock().unwrap().clone()
        }

        pub(crate) fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }
    }

    /// Serves `script` in order, one answer per request, across connections; once the script is
    /// used up, the last answer repeats.
    pub(crate) async fn serve(script: Vec<Canned>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        {
            let (requests, connections) = (requests.clone(), connections.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (requests, next, script) = (requests.clone(), next.clone(), script.clone());
                    tokio::spawn(async move {
                        handle(stream, requests, next, script).await;
                    });
                }
            });
        }
        TestServer {
            addr,
            requests,
            connections,
        }
    }

    async fn handle(
        mut stream: TcpStream,
        requests: Arc<Mutex<Vec<Vec<u8>>>>,
        next: Arc<AtomicUsize>,
        script: Arc<Vec<Canned>>,
    ) {
        loop {
            let Some(request) = read_request(&mut stream).await else {
                return;
            };
            requests.lock().unwrap().push(request);
            let i = next.fetch_add(1, Ordering::SeqCst).min(script.len() - 1);
            let canned = script[i].clone();
            tokio::time::sleep(canned.delay).await;
            if stream.write_all(&canned.bytes).await.is_err() || canned.close {
                return;
            }
        }
    }

    async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                if buf.len() >= end + 4 + len {
                    return Some(buf);
                }
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}
