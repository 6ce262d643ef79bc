//! POP3 before login (RFC 1939, 2449 CAPA, 2595 STLS, 5034 AUTH, 3206 response codes), sans-I/O,
//! and the backend master login (`AUTH PLAIN` with the empty authzid).
//!
//! APOP is not offered: it needs the plaintext password on the server side.

use crate::identity::{IdentityRules, LogName};
use crate::proto::imap::{BackendError, BackendEvent};
use crate::proto::line::{LineBuffer, TooLong};
use crate::proto::prelogin::{
    sasl_next, BackendMachine, Close, Event, Failure, PreLogin, Refusal, SaslNext,
};
use crate::sasl::{self, Credentials, Exchange, Mechanism, Offer, Response, SaslError, Step};
use crate::secret::Secret;

/// Longest ordinary command line (RFC 2449 allows 255; SECURITY.md says 512).
pub const LINE_MAX: usize = 512;
/// Longest AUTH line or SASL response (room for OAuth tokens).
pub const AUTH_LINE_MAX: usize = 12 * 1024;

/// How the listener is set up.
#[derive(Debug, Clone)]
pub struct Pop3Options {
    pub tls: bool,
    pub starttls: bool,
    pub allow_plaintext_auth: bool,
    pub rules: IdentityRules,
    pub max_auth_failures: u32,
    pub max_protocol_errors: u32,
    /// The SASL mechanisms offered.
    pub sasl: Offer,
}

#[derive(Debug)]
enum State {
    Commands,
    Sasl(Exchange),
    /// `token`: a refusal goes through the RFC 7628 error challenge first.
    Checking {
        token: bool,
    },
    /// The error challenge was sent; the client's answer (any line) gets the failure.
    TokenRefused,
    StartTls,
    Closed,
}

/// The POP3 pre-login machine for one connection.
#[derive(Debug)]
pub struct Pop3PreAuth {
    opts: Pop3Options,
    lines: LineBuffer,
    state: State,
    out: Vec<u8>,
    user: Option<Vec<u8>>,
    errors: u32,
    failures: u32,
    attempts: u32,
}

