//! The two bearer-token mechanisms mail clients use: Google's XOAUTH2 and RFC 7628 OAUTHBEARER.
//!
//! - XOAUTH2: `user=U ^A auth=Bearer T ^A ^A`.
//! - OAUTHBEARER: a GS2 header `n,a=U,` then `^A` and `key=value ^A` pairs (`auth=Bearer T`,
//!   optionally `host=` and `port=`), ending in `^A ^A`.
//!
//! Both name an identity next to the token. A chokepoint requires that identity (the token's
//! owner is checked against it later, by the authenticator), so a token stolen from one person
//! cannot be replayed under another name, and the guard can count failures per account before
//! the token is ever looked up.

use super::SaslError;
use crate::identity::IdentityRules;
use crate::secret::Secret;

/// The field separator of both mechanisms (`^A`).
const SEP: u8 = 0x01;

/// The identity and token of an XOAUTH2 payload.
///
/// Keys are matched exactly as Google documents them (`user`, `auth`), in any order; any other
/// key, a repeated key, a missing identity or token, or a scheme other than `Bearer` is refused.
///
/// # Errors
/// [`SaslError::Malformed`], or an identity error for the username.
pub fn parse_xoauth2(data: &[u8], rules: &IdentityRules) -> Result<(String, Secret), SaslError> {
    const NAME: &str = "XOAUTH2";
    let body = data
        .strip_suffix(&[SEP, SEP])
        .ok_or(SaslError::Malformed(NAME))?;
    let mut user = None;
    let mut auth = None;
    for field in body.split(|&b| b == SEP) {
        let (key, value) = split_kv(field).ok_or(SaslError::Malformed(NAME))?;
        let slot = match key {
            b"user" => &mut user,
            b"auth" => &mut auth,
            _ => return Err(SaslError::Malformed(NAME)),
        };
        if slot.replace(value).is_some() {
            return Err(SaslError::Malformed(NAME));
        }
    }
    let (Some(user), Some(auth)) = (user, auth) else {
        return Err(SaslError::Malformed(NAME));
    };
    let username = rules.validate(user)?.to_owned();
    let token = bearer_token(auth).ok_or(SaslError::Malformed(NAME))?;
    Ok((username, Secret::new(token.to_vec())))
}

/// The identity and token of an OAUTHBEARER initial client response (RFC 7628 §3.1).
///
/// Channel binding is not supported (`p=` is refused; `y` and `n` are accepted), and the
/// authorization identity `a=` is required: it is the name the token must belong to.
///
/// # Errors
/// [`SaslError::Malformed`], or an identity error for the username.
pub fn parse_oauthbearer(
    data: &[u8],
    rules: &IdentityRules,
) -> Result<(String, Secret), SaslError> {
    const NAME: &str = "OAUTHBEARER";
    let bad = SaslError::Malformed(NAME);
    // gs2-header = gs2-cbind-flag "," [ authzid ] ","
    let rest = data
        .strip_prefix(b"n,")
        .or_else(|| data.strip_prefix(b"y,"))
        .ok_or(bad.clone())?;
    let comma = rest.iter().position(|&b| b == b',').ok_or(bad.clone())?;
    let (authzid, rest) = (&rest[..comma], &rest[comma + 1..]);
    let encoded = authzid.strip_prefix(b"a=").ok_or(bad.clone())?;
    let identity = decode_saslname(encoded).ok_or(bad.clone())?;
    // kvsep *(kvpair) kvsep, every kvpair ending in kvsep.
    let pairs = rest
        .strip_prefix(&[SEP])
        .and_then(|r| r.strip_suffix(&[SEP, SEP]))
        .ok_or(bad.clone())?;
    let mut auth = None;
    for field in pairs.split(|&b| b == SEP) {
        let (key, value) = split_kv(field).ok_or(bad.clone())?;
        if key.is_empty() || !key.iter().all(u8::is_ascii_alphabetic) {
            return Err(bad);
        }
        // value = *(VCHAR / SP / HTAB / CR / LF)
        if !value
            .iter()
            .all(|&b| b.is_ascii_graphic() || matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        {
            return Err(bad);
        }
        if key == b"auth" && auth.replace(value).is_some() {
            return Err(bad);
        }
    }
    let auth = auth.ok_or(bad.clone())?;
    let username = rules.validate(&identity)?.to_owned();
    let token = bearer_token(auth).ok_or(bad)?;
    Ok((username, Secret::new(token.to_vec())))
}

/// `key=value`, split at the first `=`.
fn split_kv(field: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = field.iter().position(|&b| b == b'=')?;
    Some((&field[..eq], &field[eq + 1..]))
}

/// The token of an `auth` value: `Bearer` (any case, RFC 6750 §2.1), one space, then a
/// `b64token` (`ALPHA / DIGIT / - . _ ~ + /` followed by any `=`).
pub fn bearer_token(auth: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = auth.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"Bearer ") || !is_b64token(token) {
        return None;
    }
    Some(token)
}

