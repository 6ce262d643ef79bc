//! The `oauth` authenticator against a scripted provider: the answers a real one gives, and the
//! broken ones no real provider can be made to give on demand.

#[cfg(test)]
use super::*;
use crate::authn::http::test_server::{serve, Canned};
use crate::secret::Secret;
use crate::Protocol;

fn config(extra: &str) -> OAuthConfig {
    toml::from_str(extra).unwrap()
}

fn json_answer(status: &str, body: &str) -> Canned {
    Canned::keep(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

fn request(mechanism: Mechanism, user: &str, token: &str) -> AuthRequest {
    AuthRequest {
        protocol: Protocol::Imap,
        mechanism,
        username: user.into(),
        secret: Secret::from(token),
        client: "127.0.0.1:5000".parse().unwrap(),
        local: "127.0.0.1:993".parse().unwrap(),
        tls: None,
        attempt: 1,
        session_id: "s1".into(),
        client_id: None,
    }
}

const STALWART: &str = r#"{"sub":"7","email":"alice@example.org","preferred_username":"alice"}"#;

#[tokio::test]
async fn userinfo_accepts_the_owner_and_caches() {
    let server = serve(vec![json_answer("200 OK", STALWART)]).await;
    let auth = OAuth::build(
        &config(&format!(
            "method = \"userinfo\"\nurl = \"{}\"",
            server.url("/auth/userinfo")
        )),
        Duration::from_secs(2),
    )
    .unwrap();
    for user in ["alice@example.org", "ALICE", "alice"] {
        assert_eq!(
            auth.verify(&request(Mechanism::XOAuth2, user, "sw1.tok+en/=="))
                .await,
            Verdict::Accept {
                account: "alice".into()
            }
        );
    }
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "the later logins came from the cache");
    let head = String::from_utf8(requests[0].clone()).unwrap();
    assert!(
        head.starts_with("GET /auth/userinfo HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nAuthorization: Bearer sw1.tok+en/==\r\n"),
        "{head}"
    );
}

#[tokio::test]
async fn a_token_under_another_name_is_refused() {
    let server = serve(vec![json_answer("200 OK", STALWART)]).await;
    let auth = OAuth::build(
        &config(&format!(
            "method = \"userinfo\"\nurl = \"{}\"",
            server.url("/u")
        )),
        Duration::from_secs(2),
    )
    .unwrap();
    for mech in [Mechanism::XOAuth2, Mechanism::OAuthBearer] {
        assert!(matches!(
            auth.verify(&request(mech, "bob@example.org", "tok")).await,
            Verdict::Reject { .. }
        ));
    }
    // HTTP Bearer names nobody: the owner is the account.
    assert_eq!(
        auth.verify(&request(Mechanism::Bearer, "", "tok")).await,
        Verdict::Accept {
            account: "alice".into()
        }
    );
    // A password is never a token.
    assert!(matches!(
        auth.verify(&request(Mechanism::Plain, "alice", "tok"))
            .await,
        Verdict::Reject { .. }
    ));
}

#[tokio::test]
async fn provider_answers_map_to_reject_or_tempfail() {
    for (answer, reject) in [
        (json_answer("401 Unauthorized", "{}"), true),
        (json_answer("403 Forbidden", "{}"), true),
        (json_answer("200 OK", r#"{"sub":"7"}"#), true),
        (json_answer("500 Internal Server Error", "{}"), false),
        (json_answer("200 OK", "<html>"), false),
        (Canned::close(b"garbage\r\n\r\n"), false),
    ] {
        let server = serve(vec![answer]).await;
        let auth = OAuth::build(
            &config(&format!(
                "method = \"userinfo\"\nurl = \"{}\"",
                server.url("/u")
            )),
            Duration::from_secs(2),
        )
        .unwrap();
        let v = auth
            .verify(&request(Mechanism::XOAuth2, "alice", "tok"))
            .await;
        if reject {
            assert!(matches!(v, Verdict::Reject { .. }), "{v:?}");
        } else {
            assert!(matches!(v, Verdict::TempFail { .. }), "{v:?}");
        }
    }
}

#[tokio::test]
async fn malformed_tokens_never_reach_the_provider() {
    let server = serve(vec![json_answer("200 OK", STALWART)]).await;
    let auth = OAuth::build(
        &config(&format!(
            "method = \"userinfo\"\nurl = \"{}\"",
            server.url("/u")
        )),
        Duration::from_secs(2),
    )
    .unwrap();
    for bad in ["", "a b", "tok\r\nX-Injected: 1", "=abc"] {
        assert!(matches!(
            auth.verify(&request(Mechanism::Bearer, "", bad)).await,
            Verdict::Reject { .. }
        ));
    }
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn introspection_posts_the_encoded_token_as_the_client() {
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "s3cr:t\n").unwrap();
    let exp = unix_now() + 3600;
    let server = serve(vec![
        json_answer(
            "200 OK",
            &format!(r#"{{"active":true,"username":"bob@example.org","exp":{exp},"aud":"mail"}}"#),
        ),
        json_answer("200 OK", r#"{"active":false}"#),
    ])
    .await;
    let auth = OAuth::build(
        &config(&format!(
            "method = \"introspection\"\nurl = \"{}\"\nclient_id = \"proxy\"\nclient_secret_file = \"{}\"\naudience = [\"mail\"]",
            server.url("/introspect"),
            secret.path().display()
        )),
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(
        auth.verify(&request(
            Mechanism::OAuthBearer,
            "bob@example.org",
            "a+b/c="
        ))
        .await,
        Verdict::Accept {
            account: "bob@example.org".into()
        }
    );
    let req = String::from_utf8(server.requests()[0].clone()).unwrap();
    assert!(req.starts_with("POST /introspect HTTP/1.1\r\n"), "{req}");
    let basic = base64::engine::general_purpose::STANDARD.encode("proxy:s3cr%3At");
    assert!(
        req.contains(&format!("Authorization: Basic {basic}\r\n")),
        "{req}"
    );
    assert!(
        req.ends_with("\r\n\r\ntoken=a%2Bb%2Fc%3D&token_type_hint=access_token"),
        "{req}"
    );
    assert!(matches!(
        auth.verify(&request(Mechanism::OAuthBearer, "bob@example.org", "other"))
            .await,
        Verdict::Reject { .. }
    ));
}

#[tokio::test]
async fn a_token_is_not_cached_past_its_expiry() {
    let exp = unix_now() + 31;
    let server = serve(vec![json_answer(
        "200 OK",
        &format!(r#"{{"active":true,"username":"bob","exp":{exp}}}"#),
    )])
    .await;
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "s").unwrap();
    let auth = OAuth::build(
        &config(&format!(
            "method = \"introspection\"\nurl = \"{}\"\nclient_id = \"p\"\nclient_secret_file = \"{}\"\nexpiry_margin = \"30s\"",
            server.url("/i"),
            secret.path().display()
        )),
        Duration::from_secs(2),
    )
    .unwrap();
    for _ in 0..2 {
        let facts = auth.validate(b"tok").await.unwrap();
        assert_eq!(facts.expires_at, Some(exp));
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(
        server.requests().len(),
        2,
        "within the margin of expiry every use asks again"
    );
}

#[test]
fn build_names_the_key_at_fault() {
    let err = |text: &str| {
        OAuth::build(&config(text), Duration::from_secs(1))
            .err()
            .unwrap()
            .to_string()
    };
    assert!(err("method = \"userinfo\"").starts_with("authenticator.oauth.url:"));
    assert!(err("method = \"introspection\"\nurl = \"http://x/\"")
        .starts_with("authenticator.oauth.client_id:"));
    assert!(
        err("method = \"introspection\"\nurl = \"http://x/\"\nclient_id = \"c\"")
            .starts_with("authenticator.oauth.client_secret_file:")
    );
    assert!(err("method = \"jwt\"").starts_with("authenticator.oauth.issuer:"));
    assert!(err("method = \"jwt\"\nissuer = \"https://idp\"")
        .starts_with("authenticator.oauth.audience:"));
    assert!(err(
        "method = \"jwt\"\nissuer = \"https://idp\"\naudience = [\"a\"]\nalgorithms = [\"HS256\"]"
    )
    .starts_with("authenticator.oauth.algorithms:"));
    assert!(err("method = \"userinfo\"\nurl = \"ftp://x\"").starts_with("authenticator.oauth.url:"));
}

/// An ES256 key pair: the PKCS#8 document to sign with and the public JWK.
fn es256_key(kid: &str) -> (Vec<u8>, String) {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let public = pair.public_key().as_ref();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = format!(
        r#"{{"kty":"EC","crv":"P-256","kid":"{kid}","use":"sig","alg":"ES256","x":"{}","y":"{}"}}"#,
        b64.encode(&public[1..33]),
        b64.encode(&public[33..65])
    );
    (pkcs8.as_ref().to_vec(), jwk)
}

fn sign(pkcs8: &[u8], kid: &str, claims: &serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.into());
    header.typ = Some("at+jwt".into());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_ec_der(pkcs8),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_checked_against_discovered_keys() {
    let (key, jwk) = es256_key("k1");
    let (other_key, _) = es256_key("k1");
    let jwks = format!(r#"{{"keys":[{jwk}]}}"#);
    let server = serve(vec![json_answer("200 OK", &jwks)]).await;
    let discovery = serve(vec![json_answer(
        "200 OK",
        &format!(
            r#"{{"issuer":"https://idp","jwks_uri":"{}"}}"#,
            server.url("/jwks")
        ),
    )])
    .await;
    let mut auth = OAuth::build(
        &config(&format!(
            "method = \"jwt\"\nissuer = \"https://idp\"\naudience = [\"urn:mail\"]\ndiscovery_url = \"{}\"",
            discovery.url("/.well-known/openid-configuration")
        )),
        Duration::from_secs(2),
    )
    .unwrap();
    let now = unix_now();
    let good = serde_json::json!({
        "iss": "https://idp", "aud": "urn:mail", "exp": now + 600, "iat": now,
        "sub": "x", "preferred_username": "carol@example.org",
    });
    let token = sign(&key, "k1", &good);
    assert_eq!(
        auth.verify(&request(
            Mechanism::OAuthBearer,
            "carol@example.org",
            &token
        ))
        .await,
        Verdict::Accept {
            account: "carol@example.org".into()
        }
    );
    let mut refused = vec![sign(&other_key, "k1", &good)];
    for (field, value) in [
        ("iss", serde_json::json!("https://evil")),
        ("aud", serde_json::json!("urn:other")),
        ("exp", serde_json::json!(now - 3600)),
        ("nbf", serde_json::json!(now + 3600)),
    ] {
        let mut claims = good.clone();
        claims[field] = value;
        refused.push(sign(&key, "k1", &claims));
    }
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    refused.push(sign(&key, "k1", &no_exp));
    // alg none: header and claims, empty signature.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    refused.push(format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","kid":"k1"}"#),
        b64.encode(good.to_string())
    ));
    for token in &refused {
        let v = auth
            .verify(&request(Mechanism::OAuthBearer, "carol@example.org", token))
            .await;
        assert!(matches!(v, Verdict::Reject { .. }), "{v:?}");
    }
    assert_eq!(discovery.requests().len(), 1, "discovery is read once");
    assert_eq!(
        server.requests().len(),
        1,
        "an unknown signature does not refetch the keys; the kid was known"
    );
    // A token naming an unknown key (a rotation) fetches the keys again, but not more often
    // than MIN_REFRESH: garbage kids cannot make us hammer the provider.
    let unknown = sign(&key, "k9", &good);
    for _ in 0..3 {
        let v = auth
            .verify(&request(
                Mechanism::OAuthBearer,
                "carol@example.org",
                &unknown,
            ))
            .await;
        assert!(matches!(v, Verdict::Reject { .. }), "{v:?}");
    }
    assert_eq!(server.requests().len(), 1);
    if let Method::Jwt(v) = &mut auth.method {
        v.min_refresh = Duration::ZERO;
    }
    let v = auth
        .verify(&request(
            Mechanism::OAuthBearer,
            "carol@example.org",
            &unknown,
        ))
        .await;
    assert!(matches!(v, Verdict::Reject { .. }), "{v:?}");
    assert_eq!(server.requests().len(), 2);
}
