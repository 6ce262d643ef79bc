//! SMTP submission before login (RFC 6409, 4954 AUTH, 3207 STARTTLS, 2920 PIPELINING), sans-I/O,
//! and the backend master login in [`backend`].
//!
//! Until AUTH succeeds nothing reaches the backend: mail commands get `530 5.7.0`, so an
//! unauthenticated client can never relay. The `EHLO` keywords mirror the backend's (learned
//! from it) except `AUTH` and `STARTTLS`, which the proxy decides. Commands pipelined behind a
//! successful AUTH are held and forwarded once the backend has accepted the master login.

pub mod backend;
pub mod reply;

use std::sync::Arc;

use smtp_proto::Request;

use crate::identity::IdentityRules;
use crate::proto::line::{LineBuffer, TooLong};
use crate::proto::prelogin::{sasl_next, Close, Event, Failure, PreLogin, Refusal, SaslNext};
use crate::sasl::{self, Credentials, Exchange, Mechanism, Offer, Response, SaslError, Step};

pub use backend::SmtpBackendLogin;

/// Longest ordinary command line (SECURITY.md; RFC 5321 says 512 with the CRLF).
pub const LINE_MAX: usize = 512;
/// Longest AUTH line or SASL continuation (OAuth tokens are long).
pub const AUTH_LINE_MAX: usize = 12 * 1024;
/// Keywords offered when nothing could be learned from the backend: what every submission
/// server speaks. The proxy's own replies carry enhanced status codes.
pub const DEFAULT_KEYWORDS: &[&str] = &["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"];

/// Backend `EHLO` keywords the client must not see: the proxy decides AUTH and STARTTLS, and
/// XCLIENT/XFORWARD are offered to the proxy as a trusted peer, not to the client.
const PROXY_DECIDES: &[&str] = &["AUTH", "STARTTLS", "XCLIENT", "XFORWARD"];

/// The backend's keywords (the `EHLO` reply lines after the first) reduced to what the client
/// may be offered: no AUTH, STARTTLS or trusted-peer extensions, no duplicates, printable only.
pub fn client_keywords(backend: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in backend {
        let line = line.trim();
        let keyword = line
            .split([' ', '='])
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let printable = line.bytes().all(|b| (0x20..0x7f).contains(&b));
        if keyword.is_empty()
            || !printable
            || line.len() > 200
            || PROXY_DECIDES.contains(&keyword.as_str())
            || out.iter().any(|k| k.eq_ignore_ascii_case(line))
        {
            continue;
        }
        out.push(line.to_owned());
    }
    out
}