/// RFC 6750 `b64token`, non-empty.
pub fn is_b64token(token: &[u8]) -> bool {
    let body_len = token.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    body_len > 0
        && token[..body_len].iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// RFC 5801 `saslname`: `=2C` is `,`, `=3D` is `=`; any other `=` or a raw `,` is invalid.
fn decode_saslname(encoded: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        match encoded[i] {
            b',' => return None,
            b'=' => {
                match encoded.get(i + 1..i + 3)? {
                    b"2C" | b"2c" => out.push(b','),
                    b"3D" | b"3d" => out.push(b'='),
                    _ => return None,
                }
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// The RFC 7628 §3.2.2 error a server sends as its last challenge when a token is refused; the
/// client answers it with a lone `^A` and then gets the protocol's failure reply. Both XOAUTH2
/// and OAUTHBEARER clients understand it. `discovery` is an OpenID configuration URL that tells
/// the client where to get a new token.
pub fn error_challenge(discovery: Option<&str>) -> Vec<u8> {
    let mut doc = serde_json::json!({
        "status": "invalid_token",
        "schemes": "bearer",
    });
    if let (Some(url), Some(map)) = (discovery, doc.as_object_mut()) {
        map.insert("openid-configuration".into(), url.into());
    }
    doc.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityError;
    use proptest::prelude::*;

    fn r() -> IdentityRules {
        IdentityRules::default()
    }

    #[test]
    fn xoauth2_table() {
        let (u, t) = parse_xoauth2(
            b"user=alice@example.org\x01auth=Bearer ya29.abc\x01\x01",
            &r(),
        )
        .unwrap();
        assert_eq!(u, "alice@example.org");
        assert!(t.ct_eq(b"ya29.abc"));
        let (u, _) = parse_xoauth2(b"auth=bearer tok==\x01user=bob\x01\x01", &r()).unwrap();
        assert_eq!(u, "bob");
        for bad in [
            &b"user=alice\x01auth=Bearer tok\x01"[..],
            b"user=alice\x01auth=Bearer tok",
            b"user=alice\x01\x01",
            b"auth=Bearer tok\x01\x01",
            b"user=alice\x01auth=Basic dG9r\x01\x01",
            b"user=alice\x01auth=Bearer \x01\x01",
            b"user=alice\x01auth=Bearer a b\x01\x01",
            b"user=alice\x01auth=Bearer tok\x01user=bob\x01\x01",
            b"user=alice\x01auth=Bearer tok\x01extra=1\x01\x01",
            b"user=alice\x01auth=Bearer =abc\x01\x01",
            b"\x01\x01",
            b"",
        ] {
            assert!(
                matches!(parse_xoauth2(bad, &r()), Err(SaslError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_xoauth2(b"user=bob%master\x01auth=Bearer t\x01\x01", &r()).unwrap_err(),
            SaslError::Identity(IdentityError::Separator)
        );
    }

    #[test]
    fn oauthbearer_table() {
        let (u, t) = parse_oauthbearer(
            b"n,a=alice@example.org,\x01host=mail.example.org\x01port=993\x01auth=Bearer vF9dft4qmT\x01\x01",
            &r(),
        )
        .unwrap();
        assert_eq!(u, "alice@example.org");
        assert!(t.ct_eq(b"vF9dft4qmT"));
        let (u, _) = parse_oauthbearer(b"y,a=a=2Cb=3Dc,\x01auth=Bearer t\x01\x01", &r()).unwrap();
        assert_eq!(u, "a,b=c");
        for bad in [
            &b"n,,\x01auth=Bearer t\x01\x01"[..],
            b"p=tls-unique,a=alice,\x01auth=Bearer t\x01\x01",
            b"n,a=alice,\x01auth=Bearer t\x01",
            b"n,a=alice,auth=Bearer t\x01\x01",
            b"n,a=alice,\x01host=x\x01\x01",
            b"n,a=alice,\x01auth=Bearer t\x01auth=Bearer u\x01\x01",
            b"n,a=al=ice,\x01auth=Bearer t\x01\x01",
            b"n,a=alice,\x01au th=x\x01auth=Bearer t\x01\x01",
            b"n,a=alice,\x01host=\x00\x01auth=Bearer t\x01\x01",
            b"n,a=alice,\x01noequals\x01auth=Bearer t\x01\x01",
            b"n,a=alice",
            b"\x01",
        ] {
            assert!(
                matches!(parse_oauthbearer(bad, &r()), Err(SaslError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_oauthbearer(b"n,a=,\x01auth=Bearer t\x01\x01", &r()).unwrap_err(),
            SaslError::Identity(IdentityError::Empty)
        );
    }

    #[test]
    fn error_challenge_is_rfc7628_json() {
        let doc: serde_json::Value = serde_json::from_slice(&error_challenge(Some(
            "https://idp.example.org/.well-known/openid-configuration",
        )))
        .unwrap();
        assert_eq!(doc["status"], "invalid_token");
        assert_eq!(doc["schemes"], "bearer");
        assert!(doc["openid-configuration"]
            .as_str()
            .unwrap()
            .ends_with("configuration"));
        let plain: serde_json::Value = serde_json::from_slice(&error_challenge(None)).unwrap();
        assert!(plain.get("openid-configuration").is_none());
    }

    proptest! {
        #[test]
        fn xoauth2_round_trips(user in "[a-z0-9.@]{1,40}", token in "[A-Za-z0-9._~+/-]{1,200}={0,2}") {
            let wire = format!("user={user}\x01auth=Bearer {token}\x01\x01");
            let (u, t) = parse_xoauth2(wire.as_bytes(), &r()).unwrap();
            prop_assert_eq!(u, user);
            prop_assert!(t.ct_eq(token.as_bytes()));
        }

        #[test]
        fn oauthbearer_round_trips(user in "[a-z0-9.@,=]{1,40}", token in "[A-Za-z0-9._~+/-]{1,200}", port in 1u16..) {
            let enc = user.replace('=', "=3D").replace(',', "=2C");
            let wire = format!("n,a={enc},\x01host=h\x01port={port}\x01auth=Bearer {token}\x01\x01");
            let (u, t) = parse_oauthbearer(wire.as_bytes(), &r()).unwrap();
            prop_assert_eq!(u, user);
            prop_assert!(t.ct_eq(token.as_bytes()));
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_xoauth2(&data, &r());
            let _ = parse_oauthbearer(&data, &r());
        }
    }
}
