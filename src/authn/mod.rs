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

use crate::config::{AuthenticatorConfig, AuthenticatorKind};
use crate::identity::IdentityRules;
use crate::sasl::Mechanism;
use crate::secret::Secret;
use crate::Protocol;

pub mod file;
pub mod http;
pub mod json;
pub mod nginx;
pub mod oauth;

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

    /// The kind that decides logins with `mechanism` (tokens and passwords may go to different
    /// ones), for logs.
    fn kind_for(&self, mechanism: Mechanism) -> &'static str {
        let _ = mechanism;
        self.kind()
    }

    /// Re-reads whatever this authenticator loaded from disk (SIGHUP). On error the previous
    /// state stays in force. Kinds with nothing to re-read do nothing.
    ///
    /// # Errors
    /// [`ReloadError`] saying what could not be loaded.
    fn reload(&self) -> Result<(), ReloadError> {
        Ok(())
    }
}

/// Why a reload failed; the previous state stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    File(#[from] file::FileAuthError),
}

/// A configuration problem found while building the authenticator, naming its key
/// (`authenticator.url: …`), like [`crate::config::ConfigError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct BuildError {
    pub key: &'static str,
    pub message: String,
}

fn build_error(key: &'static str, message: impl Into<String>) -> BuildError {
    BuildError {
        key,
        message: message.into(),
    }
}

/// Builds the configured authenticator. Everything is loaded and checked here (users file, URL,
/// static headers, CA file), so `check-config` and start-up report problems before any login.
///
/// # Errors
/// [`BuildError`] naming the `authenticator.*` key at fault.
pub fn build(cfg: &AuthenticatorConfig) -> Result<Arc<dyn Authenticator>, BuildError> {
    let passwords = match cfg.kind {
        AuthenticatorKind::OAuth => None,
        _ => Some(build_passwords(cfg)?),
    };
    match (&cfg.oauth, passwords) {
        (Some(o), passwords) => Ok(Arc::new(oauth::Routed {
            passwords,
            tokens: Arc::new(oauth::OAuth::build(o, cfg.timeout)?),
        })),
        (None, Some(p)) => Ok(p),
        (None, None) => Err(build_error(
            "authenticator.oauth",
            "required for kind = \"oauth\"",
        )),
    }
}

/// The SASL mechanisms to offer: the bearer-token pair only when tokens can be checked.
pub fn sasl_offer(cfg: &AuthenticatorConfig) -> crate::sasl::Offer {
    match &cfg.oauth {
        Some(o) => {
            let discovery = o.discovery_url.clone().or_else(|| {
                o.issuer.as_deref().map(|i| {
                    format!(
                        "{}/.well-known/openid-configuration",
                        i.trim_end_matches('/')
                    )
                })
            });
            crate::sasl::Offer::with_oauth(discovery.as_deref())
        }
        None => crate::sasl::Offer::passwords(),
    }
}

fn build_passwords(cfg: &AuthenticatorConfig) -> Result<Arc<dyn Authenticator>, BuildError> {
    match cfg.kind {
        AuthenticatorKind::OAuth => Err(build_error("authenticator.kind", "not a password kind")),
        AuthenticatorKind::File => {
            let path = cfg.users_file.as_ref().ok_or_else(|| {
                build_error("authenticator.users_file", "required for kind = \"file\"")
            })?;
            let auth = file::FileAuth::load(path)
                .map_err(|e| build_error("authenticator.users_file", e.to_string()))?;
            Ok(Arc::new(auth))
        }
        AuthenticatorKind::Nginx => {
            let (client, headers) = http_parts(cfg, nginx::RESERVED_HEADERS)?;
            Ok(Arc::new(nginx::NginxAuth::new(
                client,
                headers,
                cfg.keepalive,
            )))
        }
        AuthenticatorKind::Json => {
            let (client, headers) = http_parts(cfg, json::RESERVED_HEADERS)?;
            Ok(Arc::new(json::JsonAuth::new(
                client,
                headers,
                cfg.keepalive,
            )))
        }
    }
}