/// How the listener is set up.
#[derive(Debug, Clone)]
pub struct SmtpOptions {
    pub tls: bool,
    pub starttls: bool,
    pub allow_plaintext_auth: bool,
    pub rules: IdentityRules,
    pub max_auth_failures: u32,
    pub max_protocol_errors: u32,
    /// Our name in the greeting and the `EHLO` reply.
    pub hostname: String,
    /// What to offer in `EHLO` besides AUTH and STARTTLS (see [`client_keywords`]).
    pub keywords: Arc<Vec<String>>,
    /// The SASL mechanisms offered.
    pub sasl: Offer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Greeted {
    No,
    Helo,
    Ehlo,
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

/// The submission pre-login machine for one connection.
#[derive(Debug)]
pub struct SmtpPreAuth {
    opts: SmtpOptions,
    lines: LineBuffer,
    state: State,
    out: Vec<u8>,
    greeted: Greeted,
    errors: u32,
    failures: u32,
    attempts: u32,
}

impl SmtpPreAuth {
    pub fn new(opts: SmtpOptions) -> Self {
        Self {
            opts,
            lines: LineBuffer::new(),
            state: State::Commands,
            out: Vec::with_capacity(256),
            greeted: Greeted::No,
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

    fn close(&mut self, reply: &str, why: Close) -> Option<Event> {
        self.push(reply);
        self.state = State::Closed;
        Some(Event::Close(why))
    }

    /// Answers `reply` and counts a protocol error; the last one closes with `421`.
    fn protocol_error(&mut self, reply: &str) -> Option<Event> {
        self.push(reply);
        self.errors += 1;
        if self.errors >= self.opts.max_protocol_errors {
            let bye = format!(
                "421 4.7.0 {} Too many errors, closing connection\r\n",
                self.opts.hostname
            );
            return self.close(&bye, Close::TooManyErrors);
        }
        None
    }

    fn ehlo(&mut self) {
        let mut lines: Vec<String> = vec![self.opts.hostname.clone()];
        lines.extend(self.opts.keywords.iter().cloned());
        if self.auth_allowed() {
            lines.push(format!("AUTH {}", self.opts.sasl.names().join(" ")));
        }
        if self.opts.starttls && !self.opts.tls {
            lines.push("STARTTLS".into());
        }
        let last = lines.len() - 1;
        for (i, line) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.out
                .extend_from_slice(format!("250{sep}{line}\r\n").as_bytes());
        }
        self.greeted = Greeted::Ehlo;
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
                self.push(&format!("334 {c}\r\n"));
                self.state = State::Sasl(ex);
                None
            }
            SaslNext::Login(credentials) => {
                Some(self.login(credentials, ex.mechanism().is_token()))
            }
            SaslNext::Cancelled => {
                self.push("501 5.0.0 Authentication cancelled\r\n");
                None
            }
            SaslNext::AuthzidRefused => {
                self.protocol_error("535 5.7.8 Authorization identity refused\r\n")
            }
            SaslNext::Invalid => self.protocol_error("501 5.5.2 Invalid SASL response\r\n"),
        }
    }

    fn sasl_line(&mut self, line: &[u8]) -> Option<Event> {
        let State::Sasl(mut ex) = std::mem::replace(&mut self.state, State::Commands) else {
            return None;
        };
        let step = match sasl::decode_response(line) {
            Ok(Response::Cancel) => Err(SaslError::Cancelled),
            Ok(Response::Data(d)) => ex.step(&d, &self.opts.rules),
            Err(e) => Err(e),
        };
        self.sasl_step(ex, step)
    }

    fn auth(&mut self, mechanism: u64, initial: &str) -> Option<Event> {
        if !self.auth_allowed() {
            return self.protocol_error(
                "538 5.7.11 Encryption required for requested authentication mechanism\r\n",
            );
        }
        if self.greeted != Greeted::Ehlo {
            return self.protocol_error("503 5.5.1 Send EHLO first\r\n");
        }
        let mechanism = match mechanism {
            smtp_proto::AUTH_PLAIN => Some(Mechanism::Plain),
            smtp_proto::AUTH_LOGIN => Some(Mechanism::Login),
            smtp_proto::AUTH_XOAUTH2 => Some(Mechanism::XOAuth2),
            smtp_proto::AUTH_OAUTHBEARER => Some(Mechanism::OAuthBearer),
            _ => None,
        };
        let mechanism = match mechanism {
            Some(m) if self.opts.sasl.allows(m) => m,
            _ => {
                return self.protocol_error("504 5.5.4 Unrecognized authentication type\r\n");
            }
        };
        let mut ex = Exchange::new(mechanism);
        let step = if initial.is_empty() {
            ex.begin(None, &self.opts.rules)
        } else {
            match sasl::decode_response(initial.as_bytes()) {
                Ok(Response::Data(d)) => ex.begin(Some(&d), &self.opts.rules),
                Ok(Response::Cancel) => Err(SaslError::Cancelled),
                Err(e) => Err(e),
            }
        };
        self.sasl_step(ex, step)
    }

    /// The failure for wrong credentials, counting towards the disconnect.
    fn rejected(&mut self) -> Option<Event> {
        self.push("535 5.7.8 Authentication credentials invalid\r\n");
        self.failures += 1;
        if self.failures >= self.opts.max_auth_failures {
            let bye = format!(
                "421 4.7.0 {} Too many failed authentications, closing connection\r\n",
                self.opts.hostname
            );
            return self.close(&bye, Close::TooManyFailures);
        }
        None
    }

    fn command(&mut self, line: &[u8]) -> Option<Event> {
        if matches!(self.state, State::Sasl(_)) {
            return self.sasl_line(line);
        }
        if let State::TokenRefused = self.state {
            self.state = State::Commands;
            return self.rejected();
        }
        if super::looks_like_http(line) {
            self.state = State::Closed;
            return Some(Event::Close(Close::HttpOnMailPort));
        }
        let is_auth = line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH ");
        if !is_auth && line.len() > LINE_MAX {
            return self.protocol_error("500 5.5.6 Line too long\r\n");
        }
        let mut framed = zeroize::Zeroizing::new(Vec::with_capacity(line.len() + 2));
        framed.extend_from_slice(line);
        framed.extend_from_slice(b"\r\n");
        let request = Request::parse(&mut framed.iter());
        match request {
            Ok(Request::Ehlo { .. }) => {
                self.ehlo();
                None
            }
            Ok(Request::Helo { .. }) => {
                self.greeted = Greeted::Helo;
                let reply = format!("250 {}\r\n", self.opts.hostname);
                self.push(&reply);
                None
            }
            Ok(Request::Lhlo { .. }) => self.protocol_error("500 5.5.1 LHLO is for LMTP\r\n"),
            Ok(Request::StartTls) => {
                if self.opts.tls || !self.opts.starttls {
                    return self.protocol_error("502 5.5.1 STARTTLS not available\r\n");
                }
                if self.lines.has_pending() {
                    self.state = State::Closed;
                    return Some(Event::Close(Close::PipelinedStartTls));
                }
                self.push("220 2.0.0 Ready to start TLS\r\n");
                self.state = State::StartTls;
                Some(Event::StartTls)
            }
            Ok(Request::Auth {
                mechanism,
                initial_response,
            }) => self.auth(mechanism, &initial_response),
            Ok(Request::Noop { .. }) => {
                self.push("250 2.0.0 OK\r\n");
                None
            }
            Ok(Request::Rset) => {
                self.push("250 2.0.0 OK\r\n");
                None
            }
            Ok(Request::Help { .. }) => {
                self.push("214 2.0.0 See RFC 6409; authenticate first\r\n");
                None
            }
            Ok(Request::Quit) => {
                let bye = format!("221 2.0.0 {} Bye\r\n", self.opts.hostname);
                self.close(&bye, Close::Logout)
            }
            Ok(Request::Bdat { .. }) => {
                // The chunk that follows is binary: it cannot be read as commands. End here.
                self.close(
                    "530 5.7.0 Authentication required\r\n",
                    Close::TooManyErrors,
                )
            }
            Ok(
                Request::Mail { .. }
                | Request::Rcpt { .. }
                | Request::Data
                | Request::Vrfy { .. }
                | Request::Expn { .. }
                | Request::Etrn { .. }
                | Request::Atrn { .. }
                | Request::Burl { .. },
            ) => self.protocol_error("530 5.7.0 Authentication required\r\n"),
            Err(smtp_proto::Error::UnknownCommand) => {
                self.protocol_error("500 5.5.2 Unknown command\r\n")
            }
            Err(_) => self.protocol_error("501 5.5.4 Syntax error\r\n"),
        }
    }
}

impl PreLogin for SmtpPreAuth {
    fn greet(&mut self) {
        let greeting = format!("220 {} ESMTP ready\r\n", self.opts.hostname);
        self.push(&greeting);
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
                    self.protocol_error("500 5.5.6 Line too long\r\n")
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
        self.greeted = Greeted::No;
        self.state = State::Commands;
    }

