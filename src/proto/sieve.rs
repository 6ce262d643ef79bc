//! ManageSieve (RFC 5804) before login, sans-I/O: the greeting is the capability list, then
//! CAPABILITY, STARTTLS, AUTHENTICATE "PLAIN" / "LOGIN", NOOP and LOGOUT are answered here and
//! everything else is refused. Also the backend master login ([`SieveBackendLogin`]), the probe
//! that learns the backend's capabilities ([`SieveProbe`]) and the splice filters
//! ([`SieveUpstream`], [`SieveDownstream`]).
//!
//! Strings may be quoted or literals. RFC 5804 has no continuation request, so a client sends a
//! literal's octets at once whether it wrote `{n+}` or `{n}`: both are read the same way, within
//! the same bounds.

use crate::identity::IdentityRules;
use crate::proto::prelogin::{sasl_next, Close, Event, Failure, PreLogin, Refusal, SaslNext};
use crate::sasl::{self, Credentials, Exchange, Mechanism, Response, SaslError, Step};

mod backend;
mod splice;
mod wire;

pub use backend::{
    capability_from_string, capability_to_string, parse_capability_response, CapabilityResponse,
    SieveBackendLogin, SieveProbe, Status,
};
pub use splice::{splice_filters, SieveDownstream, SieveUpstream};
pub use wire::{push_string, tokenize, Frame, Framer, Limits, Syntax, Token};

/// Longest command line before login (literal data excluded); SECURITY.md: 8 KiB.
pub const LINE_MAX: usize = 8 * 1024;
/// Largest string sent as a literal before login, and all literal bytes of one command together
/// (SECURITY.md: SASL strings 8 KiB).
pub const STRING_MAX: usize = 8 * 1024;

const LIMITS: Limits = Limits {
    line_max: LINE_MAX,
    literal_max: STRING_MAX as u64,
    literal_total: STRING_MAX as u64,
};

/// A capability line: name and optional value (`"SIEVE" "fileinto vacation"`).
pub type Capability = (String, Option<String>);

/// Capabilities only the proxy decides; never mirrored from the backend.
const OWN_CAPABILITIES: [&str; 6] = [
    "IMPLEMENTATION",
    "SASL",
    "STARTTLS",
    "UNAUTHENTICATE",
    "OWNER",
    "VERSION",
];
/// At most this many backend capabilities are mirrored.
const MAX_MIRRORED: usize = 32;

/// What is advertised before the backend was reached: the Sieve extensions that both Stalwart
/// and Dovecot Pigeonhole implement (so nothing is promised that the backend cannot do) and
/// the `mailto` notification method. Replaced by the backend's own list once learnt.
pub fn default_capabilities() -> Vec<Capability> {
    vec![
        (
            "SIEVE".into(),
            Some(
                "fileinto reject envelope encoded-character vacation subaddress \
                 comparator-i;ascii-numeric relational regex imap4flags copy include \
                 variables body enotify environment mailbox date index ihave duplicate \
                 mime foreverypart extracttext"
                    .into(),
            ),
        ),
        ("NOTIFY".into(), Some("mailto".into())),
    ]
}

/// Whether a backend capability may be shown to clients: not one the proxy decides, a plain
/// name, and a value that fits on a line.
pub fn mirrorable(name: &str, value: Option<&str>) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        && !OWN_CAPABILITIES
            .iter()
            .any(|own| own.eq_ignore_ascii_case(name))
        && value.is_none_or(|v| v.len() <= 1024 && !v.contains(['\r', '\n', '\0']))
}

/// How the listener is set up.
#[derive(Debug, Clone)]
pub struct SieveOptions {
    /// The connection is TLS now.
    pub tls: bool,
    /// STARTTLS may be offered (a STARTTLS listener before the upgrade).
    pub starttls: bool,
    /// Accept credentials on cleartext (loopback test listeners only).
    pub allow_plaintext_auth: bool,
    pub rules: IdentityRules,
    pub max_auth_failures: u32,
    pub max_protocol_errors: u32,
    /// The backend's capabilities (learnt by [`SieveProbe`], or [`default_capabilities`]);
    /// only the [`mirrorable`] ones are shown.
    pub capabilities: Vec<Capability>,
    /// The SASL mechanisms offered.
    pub sasl: crate::sasl::Offer,
}