fn http_parts(
    cfg: &AuthenticatorConfig,
    reserved: &[&str],
) -> Result<(http::HttpClient, Vec<(String, String)>), BuildError> {
    let url = cfg
        .url
        .as_deref()
        .ok_or_else(|| build_error("authenticator.url", "required for this kind"))?;
    let endpoint =
        http::Endpoint::parse(url).map_err(|e| build_error("authenticator.url", e.to_string()))?;
    if cfg.tls_ca_file.is_some() && !endpoint.tls {
        return Err(build_error(
            "authenticator.tls_ca_file",
            "only used with an https:// url",
        ));
    }
    let headers = http::validate_static_headers(&cfg.headers, reserved)
        .map_err(|m| build_error("authenticator.headers", m))?;
    let client = http::HttpClient::new(
        endpoint,
        http::ClientOptions {
            timeout: cfg.timeout,
            keepalive: cfg.keepalive,
            ca_file: cfg.tls_ca_file.clone(),
            ..http::ClientOptions::default()
        },
    )
    .map_err(|e| {
        let key = if cfg.tls_ca_file.is_some() {
            "authenticator.tls_ca_file"
        } else {
            "authenticator.url"
        };
        build_error(key, e.to_string())
    })?;
    Ok((client, headers))
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

    /// See [`Authenticator::kind_for`].
    pub fn kind_for(&self, mechanism: Mechanism) -> &'static str {
        self.inner.kind_for(mechanism)
    }

    /// Reloads the inner authenticator (SIGHUP); see [`Authenticator::reload`].
    ///
    /// # Errors
    /// [`ReloadError`]; the previous state stays in force.
    pub fn reload(&self) -> Result<(), ReloadError> {
        self.inner.reload()
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
#[allow(clippy::unwrap_used, clippy::expect_used)]
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

    fn config(kind: &str, extra: &str) -> AuthenticatorConfig {
        let text = format!("kind = \"{kind}\"\n{extra}");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn build_names_the_key_at_fault() {
        let err = |cfg: AuthenticatorConfig| build(&cfg).err().unwrap().to_string();
        assert!(err(config("file", "")).starts_with("authenticator.users_file:"));
        assert!(err(config("file", "users_file = \"/nonexistent.toml\""))
            .starts_with("authenticator.users_file: cannot read /nonexistent.toml"));
        assert!(err(config("nginx", "")).starts_with("authenticator.url:"));
        assert!(err(config("json", "url = \"ftp://x\"")).starts_with("authenticator.url:"));
        let e = err(config(
            "nginx",
            "url = \"http://127.0.0.1:9/\"\n[headers]\n\"Auth-Pass\" = \"x\"",
        ));
        assert!(e.starts_with("authenticator.headers:"), "{e}");
        let e = err(config(
            "json",
            "url = \"http://127.0.0.1:9/\"\ntls_ca_file = \"/x.pem\"",
        ));
        assert!(e.starts_with("authenticator.tls_ca_file:"), "{e}");
        let e = err(config(
            "json",
            "url = \"https://127.0.0.1:9/\"\ntls_ca_file = \"/nonexistent.pem\"",
        ));
        assert!(e.starts_with("authenticator.tls_ca_file:"), "{e}");
    }

    #[test]
    fn build_makes_each_kind() {
        let users = concat!(env!("CARGO_MANIFEST_DIR"), "/config/users.toml");
        let file = build(&config("file", &format!("users_file = \"{users}\""))).unwrap();
        assert_eq!(file.kind(), "file");
        assert!(file.reload().is_ok());
        let nginx = build(&config(
            "nginx",
            "url = \"https://auth.example.org/nginx\"\n[headers]\nX-Auth-Key = \"k\"",
        ))
        .unwrap();
        assert_eq!(nginx.kind(), "nginx");
        assert!(nginx.reload().is_ok());
        let json = build(&config("json", "url = \"http://[::1]:9100/v1/auth\"")).unwrap();
        assert_eq!(json.kind(), "json");
    }
}