    fn timed_out(&mut self) {
        self.state = State::Closed;
        let bye = format!(
            "421 4.4.2 {} Timeout waiting for input, closing connection\r\n",
            self.opts.hostname
        );
        self.push(&bye);
    }

    fn shutdown(&mut self) -> Event {
        self.state = State::Closed;
        let bye = format!(
            "421 4.3.2 {} Server shutting down, try again later\r\n",
            self.opts.hostname
        );
        self.push(&bye);
        Event::Close(Close::Shutdown)
    }

    fn login_succeeded(&mut self, _capabilities: &[String]) {
        self.state = State::Closed;
        self.push("235 2.7.0 Authentication successful\r\n");
    }

    fn login_failed(&mut self, failure: Failure) -> Option<Event> {
        let token = matches!(self.state, State::Checking { token: true });
        self.state = State::Commands;
        match failure {
            Failure::Rejected => {
                if let (true, Some(challenge)) = (token, self.opts.sasl.oauth_error()) {
                    let line = format!("334 {challenge}\r\n");
                    self.push(&line);
                    self.state = State::TokenRefused;
                    return None;
                }
                return self.rejected();
            }
            Failure::Temporary => {
                self.push("454 4.7.0 Temporary authentication failure\r\n");
            }
        }
        None
    }

    fn pipelined_goodbye(&self) -> &'static [u8] {
        b"421 4.7.0 Too much data pipelined before authentication\r\n"
    }

    fn take_leftover(mut self) -> Option<Vec<u8>> {
        Some(self.lines.take_rest())
    }

    fn client_id(&self) -> Option<&str> {
        None
    }
}

#[cfg(test)]
mod tests;
