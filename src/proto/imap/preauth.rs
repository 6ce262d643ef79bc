//! IMAP before login, as a sans-I/O state machine over imap-codec's fragmentizer and codecs.
//!
//! The driver calls [`PreAuth::next`] until it returns an [`Event`], writes whatever
//! [`PreAuth::take_output`] holds, and acts on the event. Bytes are enqueued only when the machine
//! asks for them ([`Event::NeedInput`]), so the input buffer stays bounded. While credentials are
//! being checked the machine is paused: commands the client pipelined behind LOGIN stay buffered
//! until the result is known, and after a success they are handed over with
//! [`PreAuth::take_leftover`], never interpreted here.

use imap_codec::fragmentizer::{DecodeMessageError, FragmentInfo, Fragmentizer};
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::{AuthenticateDataCodec, CommandCodec};

use crate::identity::IdentityRules;
use crate::proto::prelogin::{sasl_next, Close, Event, Failure, PreLogin, Refusal, SaslNext};
use crate::sasl::{Credentials, Exchange, Mechanism, Offer, SaslError, Step};

/// Bounds on what a client may send before login (SECURITY.md defaults).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ImapLimits {
    /// Longest command line (8 KiB).
    pub line_max: u32,
    /// Largest literal, e.g. a LOGIN argument (1 KiB).
    pub literal_max: u32,
    /// All literal bytes before login together (8 KiB).
    pub literal_total: u32,
    /// LITERAL- (RFC 7888) caps non-synchronizing literals at 4096 bytes.
    pub nonsync_literal_max: u32,
    /// Failed logins before `* BYE` (3).
    pub max_auth_failures: u32,
    /// Protocol errors before `* BYE` (3).
    pub max_protocol_errors: u32,
    /// ID: pairs, key and value lengths (30, 30, 1024).
    pub id_max_pairs: usize,
    pub id_key_max: usize,
    pub id_value_max: usize,
}

impl Default for ImapLimits {
    fn default() -> Self {
        Self {
            line_max: 8 * 1024,
            literal_max: 1024,
            literal_total: 8 * 1024,
            nonsync_literal_max: 4096,
            max_auth_failures: 3,
            max_protocol_errors: 3,
            id_max_pairs: 30,
            id_key_max: 30,
            id_value_max: 1024,
        }
    }
}

/// How the listener is set up.
#[derive(Debug, Clone)]
pub struct PreAuthOptions {
    pub limits: ImapLimits,
    /// The connection is already TLS (implicit TLS).
    pub tls: bool,
    /// STARTTLS may be offered (a STARTTLS listener before the upgrade).
    pub starttls: bool,
    /// Accept credentials on cleartext (loopback test listeners only).
    pub allow_plaintext_auth: bool,
    pub rules: IdentityRules,
    /// The SASL mechanisms offered.
    pub sasl: Offer,
}

#[derive(Debug)]
enum State {
    Commands,
    Sasl {
        tag: String,
        exchange: Exchange,
    },
    Checking {
        tag: String,
        token: bool,
    },
    /// A refused bearer token: the RFC 7628 error challenge was sent; the client's answer (any
    /// line) gets the tagged failure.
    TokenRefused {
        tag: String,
    },
    StartTls,
    Closed,
}

/// The IMAP pre-login machine for one connection.
#[derive(Debug)]
pub struct PreAuth {
    opts: PreAuthOptions,
    frag: Fragmentizer,
    state: State,
    out: Vec<u8>,
    literal_bytes: u32,
    protocol_errors: u32,
    auth_failures: u32,
    attempts: u32,
    client_id: Option<String>,
    started: bool,
}

const TOO_LONG: &str = "Command line too long";
const FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed";

impl PreAuth {
    pub fn new(opts: PreAuthOptions) -> Self {
        let frag = Self::fragmentizer(&opts.limits);
        Self {
            opts,
            frag,
            state: State::Commands,
            out: Vec::with_capacity(256),
            literal_bytes: 0,
            protocol_errors: 0,
            auth_failures: 0,
            attempts: 0,
            client_id: None,
            started: false,
        }
    }

    fn fragmentizer(limits: &ImapLimits) -> Fragmentizer {
        Fragmentizer::new(limits.line_max.saturating_add(limits.literal_total))
    }

