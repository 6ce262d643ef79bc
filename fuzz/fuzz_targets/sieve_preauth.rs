//! The whole ManageSieve pre-login session, the backend login, the probe and the capability
//! parser, fed in chunks. Invariants: no panic; answers do not depend on the split; output and
//! the hand-off are bounded; a cleartext connection never yields credentials.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::identity::IdentityRules;
use portcullis::proto::prelogin::{BackendMachine, Event, Failure, PreLogin};
use portcullis::proto::sieve::{
    default_capabilities, parse_capability_response, SieveBackendLogin, SieveOptions,
    SievePreAuth, SieveProbe, LINE_MAX, STRING_MAX,
};
use portcullis::secret::Secret;

/// Output, login attempts, and after a successful login the bytes handed to the backend (what
/// the machine held plus what the client sent later), or `Some(None)` if it held too much.
type Run = (Vec<u8>, usize, Option<Option<Vec<u8>>>);

fn run(tls: bool, chunks: &[&[u8]]) -> Run {
    let mut m = SievePreAuth::new(SieveOptions {
        tls,
        starttls: !tls,
        allow_plaintext_auth: false,
        rules: IdentityRules::default(),
        sasl: portcullis::sasl::Offer::with_oauth(Some("https://idp.example/.well-known/openid-configuration")),
        max_auth_failures: 3,
        max_protocol_errors: 3,
        capabilities: default_capabilities(),
    });
    m.greet();
    let (mut out, mut logins) = (Vec::new(), 0);
    let mut it = chunks.iter();
    loop {
        let ev = m.advance();
        out.extend(m.take_output());
        match ev {
            Event::NeedInput => match it.next() {
                Some(c) => m.feed(c),
                None => return (out, logins, None),
            },
            Event::Login { .. } => {
                logins += 1;
                // Every third attempt succeeds: check the hand-off of pipelined bytes.
                if logins % 3 == 0 {
                    m.login_succeeded(&[]);
                    out.extend(m.take_output());
                    let left = m.take_leftover().map(|mut held| {
                        assert!(held.len() <= LINE_MAX + STRING_MAX);
                        for c in it {
                            held.extend_from_slice(c);
                        }
                        held
                    });
                    return (out, logins, Some(left));
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
    if data.len() < 2 {
        return;
    }
    let input = &data[2..];
    let cut = (data[0] as usize).min(input.len());
    let size = usize::from(data[1]).max(1);
    let whole = run(true, &[input]);
    assert_eq!(whole, run(true, &[&input[..cut], &input[cut..]]));
    let pieces: Vec<&[u8]> = input.chunks(size).collect();
    assert_eq!(whole, run(true, &pieces));
    assert!(whole.0.len() <= 2048 + 64 * input.len());
    assert_eq!(run(false, &pieces).1, 0);

    let mut b = SieveBackendLogin::new("a@example.org", "proxy", "%", &Secret::from("s"), false);
    b.feed(input);
    let _ = b.advance();
    let mut p = SieveProbe::new();
    p.feed(input);
    let _ = p.advance();
    if let Ok(Some(r)) = parse_capability_response(input) {
        assert!(r.consumed <= input.len());
    }
});
