//! Bearer tokens (XOAUTH2, OAUTHBEARER, HTTP `Bearer`): the `oauth` authenticator.
//!
//! A token is asked about in one of three ways (`authenticator.oauth.method`): Stalwart's
//! userinfo endpoint (its access tokens are opaque), RFC 7662 introspection, or a JWT verified
//! against the issuer's JWKS. What the provider says about the owner is read by [`claims`]; the
//! SASL identity the client named must be one of the owner's names, so a token cannot be
//! replayed under another account. A valid token is remembered (keyed by an HMAC of the token,
//! never the token) until shortly before it expires and at most `cache_ttl`; refusals are not
//! remembered, the guard counts them instead.
//!
//! [`Routed`] puts this next to the password authenticator: tokens go here, passwords there.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use zeroize::Zeroizing;

use super::http::{ClientOptions, Endpoint, HttpClient};
use super::{
    build_error, AuthRequest, Authenticator, BuildError, ReloadError, Verdict, VerdictFuture,
};
use crate::config::{OAuthConfig, OAuthMethod};
use crate::sasl::Mechanism;

pub mod claims;
pub mod jwt;

use claims::{ClaimRules, TokenFacts};

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// The token is not valid (unknown, expired, revoked, wrong audience): a failed login.
    Invalid(String),
    /// The provider could not be asked or answered nonsense: a temporary failure.
    Unavailable(String),
}

/// How this instance asks about a token.
enum Method {
    Userinfo(HttpClient),
    Introspection {
        client: HttpClient,
        /// `Basic base64(client_id:client_secret)`, form-encoded first (RFC 6749 §2.3.1).
        authorization: Zeroizing<String>,
    },
    Jwt(Box<jwt::JwtVerifier>),
}

/// The `oauth` authenticator.
pub struct OAuth {
    method: Method,
    rules: ClaimRules,
    cache: moka::sync::Cache<[u8; 32], Arc<(TokenFacts, Instant)>>,
    cache_key: [u8; 32],
    cache_ttl: Duration,
    expiry_margin: Duration,
    discovery: Option<String>,
}