    /// Bytes to send to the client; empties the buffer.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Whether output is waiting.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// What the client said about itself with ID (`name/version`), for the authenticator.
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_deref()
    }

    /// Whether the connection is TLS now.
    pub fn is_tls(&self) -> bool {
        self.opts.tls
    }

    fn auth_allowed(&self) -> bool {
        self.opts.tls || self.opts.allow_plaintext_auth
    }

    /// The pre-login capability list (without the leading `CAPABILITY`).
    pub fn capabilities(&self) -> String {
        let mut caps = String::from("IMAP4rev1 SASL-IR LITERAL- ID");
        if self.auth_allowed() {
            for name in self.opts.sasl.names() {
                caps.push_str(" AUTH=");
                caps.push_str(name);
            }
        } else {
            caps.push_str(" LOGINDISABLED");
        }
        if self.opts.starttls && !self.opts.tls {
            caps.push_str(" STARTTLS");
        }
        caps
    }

    /// Queues the greeting. Call once, first.
    pub fn greet(&mut self) {
        if !self.started {
            self.started = true;
            let caps = self.capabilities();
            self.push(format!("* OK [CAPABILITY {caps}] IMAP server ready\r\n"));
        }
    }

    /// Queues `* BYE` for a server shutdown; the driver then closes.
    pub fn shutdown(&mut self) -> Event {
        self.state = State::Closed;
        self.push("* BYE Server shutting down\r\n");
        Event::Close(Close::Shutdown)
    }

    /// Queues the answer for a pre-login timeout.
    pub fn timed_out(&mut self) {
        self.state = State::Closed;
        self.push("* BYE Autologout; idle for too long\r\n");
    }

    /// Adds client bytes. Only call after [`Event::NeedInput`].
    pub fn feed(&mut self, bytes: &[u8]) {
        self.frag.enqueue_bytes(bytes);
    }

    fn push(&mut self, s: impl AsRef<[u8]>) {
        self.out.extend_from_slice(s.as_ref());
    }

    fn tagged(&mut self, tag: Option<&str>, rest: &str) {
        let tag = tag.unwrap_or("*");
        self.push(format!("{tag} {rest}\r\n"));
    }

    /// Counts a protocol error; returns the close event once there were too many.
    fn protocol_error(&mut self) -> Option<Event> {
        self.protocol_errors += 1;
        if self.protocol_errors >= self.opts.limits.max_protocol_errors {
            self.push("* BYE Too many invalid commands\r\n");
            self.state = State::Closed;
            return Some(Event::Close(Close::TooManyErrors));
        }
        None
    }

    /// Runs the machine until the driver has something to do.
    pub fn advance(&mut self) -> Event {
        loop {
            match &self.state {
                State::Closed => return Event::Close(Close::Logout),
                State::StartTls => return Event::StartTls,
                State::Checking { .. } => return Event::NeedInput,
                State::Commands | State::Sasl { .. } | State::TokenRefused { .. } => {}
            }
            let Some(fragment) = self.frag.progress() else {
                return Event::NeedInput;
            };
            if let FragmentInfo::Line {
                start,
                end,
                announcement,
                ..
            } = fragment
            {
                if start == 0 && super::super::looks_like_http(self.frag.fragment_bytes(fragment)) {
                    self.state = State::Closed;
                    return Event::Close(Close::HttpOnMailPort);
                }
                if end - start > self.opts.limits.line_max as usize {
                    // Over-long line: make sure the rest of the message cannot be decoded.
                    self.frag.poison_message();
                }
                if let Some(ann) = announcement {
                    if let Some(ev) = self.literal_announced(ann.mode, ann.length) {
                        return ev;
                    }
                    continue;
                }
            }
            if !self.frag.is_message_complete() {
                continue;
            }
            if let Some(ev) = self.message() {
                return ev;
            }
        }
    }

    /// Decides on a literal announced at the end of a line.
    fn literal_announced(&mut self, mode: LiteralMode, length: u32) -> Option<Event> {
        let l = &self.opts.limits;
        let in_sasl = matches!(self.state, State::Sasl { .. } | State::TokenRefused { .. });
        let fits = !in_sasl
            && length <= l.literal_max
            && self.literal_bytes.saturating_add(length) <= l.literal_total
            && !self.frag.is_message_poisoned();
        let tag = self.frag.decode_tag().map(|t| t.as_ref().to_owned());
        match mode {
            LiteralMode::Sync if fits => {
                self.literal_bytes += length;
                self.push("+ Ready for literal data\r\n");
                None
            }
            LiteralMode::Sync => {
                // Safe to skip: the client waits for "+" and never sends the literal.
                self.frag.skip_message();
                if in_sasl {
                    self.end_sasl_with_bad(tag.as_deref());
                } else {
                    self.tagged(
                        tag.as_deref(),
                        "BAD [TOOBIG] Literal too large before login",
                    );
                }
                self.protocol_error()
            }
            LiteralMode::NonSync if fits && length <= l.nonsync_literal_max => {
                self.literal_bytes += length;
                None
            }
            LiteralMode::NonSync => {
                // The client is already sending the bytes; reading them only to discard them
                // would let it make us read up to 4 GiB. Refuse and close.
                self.tagged(
                    tag.as_deref(),
                    "BAD [TOOBIG] Literal too large before login",
                );
                self.push("* BYE Literal too large\r\n");
                self.state = State::Closed;
                Some(Event::Close(Close::LiteralTooLarge))
            }
        }
    }

    fn end_sasl_with_bad(&mut self, _tag: Option<&str>) {
        match std::mem::replace(&mut self.state, State::Commands) {
            State::Sasl { tag, .. } => self.tagged(Some(&tag), "BAD Invalid SASL response"),
            State::TokenRefused { tag } => self.tagged(Some(&tag), FAILED),
            other => self.state = other,
        }
    }

    /// Handles one complete message.
    fn message(&mut self) -> Option<Event> {
        if let State::Sasl { .. } = self.state {
            return self.sasl_response();
        }
        if let State::TokenRefused { .. } = self.state {
            // The client's answer to the error challenge (`AQ==` or `*`); its content is moot.
            let _ = self.frag.decode_message(&AuthenticateDataCodec::default());
            let State::TokenRefused { tag } = std::mem::replace(&mut self.state, State::Commands)
            else {
                return None;
            };
            return self.rejected(&tag);
        }
        let outcome = self.frag.decode_message(&CommandCodec::default());
        let command = match outcome {
            Ok(command) => command,
            Err(err) => {
                let text = match err {
                    DecodeMessageError::MessageTooLong { .. } => TOO_LONG,
                    DecodeMessageError::MessagePoisoned { .. } => TOO_LONG,
                    _ => "Invalid command",
                };
                let tag = self.frag.decode_tag().map(|t| t.as_ref().to_owned());
                self.tagged(tag.as_deref(), &format!("BAD {text}"));
                return self.protocol_error();
            }
        };
        let tag = command.tag.as_ref().to_owned();
        match command.body {
            CommandBody::Capability => {
                let caps = self.capabilities();
                self.push(format!("* CAPABILITY {caps}\r\n"));
                self.tagged(Some(&tag), "OK CAPABILITY completed");
                None
            }
            CommandBody::Noop => {
                self.tagged(Some(&tag), "OK NOOP completed");
                None
            }
            CommandBody::Logout => {
                self.push("* BYE Logging out\r\n");
                self.tagged(Some(&tag), "OK LOGOUT completed");
                self.state = State::Closed;
                Some(Event::Close(Close::Logout))
            }
            CommandBody::StartTLS => self.starttls(&tag),
            CommandBody::Id { parameters } => {
                let mut ok = true;
                let mut name = None;
                let mut version = None;
                if let Some(params) = &parameters {
                    let l = &self.opts.limits;
                    ok = params.len() <= l.id_max_pairs;
                    for (k, v) in params {
                        let k = k.as_ref();
                        let v = v.0.as_ref().map(|v| v.as_ref()).unwrap_or_default();
                        if k.len() > l.id_key_max || v.len() > l.id_value_max {
                            ok = false;
                        }
                        if k.eq_ignore_ascii_case(b"name") {
                            name = Some(printable(v, 64));
                        } else if k.eq_ignore_ascii_case(b"version") {
                            version = Some(printable(v, 32));
                        }
                    }
                }
                if !ok {
                    self.tagged(Some(&tag), "BAD ID parameters too large");
                    return self.protocol_error();
                }
                if let Some(name) = name {
                    self.client_id = Some(match version {
                        Some(v) => format!("{name}/{v}"),
                        None => name,
                    });
                }
                self.push("* ID NIL\r\n");
                self.tagged(Some(&tag), "OK ID completed");
                None
            }
            CommandBody::Login { username, password } => {
                if !self.auth_allowed() {
                    self.tagged(
                        Some(&tag),
                        "NO [PRIVACYREQUIRED] LOGIN is disabled before STARTTLS",
                    );
                    return self.protocol_error();
                }
                let user = username.as_ref();
                let pass = password.declassify().as_ref();
                let credentials = match self.opts.rules.validate(user) {
                    Err(e) => Err((Refusal::Identity(e), log_name(user))),
                    Ok(_) if pass.is_empty() => Err((Refusal::EmptyPassword, log_name(user))),
                    Ok(name) => Ok(Credentials {
                        username: name.to_owned(),
                        secret: crate::secret::Secret::new(pass.to_vec()),
                        mechanism: Mechanism::Login,
                    }),
                };
                Some(self.login(tag, credentials))
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                if !self.auth_allowed() {
                    self.tagged(
                        Some(&tag),
                        "NO [PRIVACYREQUIRED] Authentication is disabled before STARTTLS",
                    );
                    return self.protocol_error();
                }
                let mech = match mechanism {
                    AuthMechanism::Plain => Some(Mechanism::Plain),
                    AuthMechanism::Login => Some(Mechanism::Login),
                    AuthMechanism::XOAuth2 => Some(Mechanism::XOAuth2),
                    AuthMechanism::OAuthBearer => Some(Mechanism::OAuthBearer),
                    _ => None,
                };
                let mech = match mech {
                    Some(m) if self.opts.sasl.allows(m) => m,
                    _ => {
                        self.tagged(
                            Some(&tag),
                            "NO [CANNOT] Unsupported authentication mechanism",
                        );
                        return self.protocol_error();
                    }
                };
                let mut exchange = Exchange::new(mech);
                let initial = initial_response.as_ref().map(|s| s.declassify().as_ref());
                let step = exchange.begin(initial, &self.opts.rules);
                self.sasl_step(tag, exchange, step)
            }
            _ => {
                self.tagged(Some(&tag), "BAD Log in first");
                self.protocol_error()
            }
        }
    }

    fn starttls(&mut self, tag: &str) -> Option<Event> {
        if self.opts.tls || !self.opts.starttls {
            self.tagged(Some(tag), "BAD STARTTLS not available");
            return self.protocol_error();
        }
        // Anything the client sent after STARTTLS was sent in the clear before the handshake:
        // never interpret it (CVE-2011-0411 class); close instead.
        let pipelined = self.frag.progress().is_some() || !self.frag.message_bytes().is_empty();
        if pipelined {
            self.state = State::Closed;
            return Some(Event::Close(Close::PipelinedStartTls));
        }
        self.tagged(Some(tag), "OK Begin TLS negotiation now");
        self.state = State::StartTls;
        Some(Event::StartTls)
    }

    /// The TLS handshake after STARTTLS completed: forget everything learnt in the clear.
    pub fn tls_started(&mut self) {
        self.opts.tls = true;
        self.frag = Self::fragmentizer(&self.opts.limits);
        self.client_id = None;
        self.literal_bytes = 0;
        self.state = State::Commands;
    }

    fn sasl_response(&mut self) -> Option<Event> {
        let decoded = self.frag.decode_message(&AuthenticateDataCodec::default());
        let State::Sasl { tag, mut exchange } = std::mem::replace(&mut self.state, State::Commands)
        else {
            return None;
        };
        let step = match decoded {
            Ok(AuthenticateData::Cancel) => Err(SaslError::Cancelled),
            Ok(AuthenticateData::Continue(data)) => {
                exchange.step(data.declassify(), &self.opts.rules)
            }
            Err(_) => Err(SaslError::InvalidBase64),
        };
        self.sasl_step(tag, exchange, step)
    }

    fn sasl_step(
        &mut self,
        tag: String,
        exchange: Exchange,
        step: Result<Step, SaslError>,
    ) -> Option<Event> {
        match sasl_next(step) {
            SaslNext::Challenge(challenge) => {
                self.push(format!("+ {challenge}\r\n"));
                self.state = State::Sasl { tag, exchange };
                None
            }
            SaslNext::Login(credentials) => {
                let token = exchange.mechanism().is_token();
                Some(self.login_with(tag, credentials, token))
            }
            SaslNext::Cancelled => {
                self.tagged(Some(&tag), "BAD Authentication cancelled");
                None
            }
            SaslNext::AuthzidRefused => {
                self.tagged(
                    Some(&tag),
                    "NO [AUTHORIZATIONFAILED] Authorization identity refused",
                );
                self.protocol_error()
            }
            SaslNext::Invalid => {
                self.tagged(Some(&tag), "BAD Invalid SASL response");
                self.protocol_error()
            }
        }
    }

    fn login(&mut self, tag: String, credentials: Result<Credentials, (Refusal, String)>) -> Event {
        self.login_with(tag, credentials, false)
    }

    /// `token`: the attempt used a bearer-token mechanism, so a refusal goes through the
    /// RFC 7628 error challenge first.
    fn login_with(
        &mut self,
        tag: String,
        credentials: Result<Credentials, (Refusal, String)>,
        token: bool,
    ) -> Event {
        self.attempts += 1;
        self.state = State::Checking { tag, token };
        Event::Login {
            attempt: self.attempts,
            credentials,
        }
    }

    /// The backend login succeeded: answer the client's tag with the backend's post-login
    /// capabilities (already filtered).
    pub fn login_succeeded<S: AsRef<str>>(&mut self, capabilities: &[S]) {
        if let State::Checking { tag, .. } = std::mem::replace(&mut self.state, State::Closed) {
            if capabilities.is_empty() {
                self.tagged(Some(&tag), "OK Logged in");
            } else {
                let mut text = String::from("OK [CAPABILITY");
                for cap in capabilities {
                    text.push(' ');
                    text.push_str(cap.as_ref());
                }
                text.push_str("] Logged in");
                self.tagged(Some(&tag), &text);
            }
        }
    }

    /// The attempt failed; answers the client and tells whether the connection goes on.
    pub fn login_failed(&mut self, failure: Failure) -> Option<Event> {
        let State::Checking { tag, token } = std::mem::replace(&mut self.state, State::Commands)
        else {
            return None;
        };
        match failure {
            Failure::Rejected => {
                if let (true, Some(challenge)) = (token, self.opts.sasl.oauth_error()) {
                    let line = format!("+ {challenge}\r\n");
                    self.push(line);
                    self.state = State::TokenRefused { tag };
                    return None;
                }
                return self.rejected(&tag);
            }
            Failure::Temporary => {
                self.tagged(
                    Some(&tag),
                    "NO [UNAVAILABLE] Authentication service temporarily unavailable",
                );
            }
        }
        None
    }

    /// After a successful login: every byte the client sent after its login command, exactly
    /// as sent, to forward to the backend before splicing. `None` if more than the pre-login
    /// buffer bound was pipelined (the driver then closes).
    /// The tagged failure for wrong credentials, counting towards the disconnect.
    fn rejected(&mut self, tag: &str) -> Option<Event> {
        self.tagged(Some(tag), FAILED);
        self.auth_failures += 1;
        if self.auth_failures >= self.opts.limits.max_auth_failures {
            self.push("* BYE Too many authentication failures\r\n");
            self.state = State::Closed;
            return Some(Event::Close(Close::TooManyFailures));
        }
        None
    }

    pub fn take_leftover(mut self) -> Option<Vec<u8>> {
        let mut rest = Vec::new();
        loop {
            match self.frag.progress() {
                Some(_) => {
                    if self.frag.is_max_message_size_exceeded() {
                        return None;
                    }
                    if self.frag.is_message_complete() {
                        rest.extend_from_slice(self.frag.message_bytes());
                    }
                }
                None => {
                    if self.frag.is_max_message_size_exceeded() {
                        return None;
                    }
                    if !self.frag.is_message_complete() {
                        rest.extend_from_slice(self.frag.message_bytes());
                    }
                    return Some(rest);
                }
            }
        }
    }
}

