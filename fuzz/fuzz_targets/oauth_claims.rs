//! What an identity provider answers: userinfo and introspection documents, JWKS and discovery
//! documents. Invariants: no panic; an accepted owner is a non-empty, bounded name without control
//! characters, and always matches itself as a claimed identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::authn::oauth::claims::{from_introspection, from_userinfo, ClaimRules, MAX_CLAIM_LEN};
use portcullis::authn::oauth::jwt::{discovered_jwks_uri, parse_jwks};

fuzz_target!(|data: &[u8]| {
    let rules = ClaimRules {
        account_claim: "preferred_username".into(),
        identity_claims: vec!["email".into(), "sub".into()],
        audience: vec!["urn:mail".into()],
        issuer: Some("https://idp".into()),
    };
    let found = [
        from_userinfo(data, &rules),
        from_introspection(data, &rules, 1_700_000_000),
    ];
    for facts in found.into_iter().flatten() {
        assert!(!facts.account.is_empty() && facts.account.len() <= MAX_CLAIM_LEN);
        assert!(!facts.account.chars().any(char::is_control));
        assert!(facts.matches(&facts.account));
        assert!(facts.identities.iter().all(|i| i.len() <= MAX_CLAIM_LEN));
    }
    let _ = parse_jwks(data);
    let _ = discovered_jwks_uri(data);
});