impl OAuth {
    /// Builds the validator from `[authenticator.oauth]`.
    ///
    /// # Errors
    /// [`BuildError`] naming the `authenticator.oauth.*` key at fault.
    pub fn build(cfg: &OAuthConfig, timeout: Duration) -> Result<Self, BuildError> {
        let options = ClientOptions {
            timeout,
            ca_file: cfg.tls_ca_file.clone(),
            ..ClientOptions::default()
        };
        let client_for = |key: &'static str, url: &str| -> Result<HttpClient, BuildError> {
            let endpoint = Endpoint::parse(url).map_err(|e| build_error(key, e.to_string()))?;
            HttpClient::new(endpoint, options.clone()).map_err(|e| build_error(key, e.to_string()))
        };
        let issuer = cfg.issuer.as_deref().map(|i| i.trim_end_matches('/'));
        let discovery = cfg
            .discovery_url
            .clone()
            .or_else(|| issuer.map(|i| format!("{i}/.well-known/openid-configuration")));
        let method = match cfg.method {
            OAuthMethod::Userinfo => {
                let url = cfg.url.as_deref().ok_or_else(|| {
                    build_error(
                        "authenticator.oauth.url",
                        "required for method = \"userinfo\"",
                    )
                })?;
                Method::Userinfo(client_for("authenticator.oauth.url", url)?)
            }
            OAuthMethod::Introspection => {
                let url = cfg.url.as_deref().ok_or_else(|| {
                    build_error(
                        "authenticator.oauth.url",
                        "required for method = \"introspection\"",
                    )
                })?;
                let client = client_for("authenticator.oauth.url", url)?;
                let id = cfg.client_id.as_deref().ok_or_else(|| {
                    build_error(
                        "authenticator.oauth.client_id",
                        "required for method = \"introspection\"",
                    )
                })?;
                let secret = read_client_secret(cfg)?;
                let pair = Zeroizing::new(format!(
                    "{}:{}",
                    form_encode(id.as_bytes()),
                    form_encode(secret.as_bytes())
                ));
                let authorization = Zeroizing::new(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
                ));
                Method::Introspection {
                    client,
                    authorization,
                }
            }
            OAuthMethod::Jwt => {
                let issuer = issuer.ok_or_else(|| {
                    build_error(
                        "authenticator.oauth.issuer",
                        "required for method = \"jwt\"",
                    )
                })?;
                if cfg.audience.is_empty() {
                    return Err(build_error(
                        "authenticator.oauth.audience",
                        "required for method = \"jwt\" (an ID token or another service's token must not pass)",
                    ));
                }
                let algorithms = jwt::parse_algorithms(&cfg.algorithms)
                    .map_err(|m| build_error("authenticator.oauth.algorithms", m))?;
                let jwks =
                    match &cfg.jwks_url {
                        Some(u) => Some(Endpoint::parse(u).map_err(|e| {
                            build_error("authenticator.oauth.jwks_url", e.to_string())
                        })?),
                        None => None,
                    };
                let discovery_url = discovery.as_deref().unwrap_or_default();
                let discovery_endpoint = Endpoint::parse(discovery_url)
                    .map_err(|e| build_error("authenticator.oauth.discovery_url", e.to_string()))?;
                let verifier = jwt::JwtVerifier::new(
                    issuer.to_owned(),
                    cfg.audience.clone(),
                    algorithms,
                    cfg.leeway,
                    jwks,
                    discovery_endpoint,
                    options.clone(),
                )
                .map_err(|m| build_error("authenticator.oauth.jwks_url", m))?;
                Method::Jwt(Box::new(verifier))
            }
        };
        if let Some(d) = &discovery {
            Endpoint::parse(d)
                .map_err(|e| build_error("authenticator.oauth.discovery_url", e.to_string()))?;
        }
        let account_claim = cfg.account_claim.clone().unwrap_or_else(|| {
            match cfg.method {
                OAuthMethod::Introspection => "username",
                _ => "preferred_username",
            }
            .to_owned()
        });
        if cfg.cache_size == 0 && !cfg.cache_ttl.is_zero() {
            return Err(build_error(
                "authenticator.oauth.cache_size",
                "must be greater than zero (or set cache_ttl = \"0s\")",
            ));
        }
        let mut cache_key = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut cache_key[..]);
        Ok(Self {
            method,
            rules: ClaimRules {
                account_claim,
                identity_claims: cfg.identity_claims.clone(),
                audience: match cfg.method {
                    OAuthMethod::Introspection => cfg.audience.clone(),
                    _ => Vec::new(),
                },
                issuer: match cfg.method {
                    OAuthMethod::Introspection => issuer.map(str::to_owned),
                    _ => None,
                },
            },
            cache: moka::sync::Cache::builder()
                .max_capacity(cfg.cache_size.max(1))
                .time_to_live(cfg.cache_ttl.max(Duration::from_secs(1)))
                .build(),
            cache_key,
            cache_ttl: cfg.cache_ttl,
            expiry_margin: cfg.expiry_margin,
            discovery,
        })
    }

    /// The OpenID discovery URL clients are pointed at in the SASL error challenge.
    pub fn discovery_url(&self) -> Option<&str> {
        self.discovery.as_deref()
    }

    /// Who owns `token`, from the cache or the provider.
    ///
    /// # Errors
    /// [`TokenError`].
    pub async fn validate(&self, token: &[u8]) -> Result<TokenFacts, TokenError> {
        if token.is_empty()
            || token.len() > crate::sasl::MAX_SASL_LEN
            || !crate::sasl::oauth::is_b64token(token)
        {
            return Err(TokenError::Invalid("malformed token".into()));
        }
        let key = self.key(token);
        if let Some(hit) = self.cache.get(&key) {
            if Instant::now() < hit.1 {
                return Ok(hit.0.clone());
            }
            self.cache.invalidate(&key);
        }
        let facts = self.ask(token).await?;
        let now = unix_now();
        let mut ttl = self.cache_ttl;
        if let Some(exp) = facts.expires_at {
            if exp <= now {
                return Err(TokenError::Invalid("token expired".into()));
            }
            let left = Duration::from_secs(exp - now).saturating_sub(self.expiry_margin);
            ttl = ttl.min(left);
        }
        if !ttl.is_zero() {
            self.cache
                .insert(key, Arc::new((facts.clone(), Instant::now() + ttl)));
        }
        Ok(facts)
    }

    /// HMAC of the token under a per-process key: the cache never holds a usable token.
    fn key(&self, token: &[u8]) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.cache_key)
            .unwrap_or_else(|_| <hmac::Hmac<sha2::Sha256> as KeyInit>::new(&Default::default()));
        mac.update(token);
        mac.finalize().into_bytes().into()
    }

    async fn ask(&self, token: &[u8]) -> Result<TokenFacts, TokenError> {
        // The token passed `is_b64token`: visible ASCII.
        let text = std::str::from_utf8(token)
            .map_err(|_| TokenError::Invalid("malformed token".into()))?;
        match &self.method {
            Method::Userinfo(client) => {
                let e = client.endpoint();
                let request = Zeroizing::new(format!(
                    "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: portcullis\r\nAuthorization: Bearer {text}\r\n\r\n",
                    e.path,
                    e.host_header()
                ));
                let resp = client
                    .send(request.as_bytes())
                    .await
                    .map_err(|e| TokenError::Unavailable(format!("userinfo: {e}")))?;
                match resp.status {
                    200 => claims::from_userinfo(&resp.body, &self.rules).map_err(refusal),
                    400 | 401 | 403 => Err(TokenError::Invalid(format!(
                        "userinfo answered {}",
                        resp.status
                    ))),
                    s => Err(TokenError::Unavailable(format!("userinfo answered {s}"))),
                }
            }
            Method::Introspection {
                client,
                authorization,
            } => {
                let e = client.endpoint();
                let body = Zeroizing::new(format!(
                    "token={}&token_type_hint=access_token",
                    form_encode(token)
                ));
                let request = Zeroizing::new(format!(
                    "POST {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: portcullis\r\nAuthorization: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{}",
                    e.path,
                    e.host_header(),
                    authorization.as_str(),
                    body.len(),
                    body.as_str()
                ));
                let resp = client
                    .send(request.as_bytes())
                    .await
                    .map_err(|e| TokenError::Unavailable(format!("introspection: {e}")))?;
                match resp.status {
                    200 => claims::from_introspection(&resp.body, &self.rules, unix_now())
                        .map_err(refusal),
                    // Our own client credentials were refused: a configuration problem, not
                    // the user's fault.
                    s => Err(TokenError::Unavailable(format!(
                        "introspection answered {s}"
                    ))),
                }
            }
            Method::Jwt(verifier) => {
                let map = verifier.verify(text).await?;
                claims::from_jwt_claims(&map, &self.rules).map_err(refusal)
            }
        }
    }
}

