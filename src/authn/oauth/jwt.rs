//! JWT access tokens, verified against the issuer's published keys (JWKS).
//!
//! The signature check itself is `jsonwebtoken`'s; this module decides which key and which
//! rules: only the configured asymmetric algorithms (never `none`, never HMAC, where a public
//! key could be abused as a shared secret), the key named by `kid`, `iss` equal to the issuer,
//! `aud` containing a configured audience, `exp` required. Keys are fetched once, then again
//! when a token names an unknown `kid` (at most every [`MIN_REFRESH`], so garbage tokens cannot
//! make us hammer the provider) or when they are older than [`MAX_KEY_AGE`].

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use super::TokenError;
use crate::authn::http::{ClientOptions, Endpoint, HttpClient};

/// Soonest the keys are fetched again because a token named an unknown `kid`.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);
/// Keys older than this are fetched again before use (a failed fetch keeps the old ones).
pub const MAX_KEY_AGE: Duration = Duration::from_secs(3600);

/// Where the keys come from.
enum Source {
    /// `jwks_url` configured.
    Jwks(HttpClient),
    /// From `jwks_uri` in the discovery document; the client is made on first discovery.
    Discovery {
        discovery: HttpClient,
        jwks: Option<HttpClient>,
    },
}

struct Keys {
    set: Arc<JwkSet>,
    fetched: Instant,
}

/// Verifies JWT access tokens for one issuer.
pub struct JwtVerifier {
    issuer: String,
    audience: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
    options: ClientOptions,
    source: Mutex<Source>,
    keys: arc_swap::ArcSwapOption<Keys>,
    last_attempt: std::sync::Mutex<Option<Instant>>,
    /// [`MIN_REFRESH`]; shorter in tests.
    pub(super) min_refresh: Duration,
}

/// Parses configured algorithm names, refusing symmetric and unknown ones.
///
/// # Errors
/// A message naming the offending entry.
pub fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, String> {
    if names.is_empty() {
        return Err("must list at least one algorithm".into());
    }
    names
        .iter()
        .map(|n| match Algorithm::from_str(n) {
            Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => Err(format!(
                "{n}: symmetric algorithms are refused (the key is public)"
            )),
            Ok(a) => Ok(a),
            Err(_) => Err(format!("{n}: unknown algorithm")),
        })
        .collect()
}

impl JwtVerifier {
    /// `jwks` is the configured JWKS endpoint; without it, `discovery` is asked for `jwks_uri`.
    ///
    /// # Errors
    /// A message when a URL or the TLS setup is unusable.
    pub fn new(
        issuer: String,
        audience: Vec<String>,
        algorithms: Vec<Algorithm>,
        leeway: Duration,
        jwks: Option<Endpoint>,
        discovery: Endpoint,
        options: ClientOptions,
    ) -> Result<Self, String> {
        let source = match jwks {
            Some(e) => {
                Source::Jwks(HttpClient::new(e, options.clone()).map_err(|e| e.to_string())?)
            }
            None => Source::Discovery {
                discovery: HttpClient::new(discovery, options.clone())
                    .map_err(|e| e.to_string())?,
                jwks: None,
            },
        };
        Ok(Self {
            issuer,
            audience,
            algorithms,
            leeway,
            options,
            source: Mutex::new(source),
            keys: arc_swap::ArcSwapOption::empty(),
            last_attempt: std::sync::Mutex::new(None),
            min_refresh: MIN_REFRESH,
        })
    }

    /// Checks the signature and claims; returns the verified claims.
    ///
    /// # Errors
    /// [`TokenError::Invalid`] for a token that is not acceptable, [`TokenError::Unavailable`]
    /// when the keys cannot be had.
    pub async fn verify(&self, token: &str) -> Result<Map<String, Value>, TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| TokenError::Invalid("not a JWT".into()))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} not accepted",
                header.alg
            )));
        }
        let mut keys = self.current_keys(false).await?;
        let key = match pick(&keys, header.kid.as_deref(), header.alg) {
            Some(k) => k,
            None => {
                keys = self.current_keys(true).await?;
                pick(&keys, header.kid.as_deref(), header.alg)
                    .ok_or_else(|| TokenError::Invalid("no published key for this token".into()))?
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[self.issuer.as_str()]);
        validation.set_audience(&self.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| TokenError::Invalid(format!("JWT refused: {e}")))
    }

    /// The key set to use; fetched when missing, too old, or (`unknown_kid`) when a token named
    /// a key we do not have and the last fetch is at least [`MIN_REFRESH`] ago.
    async fn current_keys(&self, unknown_kid: bool) -> Result<Arc<JwkSet>, TokenError> {
        let now = Instant::now();
        let held = self.keys.load_full();
        let stale = held
            .as_ref()
            .is_none_or(|k| now.duration_since(k.fetched) > MAX_KEY_AGE);
        if !stale && !unknown_kid {
            if let Some(k) = held {
                return Ok(k.set.clone());
            }
        }
        {
            let mut last = self.last_attempt.lock().unwrap_or_else(|p| p.into_inner());
            let recent = last.is_some_and(|t| now.duration_since(t) < self.min_refresh);
            if recent {
                return held
                    .map(|k| k.set.clone())
                    .ok_or_else(|| TokenError::Unavailable("JWKS not available".into()));
            }
            *last = Some(now);
        }
        match self.fetch().await {
            Ok(set) => {
                let set = Arc::new(set);
                self.keys.store(Some(Arc::new(Keys {
                    set: set.clone(),
                    fetched: Instant::now(),
                })));
                Ok(set)
            }
            Err(e) => {
                tracing::warn!(event = "oauth_jwks", error = %e, "could not fetch the JWKS");
                held.map(|k| k.set.clone())
                    .ok_or_else(|| TokenError::Unavailable(format!("JWKS: {e}")))
            }
        }
    }

    async fn fetch(&self) -> Result<JwkSet, String> {
        let mut source = self.source.lock().await;
        match &mut *source {
            Source::Jwks(client) => fetch_jwks(client).await,
            Source::Discovery { discovery, jwks } => {
                if jwks.is_none() {
                    let body = get_json(discovery).await?;
                    let uri = discovered_jwks_uri(&body)?;
                    let endpoint = Endpoint::parse(&uri).map_err(|e| format!("jwks_uri: {e}"))?;
                    *jwks = Some(
                        HttpClient::new(endpoint, self.options.clone())
                            .map_err(|e| e.to_string())?,
                    );
                }
                match jwks {
                    Some(client) => fetch_jwks(client).await,
                    None => Err("no jwks_uri".into()),
                }
            }
        }
    }
}

