//! The whole IMAP pre-login session, fed in chunks. Invariants: no panic; the answers do not
//! depend on how the input was split; a cleartext connection never yields credentials; bytes
//! handed over after login are exactly a suffix of the input (nothing invented, nothing lost).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::identity::IdentityRules;
use portcullis::proto::imap::{Event, Failure, ImapLimits, PreAuth, PreAuthOptions};

fn machine(tls: bool) -> PreAuth {
    let mut m = PreAuth::new(PreAuthOptions {
        limits: ImapLimits::default(),
        tls,
        starttls: !tls,
        allow_plaintext_auth: false,
        rules: IdentityRules::default(),
        sasl: portcullis::sasl::Offer::with_oauth(Some("https://idp.example/.well-known/openid-configuration")),
    });
    m.greet();
    m
}

/// Runs the chunks; the first login (if any) succeeds on a TLS machine.
fn run(tls: bool, chunks: &[&[u8]]) -> (Vec<u8>, usize, Option<Vec<u8>>) {
    let mut m = machine(tls);
    let mut out = Vec::new();
    let mut logins = 0;
    let mut it = chunks.iter();
    loop {
        let ev = m.advance();
        out.extend(m.take_output());
        match ev {
            Event::NeedInput => match it.next() {
                Some(c) => m.feed(c),
                None => return (out, logins, None),
            },
            Event::Login { credentials, .. } => {
                logins += 1;
                if credentials.is_ok() && logins == 1 {
                    m.login_succeeded(&["IMAP4REV1".to_owned()]);
                    out.extend(m.take_output());
                    let mut rest = m.take_leftover().unwrap_or_default();
                    for c in it {
                        rest.extend_from_slice(c);
                    }
                    return (out, logins, Some(rest));
                }
                if let Some(Event::Close(_)) = m.login_failed(Failure::Rejected) {
                    out.extend(m.take_output());
                    return (out, logins, None);
                }
            }
            Event::StartTls | Event::Close(_) => return (out, logins, None),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let cut = data[0] as usize % data.len();
    let input = &data[1..];
    let cut = cut.min(input.len());
    let whole = run(true, &[input]);
    let split = run(true, &[&input[..cut], &input[cut..]]);
    assert_eq!(whole, split, "answers depend on the split");
    if let Some(rest) = &whole.2 {
        assert!(
            input.ends_with(rest),
            "leftover is not a suffix of the input"
        );
    }
    let plain = run(false, &[&input[..cut], &input[cut..]]);
    assert_eq!(plain.1, 0, "credentials accepted on a cleartext connection");
});