impl Pop3PreAuth {
    pub fn new(opts: Pop3Options) -> Self {
        Self {
            opts,
            lines: LineBuffer::new(),
            state: State::Commands,
            out: Vec::with_capacity(128),
            user: None,
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

    fn protocol_error(&mut self, reply: &str) -> Option<Event> {
        self.push(reply);
        self.errors += 1;
        if self.errors >= self.opts.max_protocol_errors {
            self.push("-ERR Too many invalid commands\r\n");
            self.state = State::Closed;
            return Some(Event::Close(Close::TooManyErrors));
        }
        None
    }

    fn capa(&mut self) {
        self.push("+OK Capability list follows\r\n");
        if self.auth_allowed() {
            let names = self.opts.sasl.names().join(" ");
            self.push(&format!("USER\r\nSASL {names}\r\n"));
        }
        if self.opts.starttls && !self.opts.tls {
            self.push("STLS\r\n");
        }
        self.push("RESP-CODES\r\nAUTH-RESP-CODE\r\nTOP\r\nUIDL\r\n.\r\n");
    }

    fn login(&mut self, credentials: Result<Credentials, (Refusal, String)>, token: bool) -> Event {
        self.attempts += 1;
        self.state = State::Checking { token };
        Event::Login {
            attempt: self.attempts,
            credentials,
        }
    }

    fn sasl_step(&mut self, ex: Exchange, step: Result<Step, SaslError>) -> Option<Event> {
        match sasl_next(step) {
            SaslNext::Challenge(c) => {
                self.push(&format!("+ {c}\r\n"));
                self.state = State::Sasl(ex);
                None
            }
            SaslNext::Login(credentials) => {
                Some(self.login(credentials, ex.mechanism().is_token()))
            }
            SaslNext::Cancelled => {
                self.push("-ERR Authentication cancelled\r\n");
                None
            }
            SaslNext::AuthzidRefused => {
                self.protocol_error("-ERR [AUTH] Authorization identity refused\r\n")
            }
            SaslNext::Invalid => self.protocol_error("-ERR Invalid SASL response\r\n"),
        }
    }

    /// The failure for wrong credentials, counting towards the disconnect.
    fn rejected(&mut self) -> Option<Event> {
        self.push("-ERR [AUTH] Authentication failed\r\n");
        self.failures += 1;
        if self.failures >= self.opts.max_auth_failures {
            self.state = State::Closed;
            return Some(Event::Close(Close::TooManyFailures));
        }
        None
    }

    fn command(&mut self, line: &[u8]) -> Option<Event> {
        if let State::TokenRefused = self.state {
            self.state = State::Commands;
            return self.rejected();
        }
        if let State::Sasl(_) = self.state {
            let State::Sasl(mut ex) = std::mem::replace(&mut self.state, State::Commands) else {
                return None;
            };
            let step = match sasl::decode_response(line) {
                Ok(Response::Cancel) => Err(SaslError::Cancelled),
                Ok(Response::Data(d)) => ex.step(&d, &self.opts.rules),
                Err(e) => Err(e),
            };
            return self.sasl_step(ex, step);
        }
        if super::looks_like_http(line) {
            self.state = State::Closed;
            return Some(Event::Close(Close::HttpOnMailPort));
        }
        let (verb, arg) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        let verb = verb.to_ascii_uppercase();
        if verb != b"AUTH" && line.len() > LINE_MAX {
            return self.protocol_error("-ERR Command line too long\r\n");
        }
        match (verb.as_slice(), arg) {
            (b"CAPA", None) => {
                self.capa();
                None
            }
            (b"QUIT", None) => {
                self.push("+OK Bye\r\n");
                self.state = State::Closed;
                Some(Event::Close(Close::Logout))
            }
            (b"STLS", None) => {
                if self.opts.tls || !self.opts.starttls {
                    return self.protocol_error("-ERR STLS not available\r\n");
                }
                if self.lines.has_pending() {
                    self.state = State::Closed;
                    return Some(Event::Close(Close::PipelinedStartTls));
                }
                self.push("+OK Begin TLS negotiation\r\n");
                self.state = State::StartTls;
                Some(Event::StartTls)
            }
            (b"USER" | b"PASS" | b"AUTH", _) if !self.auth_allowed() => self
                .protocol_error("-ERR [AUTH] Plaintext authentication disallowed before STLS\r\n"),
            (b"USER", Some(name)) if !name.is_empty() => {
                self.user = Some(name.to_vec());
                self.push("+OK\r\n");
                None
            }
            (b"PASS", Some(pass)) => {
                let Some(user) = self.user.take() else {
                    return self.protocol_error("-ERR USER first\r\n");
                };
                let credentials = match self.opts.rules.validate(&user) {
                    Err(e) => Err((Refusal::Identity(e), LogName(&user).to_string())),
                    Ok(_) if pass.is_empty() => {
                        Err((Refusal::EmptyPassword, LogName(&user).to_string()))
                    }
                    Ok(name) => Ok(Credentials {
                        username: name.to_owned(),
                        secret: Secret::new(pass.to_vec()),
                        mechanism: Mechanism::Login,
                    }),
                };
                Some(self.login(credentials, false))
            }
            (b"AUTH", None) => {
                self.push("+OK\r\n");
                for name in self.opts.sasl.names() {
                    self.push(&format!("{name}\r\n"));
                }
                self.push(".\r\n");
                None
            }
            (b"AUTH", Some(rest)) => {
                let (mech, initial) = match rest.iter().position(|&b| b == b' ') {
                    Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                    None => (rest, None),
                };
                let Some(mech) = Mechanism::from_name(mech).filter(|m| self.opts.sasl.allows(*m))
                else {
                    return self.protocol_error("-ERR Unsupported authentication mechanism\r\n");
                };
                let mut ex = Exchange::new(mech);
                let step = match initial.map(sasl::decode_response) {
                    None => ex.begin(None, &self.opts.rules),
                    Some(Ok(Response::Data(d))) => ex.begin(Some(&d), &self.opts.rules),
                    Some(Ok(Response::Cancel)) => Err(SaslError::Cancelled),
                    Some(Err(e)) => Err(e),
                };
                self.sasl_step(ex, step)
            }
            (b"APOP", _) => self.protocol_error("-ERR APOP not supported\r\n"),
            _ => self.protocol_error("-ERR Unknown command or not allowed before login\r\n"),
        }
    }
}

impl PreLogin for Pop3PreAuth {
    fn greet(&mut self) {
        self.push("+OK POP3 server ready\r\n");
    }

    fn advance(&mut self) -> Event {
        loop {
            match self.state {
                State::Closed => return Event::Close(Close::Logout),
                State::StartTls => return Event::StartTls,
                State::Checking { .. } => return Event::NeedInput,
                State::Commands | State::Sasl(_) | State::TokenRefused => {}
            }
            let Some(line) = self.lines.next_line(AUTH_LINE_MAX) else {
                return Event::NeedInput;
            };
            let ev = match line {
                Err(TooLong) => {
                    if matches!(self.state, State::TokenRefused) {
                        self.state = State::Commands;
                        if let Some(ev) = self.rejected() {
                            return ev;
                        }
                        continue;
                    }
                    if matches!(self.state, State::Sasl(_)) {
                        self.state = State::Commands;
                    }
                    self.protocol_error("-ERR Command line too long\r\n")
                }
                Ok(line) => self.command(&line),
            };
            if let Some(ev) = ev {
                return ev;
            }
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.lines.feed(bytes);
    }

    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn tls_started(&mut self) {
        self.opts.tls = true;
        self.lines = LineBuffer::new();
        self.user = None;
        self.state = State::Commands;
    }

    fn timed_out(&mut self) {
        self.state = State::Closed;
        self.push("-ERR Disconnected for inactivity\r\n");
    }

    fn shutdown(&mut self) -> Event {
        self.state = State::Closed;
        self.push("-ERR [SYS/TEMP] Server shutting down\r\n");
        Event::Close(Close::Shutdown)
    }

    fn login_succeeded(&mut self, _capabilities: &[String]) {
        self.state = State::Closed;
        self.push("+OK Logged in\r\n");
    }

    fn login_failed(&mut self, failure: Failure) -> Option<Event> {
        let token = matches!(self.state, State::Checking { token: true });
        self.state = State::Commands;
        match failure {
            Failure::Rejected => {
                if let (true, Some(challenge)) = (token, self.opts.sasl.oauth_error()) {
                    let line = format!("+ {challenge}\r\n");
                    self.push(&line);
                    self.state = State::TokenRefused;
                    return None;
                }
                return self.rejected();
            }
            Failure::Temporary => {
                self.push("-ERR [SYS/TEMP] Authentication service temporarily unavailable\r\n");
            }
        }
        None
    }

    fn pipelined_goodbye(&self) -> &'static [u8] {
        b"-ERR Too much data pipelined before login\r\n"
    }

    fn take_leftover(mut self) -> Option<Vec<u8>> {
        Some(self.lines.take_rest())
    }

    fn client_id(&self) -> Option<&str> {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendState {
    Greeting,
    Stls,
    AwaitTls,
    Auth,
    Done,
}

/// The POP3 master login: greeting, optional STLS, `AUTH PLAIN <\0user%master\0secret>`.
#[derive(Debug)]
pub struct Pop3BackendLogin {
    lines: LineBuffer,
    state: BackendState,
    starttls: bool,
    payload: zeroize::Zeroizing<String>,
    out: Vec<u8>,
}

impl Pop3BackendLogin {
    pub fn new(
        account: &str,
        master: &str,
        separator: &str,
        secret: &Secret,
        starttls: bool,
    ) -> Self {
        Self {
            lines: LineBuffer::new(),
            state: BackendState::Greeting,
            starttls,
            payload: crate::sasl::master_plain(account, master, separator, secret),
            out: Vec::new(),
        }
    }

    fn send_auth(&mut self) {
        self.out.extend_from_slice(b"AUTH PLAIN ");
        self.out.extend_from_slice(self.payload.as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.state = BackendState::Auth;
    }
}

impl BackendMachine for Pop3BackendLogin {
    fn advance(&mut self) -> BackendEvent {
        loop {
            match self.state {
                BackendState::AwaitTls => return BackendEvent::StartTls,
                BackendState::Done => return BackendEvent::Failed(BackendError::Protocol),
                _ => {}
            }
            let Some(line) = self.lines.next_line(AUTH_LINE_MAX) else {
                return BackendEvent::NeedInput;
            };
            let ok = matches!(&line, Ok(l) if l.starts_with(b"+OK"));
            let state = self.state;
            self.state = BackendState::Done;
            match (state, ok) {
                (BackendState::Greeting, true) if self.starttls => {
                    self.out.extend_from_slice(b"STLS\r\n");
                    self.state = BackendState::Stls;
                }
                (BackendState::Greeting, true) => self.send_auth(),
                (BackendState::Greeting, false) => {
                    return BackendEvent::Failed(BackendError::BadGreeting)
                }
                (BackendState::Stls, true) if self.lines.has_pending() => {
                    return BackendEvent::Failed(BackendError::BytesAfterStartTls)
                }
                (BackendState::Stls, true) => {
                    self.state = BackendState::AwaitTls;
                    return BackendEvent::StartTls;
                }
                (BackendState::Stls, false) => {
                    return BackendEvent::Failed(BackendError::StartTlsRefused)
                }
                (BackendState::Auth, true) => return BackendEvent::LoggedIn(Vec::new()),
                (BackendState::Auth, false) => {
                    return BackendEvent::Failed(BackendError::LoginRefused)
                }
                _ => return BackendEvent::Failed(BackendError::Protocol),
            }
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.lines.feed(bytes);
    }

    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn tls_started(&mut self) {
        self.lines = LineBuffer::new();
        self.send_auth();
    }

    fn take_leftover(mut self) -> Vec<u8> {
        self.lines.take_rest()
    }
}

#[cfg(test)]
mod tests;