#[derive(Debug)]
enum State {
    Commands,
    Sasl(Exchange),
    /// `token`: a refusal goes through the RFC 7628 error challenge first.
    Checking {
        token: bool,
    },
    /// The error challenge was sent; the client's answer (any string) gets the failure.
    TokenRefused,
    StartTls,
    Closed,
}

/// The ManageSieve pre-login machine for one connection.
#[derive(Debug)]
pub struct SievePreAuth {
    opts: SieveOptions,
    framer: Framer,
    state: State,
    out: Vec<u8>,
    errors: u32,
    failures: u32,
    attempts: u32,
}

impl SievePreAuth {
    pub fn new(opts: SieveOptions) -> Self {
        Self {
            opts,
            framer: Framer::new(LIMITS),
            state: State::Commands,
            out: Vec::with_capacity(512),
            errors: 0,
            failures: 0,
            attempts: 0,
        }
    }

    fn auth_allowed(&self) -> bool {
        self.opts.tls || self.opts.allow_plaintext_auth
    }

    fn push(&mut self, s: &str) {
        self.out.extend_from_slice(s.as_bytes());
    }

    /// The capability response (without the closing OK).
    fn capabilities(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        out.extend_from_slice(b"\"IMPLEMENTATION\" \"Portcullis\"\r\n");
        if self.auth_allowed() {
            let names = self.opts.sasl.names().join(" ");
            out.extend_from_slice(format!("\"SASL\" \"{names}\"\r\n").as_bytes());
        } else {
            // RFC 5804 §1.7: an empty list is allowed when STARTTLS is offered.
            out.extend_from_slice(b"\"SASL\" \"\"\r\n");
        }
        let mirrored = self
            .opts
            .capabilities
            .iter()
            .filter(|(n, v)| mirrorable(n, v.as_deref()))
            .take(MAX_MIRRORED);
        for (name, value) in mirrored {
            push_string(&mut out, name.as_bytes());
            if let Some(v) = value {
                out.push(b' ');
                push_string(&mut out, v.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        if self.opts.starttls && !self.opts.tls {
            out.extend_from_slice(b"\"STARTTLS\"\r\n");
        }
        out.extend_from_slice(b"\"VERSION\" \"1.0\"\r\n");
        self.out = out;
    }

    /// Counts a protocol error after its reply; the goodbye once there were too many.
    fn protocol_error(&mut self, reply: &str) -> Option<Event> {
        self.push(reply);
        self.errors += 1;
        if self.errors >= self.opts.max_protocol_errors {
            self.push("BYE \"Too many invalid commands\"\r\n");
            self.state = State::Closed;
            return Some(Event::Close(Close::TooManyErrors));
        }
        None
    }

    fn login(&mut self, credentials: Result<Credentials, (Refusal, String)>, token: bool) -> Event {
        self.attempts += 1;
        self.state = State::Checking { token };
        Event::Login {
            attempt: self.attempts,
            credentials,
        }
    }

    fn sasl_step(&mut self, exchange: Exchange, step: Result<Step, SaslError>) -> Option<Event> {
        match sasl_next(step) {
            SaslNext::Challenge(c) => {
                let mut out = std::mem::take(&mut self.out);
                push_string(&mut out, c.as_bytes());
                out.extend_from_slice(b"\r\n");
                self.out = out;
                self.state = State::Sasl(exchange);
                None
            }
            SaslNext::Login(credentials) => {
                Some(self.login(credentials, exchange.mechanism().is_token()))
            }
            SaslNext::Cancelled => {
                self.push("NO \"Authentication cancelled\"\r\n");
                None
            }
            SaslNext::AuthzidRefused => {
                self.protocol_error("NO \"Authorization identity refused\"\r\n")
            }
            SaslNext::Invalid => self.protocol_error("NO \"Invalid SASL response\"\r\n"),
        }
    }

    /// A client response during an AUTHENTICATE exchange: one string (or `*` to cancel).
    fn sasl_response(&mut self, exchange: Exchange, frame: &[u8]) -> Option<Event> {
        let mut exchange = exchange;
        let step = match tokenize(frame, false).as_deref() {
            Ok([Token::Str(s)]) => match sasl::decode_response(s) {
                Ok(Response::Cancel) => Err(SaslError::Cancelled),
                Ok(Response::Data(d)) => exchange.step(&d, &self.opts.rules),
                Err(e) => Err(e),
            },
            Ok([Token::Atom(a)]) if a == b"*" => Err(SaslError::Cancelled),
            _ => Err(SaslError::Malformed("SASL response")),
        };
        self.sasl_step(exchange, step)
    }

    fn authenticate(&mut self, mechanism: &[u8], initial: Option<&[u8]>) -> Option<Event> {
        if !self.auth_allowed() {
            return self.protocol_error(
                "NO (ENCRYPT-NEEDED) \"Authentication requires TLS; use STARTTLS\"\r\n",
            );
        }
        let Some(mech) = Mechanism::from_name(mechanism).filter(|m| self.opts.sasl.allows(*m))
        else {
            return self.protocol_error("NO \"Unsupported authentication mechanism\"\r\n");
        };
        let mut exchange = Exchange::new(mech);
        let step = match initial.map(sasl::decode_response) {
            None => exchange.begin(None, &self.opts.rules),
            Some(Ok(Response::Data(d))) => exchange.begin(Some(&d), &self.opts.rules),
            Some(Ok(Response::Cancel)) => Err(SaslError::Cancelled),
            Some(Err(e)) => Err(e),
        };
        self.sasl_step(exchange, step)
    }

    /// The failure for wrong credentials, counting towards the disconnect.
    fn rejected(&mut self) -> Option<Event> {
        self.push("NO \"Authentication failed\"\r\n");
        self.failures += 1;
        if self.failures >= self.opts.max_auth_failures {
            self.push("BYE \"Too many authentication failures\"\r\n");
            self.state = State::Closed;
            return Some(Event::Close(Close::TooManyFailures));
        }
        None
    }

    fn starttls(&mut self) -> Option<Event> {
        if self.opts.tls || !self.opts.starttls {
            return self.protocol_error("NO \"STARTTLS not available\"\r\n");
        }
        // Bytes sent after STARTTLS were sent in the clear: never interpret them.
        if self.framer.has_pending() {
            self.state = State::Closed;
            return Some(Event::Close(Close::PipelinedStartTls));
        }
        self.push("OK \"Begin TLS negotiation now\"\r\n");
        self.state = State::StartTls;
        Some(Event::StartTls)
    }

    /// One complete command (not in a SASL exchange).
    fn command(&mut self, frame: &[u8]) -> Option<Event> {
        let first_line = match memchr::memchr(b'\n', frame) {
            Some(i) => &frame[..=i],
            None => frame,
        };
        if super::looks_like_http(first_line) {
            self.state = State::Closed;
            return Some(Event::Close(Close::HttpOnMailPort));
        }
        let Ok(tokens) = tokenize(frame, false) else {
            return self.protocol_error("NO \"Invalid command syntax\"\r\n");
        };
        let Some((Token::Atom(name), args)) = tokens.split_first() else {
            return self.protocol_error("NO \"Invalid command syntax\"\r\n");
        };
        let name = name.to_ascii_uppercase();
        match (name.as_slice(), args) {
            (b"CAPABILITY", []) => {
                self.capabilities();
                self.push("OK \"Capability completed\"\r\n");
                None
            }
            (b"NOOP", []) => {
                self.push("OK \"NOOP completed\"\r\n");
                None
            }
            (b"NOOP", [Token::Str(tag)]) => {
                // RFC 5804 §2.14: the string comes back as a TAG response code.
                let mut out = std::mem::take(&mut self.out);
                out.extend_from_slice(b"OK (TAG ");
                push_string(&mut out, tag);
                out.extend_from_slice(b") \"Done\"\r\n");
                self.out = out;
                None
            }
            (b"LOGOUT", []) => {
                self.push("OK \"Logout completed\"\r\n");
                self.state = State::Closed;
                Some(Event::Close(Close::Logout))
            }
            (b"STARTTLS", []) => self.starttls(),
            (b"AUTHENTICATE", [Token::Str(mech)]) => self.authenticate(mech, None),
            (b"AUTHENTICATE", [Token::Str(mech), Token::Str(initial)]) => {
                self.authenticate(mech, Some(initial))
            }
            (b"CAPABILITY" | b"NOOP" | b"LOGOUT" | b"STARTTLS" | b"AUTHENTICATE", _) => {
                self.protocol_error("NO \"Invalid arguments\"\r\n")
            }
            (
                b"HAVESPACE" | b"PUTSCRIPT" | b"LISTSCRIPTS" | b"SETACTIVE" | b"GETSCRIPT"
                | b"DELETESCRIPT" | b"RENAMESCRIPT" | b"CHECKSCRIPT" | b"UNAUTHENTICATE",
                _,
            ) => self.protocol_error("NO \"Authenticate first\"\r\n"),
            _ => self.protocol_error("NO \"Unknown command\"\r\n"),
        }
    }
}

impl PreLogin for SievePreAuth {
    fn greet(&mut self) {
        self.capabilities();
        self.push("OK \"ManageSieve server ready\"\r\n");
    }

    fn advance(&mut self) -> Event {
        loop {
            match self.state {
                State::Closed => return Event::Close(Close::Logout),
                State::StartTls => return Event::StartTls,
                State::Checking { .. } => return Event::NeedInput,
                State::Commands | State::Sasl(_) | State::TokenRefused => {}
            }
            let Some(frame) = self.framer.next_frame() else {
                return Event::NeedInput;
            };
            let ev = match frame {
                Frame::TooLong => {
                    // An over-long SASL response ends the exchange too.
                    self.state = State::Commands;
                    self.protocol_error("NO \"Line too long\"\r\n")
                }
                Frame::LiteralTooLarge { sync: true } => {
                    // A client that waits before sending `{n}` octets never sends these; one
                    // that does not sends them as commands, which are answered like any other.
                    self.state = State::Commands;
                    self.protocol_error("NO \"Literal too large\"\r\n")
                }
                Frame::LiteralTooLarge { sync: false } => {
                    // The octets are on their way: reading them only to drop them would let a
                    // client make us read without bound, so refuse and close.
                    self.push("NO \"Literal too large\"\r\nBYE \"Literal too large\"\r\n");
                    self.state = State::Closed;
                    Some(Event::Close(Close::LiteralTooLarge))
                }
                Frame::Complete(bytes) => {
                    match std::mem::replace(&mut self.state, State::Commands) {
                        State::Sasl(exchange) => self.sasl_response(exchange, &bytes),
                        // The client's answer to the error challenge; its content is moot.
                        State::TokenRefused => self.rejected(),
                        _ => self.command(&bytes),
                    }
                }
            };
            if let Some(ev) = ev {
                return ev;
            }
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.framer.feed(bytes);
    }

    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn tls_started(&mut self) {
        self.opts.tls = true;
        self.framer = Framer::new(LIMITS);
        self.state = State::Commands;
        // RFC 5804 §2.2: the capabilities again, now over TLS.
        self.capabilities();
        self.push("OK \"TLS negotiation successful\"\r\n");
    }

    fn timed_out(&mut self) {
        self.state = State::Closed;
        self.push("BYE \"Disconnected for inactivity\"\r\n");
    }

    fn shutdown(&mut self) -> Event {
        self.state = State::Closed;
        self.push("BYE (TRYLATER) \"Server shutting down\"\r\n");
        Event::Close(Close::Shutdown)
    }

    fn login_succeeded(&mut self, _capabilities: &[String]) {
        self.state = State::Closed;
        self.push("OK \"Logged in\"\r\n");
    }

    fn login_failed(&mut self, failure: Failure) -> Option<Event> {
        let token = matches!(self.state, State::Checking { token: true });
        self.state = State::Commands;
        match failure {
            Failure::Rejected => {
                if let (true, Some(challenge)) = (token, self.opts.sasl.oauth_error()) {
                    let mut out = std::mem::take(&mut self.out);
                    push_string(&mut out, challenge.as_bytes());
                    out.extend_from_slice(b"\r\n");
                    self.out = out;
                    self.state = State::TokenRefused;
                    return None;
                }
                return self.rejected();
            }
            Failure::Temporary => {
                self.push("NO (TRYLATER) \"Authentication service temporarily unavailable\"\r\n");
            }
        }
        None
    }

    fn pipelined_goodbye(&self) -> &'static [u8] {
        b"BYE \"Too much data pipelined before login\"\r\n"
    }

    fn take_leftover(mut self) -> Option<Vec<u8>> {
        self.framer
            .take_rest()
            .filter(|rest| rest.len() <= LINE_MAX + STRING_MAX)
    }

    fn client_id(&self) -> Option<&str> {
        None
    }
}

#[cfg(test)]
mod tests;