/// `jwks_uri` from a discovery document.
///
/// # Errors
/// A message when the document is not JSON or names no `jwks_uri`.
pub fn discovered_jwks_uri(body: &[u8]) -> Result<String, String> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|_| "discovery document is not JSON".to_owned())?;
    doc.get("jwks_uri")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "discovery document has no jwks_uri".to_owned())
}

/// The key for a token: by `kid`, else the only key. The JWK's own `alg`, when given, must be
/// the token's.
fn pick(set: &JwkSet, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
    let jwk = match kid {
        Some(kid) => set.find(kid)?,
        None if set.keys.len() == 1 => set.keys.first()?,
        None => return None,
    };
    if let Some(key_alg) = jwk.common.key_algorithm {
        if Algorithm::from_str(&key_alg.to_string()).ok() != Some(alg) {
            return None;
        }
    }
    DecodingKey::from_jwk(jwk).ok()
}

async fn fetch_jwks(client: &HttpClient) -> Result<JwkSet, String> {
    parse_jwks(&get_json(client).await?)
}

/// A key set, keeping the keys this verifier understands: one exotic key (an encryption key,
/// a new curve) must not make the provider's whole set unusable.
///
/// # Errors
/// A message when the document is not a key set or holds no usable key.
pub fn parse_jwks(body: &[u8]) -> Result<JwkSet, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| "JWKS is not JSON".to_owned())?;
    let keys: Vec<_> = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| "JWKS has no keys array".to_owned())?
        .iter()
        .filter_map(|k| serde_json::from_value(k.clone()).ok())
        .collect();
    if keys.is_empty() {
        return Err("JWKS holds no usable key".into());
    }
    Ok(JwkSet { keys })
}

async fn get_json(client: &HttpClient) -> Result<Vec<u8>, String> {
    let e = client.endpoint();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: portcullis\r\n\r\n",
        e.path,
        e.host_header()
    );
    let resp = client
        .send(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    if resp.status != 200 {
        return Err(format!("{} answered {}", client.endpoint(), resp.status));
    }
    Ok(resp.body.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_refuse_hmac_and_unknown() {
        assert_eq!(
            parse_algorithms(&["RS256".into(), "ES256".into()]).unwrap(),
            vec![Algorithm::RS256, Algorithm::ES256]
        );
        assert!(parse_algorithms(&["HS256".into()])
            .unwrap_err()
            .contains("symmetric"));
        assert!(parse_algorithms(&["none".into()])
            .unwrap_err()
            .contains("unknown"));
        assert!(parse_algorithms(&[]).is_err());
    }

    #[test]
    fn jwks_keeps_the_keys_it_understands() {
        let set = parse_jwks(
            br#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","use":"sig","alg":"ES256"},{"kty":"weird","kid":"k2"}]}"#,
        )
        .unwrap();
        assert_eq!(set.keys.len(), 1);
        assert!(pick(&set, Some("k1"), Algorithm::ES256).is_some());
        assert!(pick(&set, Some("k1"), Algorithm::RS256).is_none());
        assert!(pick(&set, None, Algorithm::ES256).is_some());
        assert!(pick(&set, Some("nope"), Algorithm::ES256).is_none());
        assert!(parse_jwks(br#"{"keys":[]}"#).is_err());
        assert!(parse_jwks(b"[]").is_err());
    }

    #[test]
    fn discovery_document() {
        assert_eq!(
            discovered_jwks_uri(br#"{"issuer":"x","jwks_uri":"https://idp/jwks"}"#).unwrap(),
            "https://idp/jwks"
        );
        assert!(discovered_jwks_uri(br#"{"issuer":"x"}"#).is_err());
        assert!(discovered_jwks_uri(b"<html>").is_err());
    }
}
