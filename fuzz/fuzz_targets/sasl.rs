//! SASL PLAIN and LOGIN: base64 lines and decoded payloads. Invariants: no panic; accepted
//! credentials always satisfy the username rules and carry a non-empty password.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::identity::IdentityRules;
use portcullis::sasl::{decode_response, parse_plain, Exchange, Mechanism, Response, Step};

fuzz_target!(|data: &[u8]| {
    let rules = IdentityRules::default();
    let _ = decode_response(data);
    if let Ok((user, pw)) = parse_plain(data, &rules) {
        assert!(rules.validate(user.as_bytes()).is_ok());
        assert!(!pw.is_empty());
    }
    for mech in [Mechanism::Plain, Mechanism::Login] {
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
        }
    }
});
