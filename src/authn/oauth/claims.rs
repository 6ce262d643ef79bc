//! What a token says about its owner, read from a userinfo answer, an RFC 7662 introspection
//! answer or a verified JWT's claims. Pure: JSON in, [`TokenFacts`] or a reason out, so the
//! parsing of what an identity provider sends is unit-, property- and fuzz-tested without sockets.

use serde_json::{Map, Value};

/// Largest claim value taken as an account or identity; longer ones are refused, not truncated.
pub const MAX_CLAIM_LEN: usize = 256;

/// The owner of a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFacts {
    /// The canonical account the master login is for.
    pub account: String,
    /// Every name a client may claim for this token (compared ASCII case-insensitively).
    pub identities: Vec<String>,
    /// Seconds since the epoch when the token expires, if the source said.
    pub expires_at: Option<u64>,
}

impl TokenFacts {
    /// Whether `claimed` (from XOAUTH2 `user=` or the OAUTHBEARER GS2 `a=`) names this owner.
    pub fn matches(&self, claimed: &str) -> bool {
        self.identities
            .iter()
            .any(|i| i.eq_ignore_ascii_case(claimed))
    }
}

/// Why a token's claims are not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    /// The answer is not a JSON object.
    #[error("answer is not a JSON object")]
    NotAnObject,
    /// Introspection said `active: false` (or did not say `true`).
    #[error("token is not active")]
    Inactive,
    #[error("token expired")]
    Expired,
    #[error("token has no usable {0} claim")]
    NoAccount(String),
    #[error("token audience does not match")]
    Audience,
    #[error("token issuer does not match")]
    Issuer,
}

/// Which claims name the owner, and what else must hold.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    /// The claim whose value is the canonical account.
    pub account_claim: String,
    /// Further claims whose values a client may present as its identity.
    pub identity_claims: Vec<String>,
    /// If non-empty, the `aud` claim (string or array) must contain one of these.
    pub audience: Vec<String>,
    /// If set, `iss` must equal it.
    pub issuer: Option<String>,
}

/// Reads a userinfo answer (OpenID Connect Core §5.3; Stalwart's `GET /auth/userinfo`).
///
/// # Errors
/// [`ClaimsError`] if the answer is not an object or names no account.
pub fn from_userinfo(body: &[u8], rules: &ClaimRules) -> Result<TokenFacts, ClaimsError> {
    let map = object(body)?;
    facts(&map, rules, None)
}

/// Reads an RFC 7662 introspection answer. `active` must be `true`; `exp`, `aud` and `iss` are
/// checked when present (and `aud`/`iss` required when configured).
///
/// # Errors
/// [`ClaimsError`].
pub fn from_introspection(
    body: &[u8],
    rules: &ClaimRules,
    now: u64,
) -> Result<TokenFacts, ClaimsError> {
    let map = object(body)?;
    if map.get("active") != Some(&Value::Bool(true)) {
        return Err(ClaimsError::Inactive);
    }
    let exp = map.get("exp").and_then(Value::as_u64);
    if exp.is_some_and(|e| e <= now) {
        return Err(ClaimsError::Expired);
    }
    check_audience_issuer(&map, rules)?;
    facts(&map, rules, exp)
}

/// Reads the claims of a JWT whose signature, `exp`, `nbf`, `iss` and `aud` were already verified.
///
/// # Errors
/// [`ClaimsError::NoAccount`].
pub fn from_jwt_claims(
    map: &Map<String, Value>,
    rules: &ClaimRules,
) -> Result<TokenFacts, ClaimsError> {
    facts(map, rules, map.get("exp").and_then(Value::as_u64))
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ClaimsError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ClaimsError::NotAnObject),
    }
}

fn check_audience_issuer(map: &Map<String, Value>, rules: &ClaimRules) -> Result<(), ClaimsError> {
    if !rules.audience.is_empty() {
        let ok = match map.get("aud") {
            Some(Value::String(a)) => rules.audience.contains(a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| rules.audience.iter().any(|want| want == a)),
            _ => false,
        };
        if !ok {
            return Err(ClaimsError::Audience);
        }
    }
    if let Some(iss) = &rules.issuer {
        if map.get("iss").and_then(Value::as_str) != Some(iss.as_str()) {
            return Err(ClaimsError::Issuer);
        }
    }
    Ok(())
}

/// A claim usable as a name: a non-empty string of at most [`MAX_CLAIM_LEN`] bytes without
/// control characters. Anything else is ignored (identities) or refused (the account).
fn name_claim<'a>(map: &'a Map<String, Value>, claim: &str) -> Option<&'a str> {
    let v = map.get(claim)?.as_str()?;
    (!v.is_empty() && v.len() <= MAX_CLAIM_LEN && !v.chars().any(char::is_control)).then_some(v)
}

