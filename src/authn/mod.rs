//! The central authenticator: the single source of truth for who may log in.
//!
//! Every protocol turns what the client proved into an [`AuthRequest`]; exactly one configured
//! [`Authenticator`] answers with a [`Verdict`]. [`Checked`] wraps whichever kind is configured
//! with the rules every kind shares: a deadline, bounded concurrency, validation of the canonical
//! account it returns, and failing closed (a broken authenticator is a temporary failure, never
//! "wrong password").

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::identity::IdentityRules;
use crate::sasl::Mechanism;
use crate::secret::Secret;
use crate::Protocol;

pub mod file;
pub mod http;
pub mod json;
pub mod nginx;

/// Facts about the client's TLS session, passed to authenticators that want them.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`.
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// The server name the client asked for.
    pub sni: Option<String>,
}

/// One question to the authenticator.
#[derive(Debug, Clone)]
pub struct AuthRequest {
    pub protocol: Protocol,
    pub mechanism: Mechanism,
    /// The username as the client typed it (already validated by [`IdentityRules`]).
    pub username: String,
    /// The password or token.
    pub secret: Secret,
    pub client: SocketAddr,
    pub local: SocketAddr,
    /// `None` on a cleartext connection.
    pub tls: Option<TlsInfo>,
    /// 1-based number of this attempt on the connection.
    pub attempt: u32,
    pub session_id: String,
    /// What the client says it is (IMAP ID name/version, HTTP User-Agent), bounded.
    pub client_id: Option<String>,
}

/// The authenticator's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Log in as `account` (canonical; what the backend login uses).
    Accept { account: String },
    /// Wrong credentials. `reason` is for the audit log, never for the client.
    Reject {
        reason: String,
        wait: Option<Duration>,
    },
    /// The authenticator could not decide (down, slow, garbage). Never counted as a wrong password.
    TempFail { reason: String },
}

impl Verdict {
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::Reject {
            reason: reason.into(),
            wait: None,
        }
    }

    pub fn temp(reason: impl Into<String>) -> Self {
        Self::TempFail {
            reason: reason.into(),
        }
    }

    /// Short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Accept { .. } => "accept",
            Self::Reject { .. } => "reject",
            Self::TempFail { .. } => "tempfail",
        }
    }
}

/// A boxed future, so that authenticators can live behind `dyn`.
pub type VerdictFuture<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;

/// A source of truth for credentials.
pub trait Authenticator: Send + Sync {
    /// Decides one request. Must not panic; anything unexpected is [`Verdict::TempFail`].
    fn verify<'a>(&'a self, req: &'a AuthRequest) -> VerdictFuture<'a>;

    /// The configured kind, for logs.
    fn kind(&self) -> &'static str;
}

/// The shared rules around whichever authenticator is configured.
pub struct Checked {
    inner: Arc<dyn Authenticator>,
    deadline: Duration,
    permits: Arc<Semaphore>,
    rules: IdentityRules,
}

impl Checked {
    pub fn new(
        inner: Arc<dyn Authenticator>,
        deadline: Duration,
        max_concurrency: usize,
        rules: IdentityRules,
    ) -> Self {
        Self {
            inner,
            deadline,
            permits: Arc::new(Semaphore::new(max_concurrency.max(1))),
            rules,
        }
    }

    pub fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// Asks the authenticator, within the deadline (which also covers waiting for a permit).
    pub async fn verify(&self, req: &AuthRequest) -> Verdict {
        let work = async {
            let Ok(_permit) = self.permits.acquire().await else {
                return Verdict::temp("authenticator closed");
            };
            self.inner.verify(req).await
        };
        match tokio::time::timeout(self.deadline, work).await {
            Err(_) => Verdict::temp("authenticator deadline exceeded"),
            Ok(Verdict::Accept { account }) => match self.rules.validate(account.as_bytes()) {
                Ok(_) => Verdict::Accept { account },
                Err(e) => {
                    tracing::error!(
                        kind = self.inner.kind(),
                        error = %e,
                        "authenticator returned an unusable canonical account; refusing as a temporary failure"
                    );
                    Verdict::temp(format!("canonical account refused: {e}"))
                }
            },
            Ok(other) => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Verdict, Duration);

    impl Authenticator for Fixed {
        fn verify<'a>(&'a self, _req: &'a AuthRequest) -> VerdictFuture<'a> {
            Box::pin(async move {
                tokio::time::sleep(self.1).await;
                self.0.clone()
            })
        }
        fn kind(&self) -> &'static str {
            "fixed"
        }
    }

    pub(crate) fn request() -> AuthRequest {
        AuthRequest {
            protocol: Protocol::Imap,
            mechanism: Mechanism::Plain,
            username: "alice".into(),
            secret: Secret::from("pw"),
            client: "127.0.0.1:5000".parse().unwrap(),
            local: "127.0.0.1:993".parse().unwrap(),
            tls: None,
            attempt: 1,
            session_id: "s1".into(),
            client_id: None,
        }
    }

    fn checked(v: Verdict, delay: Duration) -> Checked {
        Checked::new(
            Arc::new(Fixed(v, delay)),
            Duration::from_millis(200),
            4,
            IdentityRules::default(),
        )
    }

    #[tokio::test]
    async fn slow_authenticator_is_a_temporary_failure() {
        let c = checked(
            Verdict::Accept {
                account: "a".into(),
            },
            Duration::from_secs(5),
        );
        assert!(matches!(
            c.verify(&request()).await,
            Verdict::TempFail { .. }
        ));
    }

    #[tokio::test]
    async fn canonical_account_with_separator_is_a_temporary_failure() {
        let c = checked(
            Verdict::Accept {
                account: "bob%master".into(),
            },
            Duration::ZERO,
        );
        assert!(matches!(
            c.verify(&request()).await,
            Verdict::TempFail { .. }
        ));
    }

    #[tokio::test]
    async fn accept_and_reject_pass_through() {
        let c = checked(
            Verdict::Accept {
                account: "alice@example.org".into(),
            },
            Duration::ZERO,
        );
        assert_eq!(
            c.verify(&request()).await,
            Verdict::Accept {
                account: "alice@example.org".into()
            }
        );
        let c = checked(Verdict::reject("bad"), Duration::ZERO);
        assert!(matches!(c.verify(&request()).await, Verdict::Reject { .. }));
    }
}

/// Builds the configured authenticator. (temporary stand-in until the kinds land)
///
/// # Errors
/// Always, for now.
pub fn build(_cfg: &crate::config::AuthenticatorConfig) -> Result<Arc<dyn Authenticator>, String> {
    Err("not yet".into())
}
