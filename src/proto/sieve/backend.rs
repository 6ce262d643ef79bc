//! The backend side of ManageSieve: reading a capability response (the greeting, and again after
//! STARTTLS), the master login `AUTHENTICATE "PLAIN" "<\0user%master\0secret>"`, and a probe that
//! only learns the capabilities.
//!
//! A backend that misbehaves (a greeting that is not OK, bytes after its STARTTLS OK, anything
//! but OK/NO where a status is due) aborts the login. Backend text never reaches the client.

use zeroize::Zeroizing;

use super::wire::{push_string, tokenize, Frame, Framer, Limits, Syntax, Token};
use super::Capability;
use crate::proto::imap::{BackendError, BackendEvent};
use crate::proto::prelogin::BackendMachine;
use crate::secret::Secret;

/// Bounds on what the backend may send while logging in.
const LIMITS: Limits = Limits {
    line_max: 16 * 1024,
    literal_max: 16 * 1024,
    literal_total: 16 * 1024,
};
/// Capability lines kept from one response; more is a misbehaving backend.
const MAX_CAPABILITIES: usize = 64;

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bye,
}

/// One item of a backend response.
enum Item {
    Capability(Capability),
    Status(Status),
}

/// Reads one framed line: a capability (`"NAME"` or `"NAME" "value"`) or a status
/// (`OK`/`NO`/`BYE`, with any response code and text). `None` for anything else.
fn item(frame: &[u8]) -> Option<Item> {
    let tokens = tokenize(frame, true).ok()?;
    match tokens.as_slice() {
        [Token::Atom(a), ..] => {
            let status = if a.eq_ignore_ascii_case(b"OK") {
                Status::Ok
            } else if a.eq_ignore_ascii_case(b"NO") {
                Status::No
            } else if a.eq_ignore_ascii_case(b"BYE") {
                Status::Bye
            } else {
                return None;
            };
            Some(Item::Status(status))
        }
        [Token::Str(name)] => Some(Item::Capability((utf8(name)?, None))),
        [Token::Str(name), Token::Str(value)] => {
            Some(Item::Capability((utf8(name)?, Some(utf8(value)?))))
        }
        _ => None,
    }
}

fn utf8(s: &[u8]) -> Option<String> {
    String::from_utf8(s.to_vec()).ok()
}

/// A complete capability response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityResponse {
    pub capabilities: Vec<Capability>,
    pub status: Status,
    /// Bytes of the input it took.
    pub consumed: usize,
}

/// Parses a capability response (capability lines, then `OK`, `NO` or `BYE`) from the start of
/// `input`. `Ok(None)`: more input is needed.
///
/// # Errors
/// [`Syntax`] if the input is not a capability response (or is over the bounds).
pub fn parse_capability_response(input: &[u8]) -> Result<Option<CapabilityResponse>, Syntax> {
    let mut framer = Framer::new(LIMITS);
    framer.feed(input);
    let mut capabilities = Vec::new();
    let mut consumed = 0;
    while let Some(frame) = framer.next_frame() {
        let Frame::Complete(bytes) = frame else {
            return Err(Syntax);
        };
        consumed += bytes.len();
        match item(&bytes).ok_or(Syntax)? {
            Item::Capability(c) if capabilities.len() < MAX_CAPABILITIES => capabilities.push(c),
            Item::Capability(_) => return Err(Syntax),
            Item::Status(status) => {
                return Ok(Some(CapabilityResponse {
                    capabilities,
                    status,
                    consumed,
                }))
            }
        }
    }
    Ok(None)
}

/// A capability as one string, for [`BackendEvent::LoggedIn`]: `NAME` or `NAME value`. Lossless
/// for names without spaces (see [`capability_from_string`]).
pub fn capability_to_string((name, value): &Capability) -> String {
    match value {
        Some(v) => format!("{name} {v}"),
        None => name.clone(),
    }
}

/// The inverse of [`capability_to_string`].
pub fn capability_from_string(s: &str) -> Capability {
    match s.split_once(' ') {
        Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
        None => (s.to_owned(), None),
    }
}

/// Reads capability responses off a backend stream.
#[derive(Debug)]
struct CapabilityReader {
    framer: Framer,
    caps: Vec<Capability>,
}

enum Read {
    More,
    Done(Status),
    Bad,
}

impl CapabilityReader {
    fn new() -> Self {
        Self {
            framer: Framer::new(LIMITS),
            caps: Vec::new(),
        }
    }

    /// Capability lines until a status; `Read::More` if more input is needed.
    fn read(&mut self) -> Read {
        while let Some(frame) = self.framer.next_frame() {
            let Frame::Complete(bytes) = frame else {
                return Read::Bad;
            };
            match item(&bytes) {
                Some(Item::Capability(c)) if self.caps.len() < MAX_CAPABILITIES => {
                    self.caps.push(c);
                }
                Some(Item::Status(s)) => return Read::Done(s),
                _ => return Read::Bad,
            }
        }
        Read::More
    }

    /// The next status line; anything else is a protocol error.
    fn status(&mut self) -> Option<Result<Status, ()>> {
        match self.framer.next_frame()? {
            Frame::Complete(bytes) => match item(&bytes) {
                Some(Item::Status(s)) => Some(Ok(s)),
                _ => Some(Err(())),
            },
            _ => Some(Err(())),
        }
    }

