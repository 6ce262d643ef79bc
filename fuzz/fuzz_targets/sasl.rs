//! SASL PLAIN, LOGIN, XOAUTH2 and OAUTHBEARER: base64 lines and decoded payloads. Invariants: no
//! panic; accepted credentials always satisfy the username rules and carry a non-empty password,
//! and a token is always a well-formed RFC 6750 `b64token` (it goes into an HTTP header).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::identity::IdentityRules;
use portcullis::sasl::oauth::{is_b64token, parse_oauthbearer, parse_xoauth2};
use portcullis::sasl::{decode_response, parse_plain, Exchange, Mechanism, Response, Step};

fuzz_target!(|data: &[u8]| {
    let rules = IdentityRules::default();
    let _ = decode_response(data);
    if let Ok((user, pw)) = parse_plain(data, &rules) {
        assert!(rules.validate(user.as_bytes()).is_ok());
        assert!(!pw.is_empty());
    }
    for parsed in [parse_xoauth2(data, &rules), parse_oauthbearer(data, &rules)] {
        if let Ok((user, token)) = parsed {
            assert!(rules.validate(user.as_bytes()).is_ok());
            assert!(is_b64token(token.expose()));
        }
    }
    for mech in [
        Mechanism::Plain,
        Mechanism::Login,
        Mechanism::XOAuth2,
        Mechanism::OAuthBearer,
    ] {
        let mut ex = Exchange::new(mech);
        let mut parts = data.split(|&b| b == b'\n');
        let mut step = ex.begin(parts.next(), &rules);
        for p in parts {
            match step {
                Ok(Step::Challenge(_)) => {
                    step = match decode_response(p) {
                        Ok(Response::Data(d)) => ex.step(&d, &rules),
                        _ => break,
                    }
                }
                _ => break,
            }
        }
        if let Ok(Step::Done(c)) = step {
            assert!(rules.validate(c.username.as_bytes()).is_ok());
            assert!(!c.secret.is_empty());
            assert_eq!(c.mechanism, mech);
            if mech.is_token() {
                assert!(is_b64token(c.secret.expose()));
            }
        }
    }
});
