//! SASL as the client side of every protocol speaks it, decoded into [`Credentials`].
//!
//! Pure and shared: IMAP, POP3, SMTP and ManageSieve feed the same exchange with the bytes
//! their framing delivered (already base64-decoded where the protocol does that). Unlike a
//! migration router, a chokepoint refuses every ambiguity: an authorization identity that differs
//! from the authentication identity, extra NUL fields, empty fields, malformed base64.
//!
//! The bearer-token mechanisms (XOAUTH2, OAUTHBEARER; [`oauth`]) produce the same
//! [`Credentials`] with the token as the secret; the protocol drivers only ever see [`Step`].

use base64::Engine as _;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::identity::{IdentityError, IdentityRules};
use crate::secret::Secret;

pub mod oauth;
mod plain;

pub use plain::parse_plain;

/// Largest decoded SASL payload accepted (SECURITY.md: SASL buffer 8 KiB).
pub const MAX_SASL_LEN: usize = 8 * 1024;

/// The mechanisms offered to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// RFC 4616 PLAIN.
    Plain,
    /// The LOGIN mechanism (two prompts), also used for IMAP's LOGIN command and POP3 USER/PASS.
    Login,
    /// Google's XOAUTH2: an identity and a bearer token.
    XOAuth2,
    /// RFC 7628 OAUTHBEARER: an identity and a bearer token.
    OAuthBearer,
    /// HTTP `Authorization: Bearer`: a token without a claimed identity. Never offered in SASL.
    Bearer,
}

impl Mechanism {
    /// Looks a mechanism name up case-insensitively.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Some(Self::Plain)
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Some(Self::Login)
        } else if name.eq_ignore_ascii_case(b"XOAUTH2") {
            Some(Self::XOAuth2)
        } else if name.eq_ignore_ascii_case(b"OAUTHBEARER") {
            Some(Self::OAuthBearer)
        } else {
            None
        }
    }

    /// The IANA name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::Login => "LOGIN",
            Self::XOAuth2 => "XOAUTH2",
            Self::OAuthBearer => "OAUTHBEARER",
            Self::Bearer => "BEARER",
        }
    }

    /// Lower-case label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Login => "login",
            Self::XOAuth2 => "xoauth2",
            Self::OAuthBearer => "oauthbearer",
            Self::Bearer => "bearer",
        }
    }

    /// Whether the secret is a bearer token rather than a password.
    pub fn is_token(self) -> bool {
        matches!(self, Self::XOAuth2 | Self::OAuthBearer | Self::Bearer)
    }
}

/// Which mechanisms a listener offers. PLAIN and LOGIN always; the bearer-token pair only when a
/// token validator is configured, carrying the RFC 7628 error a refused token is told.
#[derive(Debug, Clone, Default)]
pub struct Offer {
    oauth_error: Option<std::sync::Arc<str>>,
}

impl Offer {
    /// PLAIN and LOGIN only.
    pub fn passwords() -> Self {
        Self::default()
    }

    /// PLAIN, LOGIN, XOAUTH2 and OAUTHBEARER; `discovery` goes into the error challenge.
    pub fn with_oauth(discovery: Option<&str>) -> Self {
        let raw = oauth::error_challenge(discovery);
        Self {
            oauth_error: Some(encode_challenge(&raw).into()),
        }
    }

    /// Whether a client may use `m` here.
    pub fn allows(&self, m: Mechanism) -> bool {
        match m {
            Mechanism::Plain | Mechanism::Login => true,
            Mechanism::XOAuth2 | Mechanism::OAuthBearer => self.oauth_error.is_some(),
            Mechanism::Bearer => false,
        }
    }

    /// The offered names, in preference order.
    pub fn names(&self) -> &'static [&'static str] {
        if self.oauth_error.is_some() {
            &["PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"]
        } else {
            &["PLAIN", "LOGIN"]
        }
    }

    /// Whether bearer tokens can be checked here (an `[authenticator.oauth]` is configured).
    pub fn takes_tokens(&self) -> bool {
        self.oauth_error.is_some()
    }

    /// The base64 error challenge for a refused token (RFC 7628 §3.2.2), if tokens are offered.
    pub fn oauth_error(&self) -> Option<&str> {
        self.oauth_error.as_deref()
    }
}

/// What a client proved itself with, after the username rules were applied.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The username as the client gave it (validated, not yet canonical).
    pub username: String,
    /// The password.
    pub secret: Secret,
    /// How it was presented.
    pub mechanism: Mechanism,
}