fn printable(v: &[u8], max: usize) -> String {
    String::from_utf8_lossy(v)
        .chars()
        .filter(|c| !c.is_control())
        .take(max)
        .collect()
}

fn log_name(raw: &[u8]) -> String {
    crate::identity::LogName(raw).to_string()
}

impl PreLogin for PreAuth {
    fn greet(&mut self) {
        PreAuth::greet(self);
    }
    fn advance(&mut self) -> Event {
        PreAuth::advance(self)
    }
    fn feed(&mut self, bytes: &[u8]) {
        PreAuth::feed(self, bytes);
    }
    fn take_output(&mut self) -> Vec<u8> {
        PreAuth::take_output(self)
    }
    fn tls_started(&mut self) {
        PreAuth::tls_started(self);
    }
    fn timed_out(&mut self) {
        PreAuth::timed_out(self);
    }
    fn shutdown(&mut self) -> Event {
        PreAuth::shutdown(self)
    }
    fn login_succeeded(&mut self, capabilities: &[String]) {
        let kept: Vec<&str> = capabilities
            .iter()
            .map(String::as_str)
            .filter(|c| super::keep_post_login_capability(c))
            .collect();
        PreAuth::login_succeeded(self, &kept);
    }
    fn login_failed(&mut self, failure: Failure) -> Option<Event> {
        PreAuth::login_failed(self, failure)
    }
    fn pipelined_goodbye(&self) -> &'static [u8] {
        b"* BYE Too much data pipelined before login\r\n"
    }
    fn take_leftover(self) -> Option<Vec<u8>> {
        PreAuth::take_leftover(self)
    }
    fn client_id(&self) -> Option<&str> {
        PreAuth::client_id(self)
    }
}

#[cfg(test)]
mod tests;
