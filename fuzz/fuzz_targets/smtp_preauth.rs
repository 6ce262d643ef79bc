//! The whole submission pre-login session, the backend login and the reply reader, fed in
//! chunks. Invariants: no panic; answers do not depend on the split; a cleartext connection
//! never yields credentials; nothing after a failed AUTH yields more than three logins.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use portcullis::identity::IdentityRules;
use portcullis::proto::prelogin::{script, BackendMachine, Failure, PreLogin};
use portcullis::proto::smtp::reply::ReplyReader;
use portcullis::proto::smtp::{client_keywords, SmtpBackendLogin, SmtpOptions, SmtpPreAuth};
use portcullis::secret::Secret;

fn run(tls: bool, chunks: &[&[u8]]) -> (Vec<u8>, usize) {
    let mut m = SmtpPreAuth::new(SmtpOptions {
        tls,
        starttls: !tls,
        allow_plaintext_auth: false,
        rules: IdentityRules::default(),
        sasl: portcullis::sasl::Offer::with_oauth(Some("https://idp.example/.well-known/openid-configuration")),
        max_auth_failures: 3,
        max_protocol_errors: 3,
        hostname: "mx.test".into(),
        keywords: Arc::new(vec!["PIPELINING".into(), "SIZE 100".into()]),
    });
    m.greet();
    let t = script(&mut m, chunks, Failure::Rejected);
    (t.output, t.attempts.len())
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let cut = (data[0] as usize).min(input.len());
    let whole = run(true, &[input]);
    assert_eq!(whole, run(true, &[&input[..cut], &input[cut..]]));
    assert!(whole.1 <= 3);
    assert_eq!(run(false, &[&input[..cut], &input[cut..]]).1, 0);

    let mut b = SmtpBackendLogin::login("a@example.org", "proxy", "%", &Secret::from("s"), "px", true);
    b.feed(input);
    let _ = b.advance();
    let mut r = ReplyReader::new();
    r.feed(&input[..cut]);
    while let Some(Ok(_)) = r.next_reply() {}
    r.feed(&input[cut..]);
    while let Some(Ok(reply)) = r.next_reply() {
        for k in client_keywords(&reply.lines) {
            assert!(!k.contains('\r') && !k.contains('\n'));
        }
    }
});