/// Why an exchange failed. Every variant is a protocol error on the client's side.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SaslError {
    #[error("client cancelled the exchange")]
    Cancelled,
    #[error("invalid base64")]
    InvalidBase64,
    #[error("payload larger than {MAX_SASL_LEN} bytes")]
    TooLong,
    #[error("malformed {0} payload")]
    Malformed(&'static str),
    #[error("authorization identity differs from authentication identity")]
    AuthzidMismatch,
    #[error("empty password")]
    EmptyPassword,
    #[error("no initial response allowed here")]
    UnexpectedData,
    #[error("username refused: {0}")]
    Identity(#[from] IdentityError),
}

/// What the protocol should do next.
#[derive(Debug)]
pub enum Step {
    /// Send this challenge (raw bytes; the protocol base64-encodes it) and wait for a response.
    Challenge(&'static [u8]),
    /// The exchange produced credentials.
    Done(Credentials),
}

/// A client response line, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// `*`: the client gives up.
    Cancel,
    /// The decoded payload (wiped on drop).
    Data(Zeroizing<Vec<u8>>),
}

/// Decodes one base64 response line (no CRLF). `=` is the empty initial response of RFC 4959 /
/// RFC 4954, `*` a cancel. Strict: no whitespace, canonical padding.
///
/// # Errors
/// [`SaslError::InvalidBase64`] or [`SaslError::TooLong`].
pub fn decode_response(line: &[u8]) -> Result<Response, SaslError> {
    if line == b"*" {
        return Ok(Response::Cancel);
    }
    if line == b"=" {
        return Ok(Response::Data(Zeroizing::new(Vec::new())));
    }
    if line.len() > MAX_SASL_LEN.div_ceil(3) * 4 {
        return Err(SaslError::TooLong);
    }
    let mut out = Zeroizing::new(Vec::with_capacity(line.len() / 4 * 3));
    base64::engine::general_purpose::STANDARD
        .decode_vec(line, &mut out)
        .map_err(|_| SaslError::InvalidBase64)?;
    Ok(Response::Data(out))
}

/// The base64 PLAIN payload of a master login, for every protocol's backend leg:
/// `\0<account><separator><master>\0<secret>`. The authorization identity stays empty because
/// Stalwart ignores it and would log in as the master itself.
pub fn master_plain(
    account: &str,
    master: &str,
    separator: &str,
    secret: &Secret,
) -> Zeroizing<String> {
    let mut raw = Zeroizing::new(Vec::with_capacity(
        account.len() + separator.len() + master.len() + secret.len() + 2,
    ));
    raw.push(0);
    raw.extend_from_slice(account.as_bytes());
    raw.extend_from_slice(separator.as_bytes());
    raw.extend_from_slice(master.as_bytes());
    raw.push(0);
    raw.extend_from_slice(secret.expose());
    Zeroizing::new(encode_challenge(&raw))
}

/// Encodes a challenge for protocols that send base64 lines.
pub fn encode_challenge(raw: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(raw)
}

#[derive(Debug)]
enum State {
    Start,
    /// LOGIN: waiting for the username.
    LoginUser,
    /// LOGIN: have the username, waiting for the password.
    LoginPass(String),
    Finished,
}

/// One SASL exchange on the server side.
#[derive(Debug)]
pub struct Exchange {
    mechanism: Mechanism,
    state: State,
}

impl Exchange {
    pub fn new(mechanism: Mechanism) -> Self {
        Self {
            mechanism,
            state: State::Start,
        }
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// Starts the exchange with the client's initial response, if it sent one.
    ///
    /// # Errors
    /// A [`SaslError`] if the initial response is unacceptable; the exchange is then over.
    pub fn begin(
        &mut self,
        initial: Option<&[u8]>,
        rules: &IdentityRules,
    ) -> Result<Step, SaslError> {
        match (self.mechanism, initial) {
            (Mechanism::Plain | Mechanism::XOAuth2 | Mechanism::OAuthBearer, None) => {
                self.state = State::Start;
                Ok(Step::Challenge(b""))
            }
            (Mechanism::Plain | Mechanism::XOAuth2 | Mechanism::OAuthBearer, Some(data)) => {
                self.finish_single(data, rules)
            }
            (Mechanism::Bearer, _) => {
                self.state = State::Finished;
                Err(SaslError::UnexpectedData)
            }
            (Mechanism::Login, None) => {
                self.state = State::LoginUser;
                Ok(Step::Challenge(b"Username:"))
            }
            (Mechanism::Login, Some(user)) => {
                self.state = State::LoginUser;
                self.step(user, rules)
            }
        }
    }

    /// Feeds the client's next (decoded) response.
    ///
    /// # Errors
    /// A [`SaslError`]; the exchange is then over.
    pub fn step(&mut self, data: &[u8], rules: &IdentityRules) -> Result<Step, SaslError> {
        if data.len() > MAX_SASL_LEN {
            self.state = State::Finished;
            return Err(SaslError::TooLong);
        }
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Start
                if matches!(
                    self.mechanism,
                    Mechanism::Plain | Mechanism::XOAuth2 | Mechanism::OAuthBearer
                ) =>
            {
                self.finish_single(data, rules)
            }
            State::LoginUser => {
                let user = rules.validate(data)?.to_owned();
                self.state = State::LoginPass(user);
                Ok(Step::Challenge(b"Password:"))
            }
            State::LoginPass(username) => {
                if data.is_empty() {
                    return Err(SaslError::EmptyPassword);
                }
                Ok(Step::Done(Credentials {
                    username,
                    secret: Secret::new(data.to_vec()),
                    mechanism: Mechanism::Login,
                }))
            }
            State::Start | State::Finished => Err(SaslError::UnexpectedData),
        }
    }

    /// The single-message mechanisms: PLAIN and the two bearer-token ones.
    fn finish_single(&mut self, data: &[u8], rules: &IdentityRules) -> Result<Step, SaslError> {
        self.state = State::Finished;
        if data.len() > MAX_SASL_LEN {
            return Err(SaslError::TooLong);
        }
        let (username, secret) = match self.mechanism {
            Mechanism::XOAuth2 => oauth::parse_xoauth2(data, rules)?,
            Mechanism::OAuthBearer => oauth::parse_oauthbearer(data, rules)?,
            _ => parse_plain(data, rules)?,
        };
        Ok(Step::Done(Credentials {
            username,
            secret,
            mechanism: self.mechanism,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> IdentityRules {
        IdentityRules::default()
    }

    fn done(step: Result<Step, SaslError>) -> Credentials {
        match step {
            Ok(Step::Done(c)) => c,
            other => panic!("expected credentials, got {other:?}"),
        }
    }

    #[test]
    fn plain_with_initial_response() {
        let c = done(Exchange::new(Mechanism::Plain).begin(Some(b"\0alice\0pw"), &rules()));
        assert_eq!(c.username, "alice");
        assert!(c.secret.ct_eq(b"pw"));
    }

    #[test]
    fn plain_with_continuation() {
        let mut ex = Exchange::new(Mechanism::Plain);
        assert!(matches!(ex.begin(None, &rules()), Ok(Step::Challenge(b""))));
        let c = done(ex.step(b"alice\0alice\0pw", &rules()));
        assert_eq!(c.username, "alice");
        assert_eq!(
            ex.step(b"x", &rules()).unwrap_err(),
            SaslError::UnexpectedData
        );
    }

    #[test]
    fn login_two_prompts() {
        let mut ex = Exchange::new(Mechanism::Login);
        assert!(matches!(
            ex.begin(None, &rules()),
            Ok(Step::Challenge(b"Username:"))
        ));
        assert!(matches!(
            ex.step(b"bob", &rules()),
            Ok(Step::Challenge(b"Password:"))
        ));
        let c = done(ex.step(b"secret", &rules()));
        assert_eq!(c.username, "bob");
        assert_eq!(c.mechanism, Mechanism::Login);
    }

    #[test]
    fn login_initial_response_is_the_username() {
        let mut ex = Exchange::new(Mechanism::Login);
        assert!(matches!(
            ex.begin(Some(b"bob"), &rules()),
            Ok(Step::Challenge(b"Password:"))
        ));
        assert_eq!(
            ex.step(b"", &rules()).unwrap_err(),
            SaslError::EmptyPassword
        );
    }

    #[test]
    fn login_refuses_master_separator() {
        let mut ex = Exchange::new(Mechanism::Login);
        ex.begin(None, &rules()).unwrap();
        assert_eq!(
            ex.step(b"bob%master", &rules()).unwrap_err(),
            SaslError::Identity(IdentityError::Separator)
        );
    }

    #[test]
    fn base64_lines() {
        assert_eq!(decode_response(b"*").unwrap(), Response::Cancel);
        assert_eq!(
            decode_response(b"=").unwrap(),
            Response::Data(Zeroizing::new(vec![]))
        );
        assert_eq!(
            decode_response(b"AGFsaWNlAHB3").unwrap(),
            Response::Data(Zeroizing::new(b"\0alice\0pw".to_vec()))
        );
        for bad in [
            &b"AGFsa WNl"[..],
            b"AGFsaWNlAHB",
            b"!!!!",
            b"AGFsaWNlAHB3\r",
        ] {
            assert_eq!(
                decode_response(bad).unwrap_err(),
                SaslError::InvalidBase64,
                "{bad:?}"
            );
        }
        assert_eq!(
            decode_response(&vec![b'A'; 20000]).unwrap_err(),
            SaslError::TooLong
        );
    }
}