fn facts(
    map: &Map<String, Value>,
    rules: &ClaimRules,
    expires_at: Option<u64>,
) -> Result<TokenFacts, ClaimsError> {
    let account = name_claim(map, &rules.account_claim)
        .ok_or_else(|| ClaimsError::NoAccount(rules.account_claim.clone()))?
        .to_owned();
    let mut identities = vec![account.clone()];
    for claim in &rules.identity_claims {
        if let Some(v) = name_claim(map, claim) {
            if !identities.iter().any(|i| i.eq_ignore_ascii_case(v)) {
                identities.push(v.to_owned());
            }
        }
    }
    Ok(TokenFacts {
        account,
        identities,
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules(account: &str) -> ClaimRules {
        ClaimRules {
            account_claim: account.into(),
            identity_claims: vec!["email".into(), "preferred_username".into()],
            audience: vec![],
            issuer: None,
        }
    }

    #[test]
    fn stalwart_userinfo() {
        let body = br#"{"sub":"x1","email":"alice@example.org","preferred_username":"alice","email_verified":true}"#;
        let f = from_userinfo(body, &rules("preferred_username")).unwrap();
        assert_eq!(f.account, "alice");
        assert!(f.matches("Alice@Example.org"));
        assert!(f.matches("alice"));
        assert!(!f.matches("bob@example.org"));
        assert_eq!(f.expires_at, None);
    }

    #[test]
    fn userinfo_without_the_account_claim_is_refused() {
        for body in [
            &br#"{"sub":"x1"}"#[..],
            br#"{"preferred_username":""}"#,
            br#"{"preferred_username":7}"#,
            br#"{"preferred_username":"a\u0000b"}"#,
        ] {
            assert!(matches!(
                from_userinfo(body, &rules("preferred_username")),
                Err(ClaimsError::NoAccount(_))
            ));
        }
        let long = format!(r#"{{"preferred_username":"{}"}}"#, "a".repeat(300));
        assert!(from_userinfo(long.as_bytes(), &rules("preferred_username")).is_err());
        for body in [&b"[]"[..], b"null", b"{", b"", b"\"x\""] {
            assert_eq!(
                from_userinfo(body, &rules("sub")).unwrap_err(),
                ClaimsError::NotAnObject
            );
        }
    }

    #[test]
    fn introspection() {
        let mut r = rules("username");
        let body = br#"{"active":true,"username":"bob@example.org","exp":2000,"aud":["mail","x"],"iss":"https://idp"}"#;
        let f = from_introspection(body, &r, 1000).unwrap();
        assert_eq!(f.account, "bob@example.org");
        assert_eq!(f.expires_at, Some(2000));
        assert_eq!(
            from_introspection(body, &r, 2000).unwrap_err(),
            ClaimsError::Expired
        );
        for inactive in [
            &br#"{"active":false,"username":"bob"}"#[..],
            br#"{"active":"true","username":"bob"}"#,
            br#"{"username":"bob"}"#,
        ] {
            assert_eq!(
                from_introspection(inactive, &r, 0).unwrap_err(),
                ClaimsError::Inactive
            );
        }
        r.audience = vec!["mail".into()];
        r.issuer = Some("https://idp".into());
        assert!(from_introspection(body, &r, 1000).is_ok());
        r.audience = vec!["other".into()];
        assert_eq!(
            from_introspection(body, &r, 1000).unwrap_err(),
            ClaimsError::Audience
        );
        r.audience = vec![];
        r.issuer = Some("https://evil".into());
        assert_eq!(
            from_introspection(body, &r, 1000).unwrap_err(),
            ClaimsError::Issuer
        );
    }

    proptest! {
        #[test]
        fn never_panics(body in proptest::collection::vec(any::<u8>(), 0..200), now in any::<u64>()) {
            let _ = from_userinfo(&body, &rules("sub"));
            let _ = from_introspection(&body, &rules("sub"), now);
        }

        #[test]
        fn the_account_always_matches_itself(name in "[a-zA-Z0-9@._-]{1,64}") {
            let body = serde_json::json!({"active": true, "sub": name}).to_string();
            let f = from_introspection(body.as_bytes(), &rules("sub"), 0).unwrap();
            prop_assert!(f.matches(&name.to_ascii_uppercase()));
            prop_assert_eq!(f.account, name);
        }
    }
}
