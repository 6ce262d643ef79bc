//! The whole POP3 pre-login session and the backend login, fed in chunks. Invariants: no panic;
//! answers do not depend on the split; a cleartext connection never yields credentials.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::identity::IdentityRules;
use portcullis::proto::pop3::{Pop3BackendLogin, Pop3Options, Pop3PreAuth};
use portcullis::proto::prelogin::{script, BackendMachine, Failure, PreLogin};
use portcullis::secret::Secret;

fn run(tls: bool, chunks: &[&[u8]]) -> (Vec<u8>, usize) {
    let mut m = Pop3PreAuth::new(Pop3Options {
        tls,
        starttls: !tls,
        allow_plaintext_auth: false,
        rules: IdentityRules::default(),
        sasl: portcullis::sasl::Offer::with_oauth(Some("https://idp.example/.well-known/openid-configuration")),
        max_auth_failures: 3,
        max_protocol_errors: 3,
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
    assert_eq!(
        run(true, &[input]),
        run(true, &[&input[..cut], &input[cut..]])
    );
    assert_eq!(run(false, &[&input[..cut], &input[cut..]]).1, 0);
    let mut b = Pop3BackendLogin::new("a@example.org", "proxy", "%", &Secret::from("s"), false);
    b.feed(input);
    let _ = b.advance();
});
