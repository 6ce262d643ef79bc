//! What every protocol's pre-login machine shares: the events a driver acts on and the trait
//! the one session runner drives. Each protocol decides its own bytes; the phase order
//! (read, STARTTLS, authenticate, backend login, splice) is written once, in `session`.

use crate::sasl::Credentials;

/// Why a login attempt was refused before anyone was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The username broke the identity rules (e.g. contained the master separator).
    Identity(crate::identity::IdentityError),
    /// An empty password.
    EmptyPassword,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Event {
    /// Flush output, then read from the client and call [`PreAuth::feed`].
    NeedInput,
    /// Flush output, upgrade the connection to TLS, then call [`PreAuth::tls_started`].
    StartTls,
    /// Check these credentials (or apply the failure path for a refusal), then call
    /// [`PreAuth::login_succeeded`] or [`PreAuth::login_failed`]. Nothing else is read meanwhile.
    Login {
        attempt: u32,
        credentials: Result<Credentials, (Refusal, String)>,
    },
    /// Flush output, then close the connection.
    Close(Close),
}

/// Why the machine ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    Logout,
    TooManyErrors,
    TooManyFailures,
    PipelinedStartTls,
    HttpOnMailPort,
    LiteralTooLarge,
    Shutdown,
}

/// How a login attempt ended, from the client's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Wrong credentials, unknown user, banned, refused name: all look the same.
    Rejected,
    /// The authenticator or backend could not decide: `NO [UNAVAILABLE]`, not counted.
    Temporary,
}

/// A protocol's pre-login state machine, as the session runner drives it.
pub trait PreLogin: Send {
    /// Queues the greeting. Call once, first.
    fn greet(&mut self);
    /// Runs until the driver has something to do; then write [`PreLogin::take_output`].
    fn advance(&mut self) -> Event;
    /// Adds client bytes. Only after [`Event::NeedInput`].
    fn feed(&mut self, bytes: &[u8]);
    fn take_output(&mut self) -> Vec<u8>;
    /// STARTTLS finished: forget everything learnt in the clear.
    fn tls_started(&mut self);
    /// Queues the goodbye for a pre-login timeout.
    fn timed_out(&mut self);
    /// Queues the goodbye for a server shutdown.
    fn shutdown(&mut self) -> Event;
    /// Queues the success reply. `capabilities` are the backend's, unfiltered: a protocol that
    /// relays them removes what only the proxy decides.
    fn login_succeeded(&mut self, capabilities: &[String]);
    /// Queues the failure reply; `Some(Close)` when the connection must end.
    fn login_failed(&mut self, failure: Failure) -> Option<Event>;
    /// The goodbye written when [`PreLogin::take_leftover`] gives `None`.
    fn pipelined_goodbye(&self) -> &'static [u8];
    /// Bytes pipelined after the login command, to forward; `None` if over the bound.
    fn take_leftover(self) -> Option<Vec<u8>>
    where
        Self: Sized;
    /// What the client said it is, if anything.
    fn client_id(&self) -> Option<&str>;
}

/// A protocol's backend master-login machine, as the backend connector drives it.
pub trait BackendMachine: Send {
    fn advance(&mut self) -> crate::proto::imap::BackendEvent;
    fn feed(&mut self, bytes: &[u8]);
    fn take_output(&mut self) -> Vec<u8>;
    fn tls_started(&mut self);
    /// Backend bytes read past the login reply.
    fn take_leftover(self) -> Vec<u8>
    where
        Self: Sized;
}

/// One login attempt as a scripted run saw it.
pub type Attempt = Result<Credentials, Refusal>;

/// What [`script`] saw.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Everything the machine wrote, greeting excluded if it was taken before.
    pub output: Vec<u8>,
    pub attempts: Vec<Attempt>,
    /// How the machine ended the connection; `None` when the input ran out or at STARTTLS.
    pub close: Option<Close>,
    /// The run stopped because the machine asked for STARTTLS.
    pub starttls: bool,
}

impl Transcript {
    /// The output as text, for assertions.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// The username of each attempt, or why it was refused.
    pub fn usernames(&self) -> Vec<Result<String, Refusal>> {
        self.attempts
            .iter()
            .map(|a| a.as_ref().map(|c| c.username.clone()).map_err(Clone::clone))
            .collect()
    }
}

/// Drives `m` through `chunks` (one read each), answering every login with `answer`: how unit
/// tests, property tests and fuzz targets exercise a machine without sockets.
pub fn script<M: PreLogin>(m: &mut M, chunks: &[&[u8]], answer: Failure) -> Transcript {
    let mut t = Transcript::default();
    let mut it = chunks.iter();
    loop {
        let ev = m.advance();
        t.output.extend(m.take_output());
        match ev {
            Event::NeedInput => match it.next() {
                Some(c) => m.feed(c),
                None => return t,
            },
            Event::StartTls => {
                t.starttls = true;
                return t;
            }
            Event::Close(c) => {
                t.close = Some(c);
                return t;
            }
            Event::Login { credentials, .. } => {
                t.attempts.push(credentials.map_err(|(r, _)| r));
                if let Some(Event::Close(c)) = m.login_failed(answer) {
                    t.output.extend(m.take_output());
                    t.close = Some(c);
                    return t;
                }
            }
        }
    }
}

/// What a protocol does after one SASL step, the same for every protocol; only the reply
/// texts differ.
#[derive(Debug)]
pub enum SaslNext {
    /// Send this base64 challenge and keep the exchange.
    Challenge(String),
    /// Ask the driver: credentials, or a refusal that is answered like a wrong password (so a
    /// refused name cannot be told from a wrong password).
    Login(Result<Credentials, (Refusal, String)>),
    /// The client cancelled: answer, no error counted.
    Cancelled,
    /// The authorization identity differs: a protocol error.
    AuthzidRefused,
    /// Malformed base64 or payload: a protocol error.
    Invalid,
}

/// Sorts one step of [`crate::sasl::Exchange`] into what the protocol must do.
pub fn sasl_next(step: Result<crate::sasl::Step, crate::sasl::SaslError>) -> SaslNext {
    use crate::sasl::{SaslError, Step};
    match step {
        Ok(Step::Challenge(c)) => SaslNext::Challenge(crate::sasl::encode_challenge(c)),
        Ok(Step::Done(c)) => SaslNext::Login(Ok(c)),
        Err(SaslError::Identity(e)) => {
            SaslNext::Login(Err((Refusal::Identity(e), "(sasl)".into())))
        }
        Err(SaslError::EmptyPassword) => {
            SaslNext::Login(Err((Refusal::EmptyPassword, "(sasl)".into())))
        }
        Err(SaslError::Cancelled) => SaslNext::Cancelled,
        Err(SaslError::AuthzidMismatch) => SaslNext::AuthzidRefused,
        Err(_) => SaslNext::Invalid,
    }
}