impl Authenticator for OAuth {
    fn verify<'a>(&'a self, req: &'a AuthRequest) -> VerdictFuture<'a> {
        Box::pin(async move {
            if !req.mechanism.is_token() {
                return Verdict::reject("password login where only tokens are accepted");
            }
            match self.validate(req.secret.expose()).await {
                Ok(facts) => {
                    if req.mechanism != Mechanism::Bearer && !facts.matches(&req.username) {
                        return Verdict::reject("token belongs to another identity");
                    }
                    Verdict::Accept {
                        account: facts.account,
                    }
                }
                Err(TokenError::Invalid(reason)) => Verdict::reject(reason),
                Err(TokenError::Unavailable(reason)) => Verdict::temp(reason),
            }
        })
    }

    fn kind(&self) -> &'static str {
        "oauth"
    }
}

/// Tokens to the `oauth` validator, passwords to the configured kind (none for `kind = "oauth"`).
pub struct Routed {
    pub passwords: Option<Arc<dyn Authenticator>>,
    pub tokens: Arc<OAuth>,
}

impl Authenticator for Routed {
    fn verify<'a>(&'a self, req: &'a AuthRequest) -> VerdictFuture<'a> {
        if req.mechanism.is_token() {
            return self.tokens.verify(req);
        }
        match &self.passwords {
            Some(p) => p.verify(req),
            None => Box::pin(async { Verdict::reject("password logins are not accepted") }),
        }
    }

    fn kind(&self) -> &'static str {
        self.passwords.as_ref().map_or("oauth", |p| p.kind())
    }

    fn kind_for(&self, mechanism: Mechanism) -> &'static str {
        if mechanism.is_token() {
            "oauth"
        } else {
            self.kind()
        }
    }

    fn reload(&self) -> Result<(), ReloadError> {
        self.passwords.as_ref().map_or(Ok(()), |p| p.reload())
    }
}

fn read_client_secret(cfg: &OAuthConfig) -> Result<Zeroizing<String>, BuildError> {
    const KEY: &str = "authenticator.oauth.client_secret_file";
    let secret = match (&cfg.client_secret_file, &cfg.client_secret_env) {
        (Some(path), None) => std::fs::read_to_string(path)
            .map_err(|e| build_error(KEY, format!("cannot read {}: {e}", path.display())))?,
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            build_error(
                "authenticator.oauth.client_secret_env",
                format!("{var} is not set"),
            )
        })?,
        _ => {
            return Err(build_error(
                KEY,
                "set exactly one of client_secret_file and client_secret_env",
            ))
        }
    };
    let secret = Zeroizing::new(secret.trim_end_matches(['\r', '\n']).to_owned());
    if secret.is_empty() {
        return Err(build_error(KEY, "the client secret is empty"));
    }
    Ok(secret)
}

/// `application/x-www-form-urlencoded` of raw bytes: unreserved characters stay, the rest is
/// `%XX` (so `+`, `/` and `=` in a token survive).
pub fn form_encode(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len() * 3);
    for &b in raw {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A provider answering garbage cannot decide (fail closed, but not as a wrong token); every
/// other claims problem is the token's.
fn refusal(e: claims::ClaimsError) -> TokenError {
    match e {
        claims::ClaimsError::NotAnObject => TokenError::Unavailable(e.to_string()),
        other => TokenError::Invalid(other.to_string()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