    fn strings(&self) -> Vec<String> {
        self.caps.iter().map(capability_to_string).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoginState {
    Greeting,
    StartTls,
    AwaitTls,
    TlsGreeting,
    Auth,
    Done,
}

/// The ManageSieve master login: greeting, optional STARTTLS (then the capabilities again), then
/// `AUTHENTICATE "PLAIN"` with the empty-authzid master payload as the initial response.
#[derive(Debug)]
pub struct SieveBackendLogin {
    reader: CapabilityReader,
    state: LoginState,
    starttls: bool,
    payload: Zeroizing<String>,
    out: Vec<u8>,
}

impl SieveBackendLogin {
    pub fn new(
        account: &str,
        master: &str,
        separator: &str,
        secret: &Secret,
        starttls: bool,
    ) -> Self {
        Self {
            reader: CapabilityReader::new(),
            state: LoginState::Greeting,
            starttls,
            payload: crate::sasl::master_plain(account, master, separator, secret),
            out: Vec::new(),
        }
    }

    fn send_auth(&mut self) {
        let mut line = Zeroizing::new(b"AUTHENTICATE \"PLAIN\" ".to_vec());
        push_string(&mut line, self.payload.as_bytes());
        line.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(&line);
        self.state = LoginState::Auth;
    }

    fn fail(&mut self, e: BackendError) -> BackendEvent {
        self.state = LoginState::Done;
        BackendEvent::Failed(e)
    }
}

impl BackendMachine for SieveBackendLogin {
    fn advance(&mut self) -> BackendEvent {
        match self.state {
            LoginState::Greeting | LoginState::TlsGreeting => match self.reader.read() {
                Read::More => BackendEvent::NeedInput,
                Read::Bad => self.fail(BackendError::Protocol),
                Read::Done(Status::Ok) if self.state == LoginState::Greeting && self.starttls => {
                    self.out.extend_from_slice(b"STARTTLS\r\n");
                    self.state = LoginState::StartTls;
                    self.advance()
                }
                Read::Done(Status::Ok) => {
                    self.send_auth();
                    self.advance()
                }
                Read::Done(_) => self.fail(BackendError::BadGreeting),
            },
            LoginState::StartTls => match self.reader.status() {
                None => BackendEvent::NeedInput,
                Some(Ok(Status::Ok)) if self.reader.framer.has_pending() => {
                    self.fail(BackendError::BytesAfterStartTls)
                }
                Some(Ok(Status::Ok)) => {
                    self.state = LoginState::AwaitTls;
                    BackendEvent::StartTls
                }
                Some(Ok(_)) => self.fail(BackendError::StartTlsRefused),
                Some(Err(())) => self.fail(BackendError::Protocol),
            },
            LoginState::AwaitTls => BackendEvent::StartTls,
            // An OK may carry `(SASL "…")` (server's final data): still a success.
            LoginState::Auth => match self.reader.status() {
                None => BackendEvent::NeedInput,
                Some(Ok(Status::Ok)) => {
                    self.state = LoginState::Done;
                    BackendEvent::LoggedIn(self.reader.strings())
                }
                Some(Ok(_)) => self.fail(BackendError::LoginRefused),
                Some(Err(())) => self.fail(BackendError::Protocol),
            },
            LoginState::Done => BackendEvent::Failed(BackendError::Protocol),
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.reader.framer.feed(bytes);
    }

    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// RFC 5804 §2.2: the server sends its capabilities again over TLS; those replace the
    /// cleartext ones.
    fn tls_started(&mut self) {
        self.reader = CapabilityReader::new();
        self.state = LoginState::TlsGreeting;
    }

    fn take_leftover(mut self) -> Vec<u8> {
        self.reader.framer.take_rest().unwrap_or_default()
    }
}

/// Learns the backend's capabilities without logging in: greeting, then `LOGOUT`, then
/// [`BackendEvent::LoggedIn`] with the greeting's capabilities (see [`capability_from_string`]).
#[derive(Debug)]
pub struct SieveProbe {
    reader: CapabilityReader,
    done: bool,
    out: Vec<u8>,
}

impl Default for SieveProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl SieveProbe {
    pub fn new() -> Self {
        Self {
            reader: CapabilityReader::new(),
            done: false,
            out: Vec::new(),
        }
    }
}

impl BackendMachine for SieveProbe {
    fn advance(&mut self) -> BackendEvent {
        if self.done {
            return BackendEvent::Failed(BackendError::Protocol);
        }
        match self.reader.read() {
            Read::More => BackendEvent::NeedInput,
            Read::Bad => {
                self.done = true;
                BackendEvent::Failed(BackendError::Protocol)
            }
            Read::Done(Status::Ok) => {
                self.done = true;
                self.out.extend_from_slice(b"LOGOUT\r\n");
                BackendEvent::LoggedIn(self.reader.strings())
            }
            Read::Done(_) => {
                self.done = true;
                BackendEvent::Failed(BackendError::BadGreeting)
            }
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.reader.framer.feed(bytes);
    }

    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn tls_started(&mut self) {}

    fn take_leftover(self) -> Vec<u8> {
        Vec::new()
    }
}
