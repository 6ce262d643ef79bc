#[cfg(test)]
use super::*;
use crate::identity::IdentityError;
use proptest::prelude::*;

fn machine(tls: bool, starttls: bool) -> PreAuth {
    let mut m = PreAuth::new(PreAuthOptions {
        limits: ImapLimits::default(),
        tls,
        starttls,
        allow_plaintext_auth: false,
        rules: IdentityRules::default(),
        sasl: crate::sasl::Offer::passwords(),
    });
    m.greet();
    m
}

/// What a driver would see: all output, plus the events other than NeedInput.
#[derive(Debug, Default, PartialEq)]
struct Run {
    out: String,
    logins: Vec<Result<(String, Vec<u8>), Refusal>>,
    closed: Option<Close>,
    starttls: bool,
}

/// Feeds `chunks` one after another; every login is answered by `answer`.
fn drive(m: &mut PreAuth, chunks: &[&[u8]], answer: Option<Failure>) -> Run {
    let mut run = Run::default();
    let mut chunks = chunks.iter();
    loop {
        let ev = m.advance();
        run.out.push_str(&String::from_utf8_lossy(&m.take_output()));
        match ev {
            Event::NeedInput => match chunks.next() {
                Some(c) => m.feed(c),
                None => return run,
            },
            Event::StartTls => {
                run.starttls = true;
                return run;
            }
            Event::Close(c) => {
                run.closed = Some(c);
                return run;
            }
            Event::Login { credentials, .. } => {
                run.logins.push(
                    credentials
                        .map(|c| (c.username, c.secret.expose().to_vec()))
                        .map_err(|(r, _)| r),
                );
                match answer {
                    Some(f) => {
                        if let Some(Event::Close(c)) = m.login_failed(f) {
                            run.out.push_str(&String::from_utf8_lossy(&m.take_output()));
                            run.closed = Some(c);
                            return run;
                        }
                    }
                    None => return run,
                }
            }
        }
    }
}

#[test]
fn greeting_before_and_after_tls() {
    let mut m = machine(false, true);
    let out = String::from_utf8(m.take_output()).unwrap();
    assert!(out.starts_with("* OK [CAPABILITY IMAP4rev1"), "{out}");
    assert!(out.contains("LOGINDISABLED") && out.contains("STARTTLS"));
    assert!(!out.contains("AUTH="));
    let mut m = machine(true, false);
    let out = String::from_utf8(m.take_output()).unwrap();
    assert!(out.contains("AUTH=PLAIN AUTH=LOGIN") && !out.contains("LOGINDISABLED"));
    assert!(!out.contains("STARTTLS"));
}

#[test]
fn capability_noop_logout() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(&mut m, &[b"a CAPABILITY\r\nb NOOP\r\nc LOGOUT\r\n"], None);
    assert!(r.out.contains("* CAPABILITY IMAP4rev1"));
    assert!(r.out.contains("a OK CAPABILITY completed\r\n"));
    assert!(r.out.contains("b OK NOOP completed\r\n"));
    assert!(r
        .out
        .ends_with("* BYE Logging out\r\nc OK LOGOUT completed\r\n"));
    assert_eq!(r.closed, Some(Close::Logout));
}

#[test]
fn login_and_pipelined_commands_are_held() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a LOGIN alice \"pw 1\"\r\nb SELECT INBOX\r\nc FETCH 1 (BODY[] {3}\r\n"],
        None,
    );
    assert_eq!(r.logins, vec![Ok(("alice".to_owned(), b"pw 1".to_vec()))]);
    // Nothing was answered for the pipelined commands.
    assert!(!r.out.contains("b "), "{}", r.out);
    m.login_succeeded(&["IMAP4REV1", "IDLE"]);
    assert_eq!(
        m.take_output(),
        b"a OK [CAPABILITY IMAP4REV1 IDLE] Logged in\r\n"
    );
    assert_eq!(
        m.take_leftover().unwrap(),
        b"b SELECT INBOX\r\nc FETCH 1 (BODY[] {3}\r\n"
    );
}

#[test]
fn login_with_literals() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a LOGIN {5}\r\n", b"alice {2}\r\n", b"pw\r\n"],
        None,
    );
    assert_eq!(r.out.matches("+ Ready for literal data\r\n").count(), 2);
    assert_eq!(r.logins, vec![Ok(("alice".to_owned(), b"pw".to_vec()))]);
}

#[test]
fn plaintext_login_refused_before_starttls() {
    let mut m = machine(false, true);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a LOGIN alice pw\r\nb AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n"],
        None,
    );
    assert!(r.logins.is_empty());
    assert!(r.out.contains("a NO [PRIVACYREQUIRED]"));
    assert!(r.out.contains("b NO [PRIVACYREQUIRED]"));
}

#[test]
fn starttls_then_fresh_state() {
    let mut m = machine(false, true);
    m.take_output();
    let r = drive(&mut m, &[b"a ID (\"name\" \"x\")\r\nb STARTTLS\r\n"], None);
    assert!(r.starttls);
    assert!(r.out.ends_with("b OK Begin TLS negotiation now\r\n"));
    assert_eq!(m.client_id(), Some("x"));
    m.tls_started();
    assert_eq!(m.client_id(), None);
    let r = drive(&mut m, &[b"c CAPABILITY\r\nd STARTTLS\r\n"], None);
    assert!(
        r.out.contains("AUTH=PLAIN")
            && !r
                .out
                .contains("* CAPABILITY IMAP4rev1 SASL-IR LITERAL- ID LOGINDISABLED")
    );
    assert!(r.out.contains("d BAD STARTTLS not available"));
}

#[test]
fn bytes_pipelined_after_starttls_close_the_connection() {
    for tail in [&b"c LOGIN alice pw\r\n"[..], b"x", b"\r\n"] {
        let mut m = machine(false, true);
        m.take_output();
        let mut input = b"b STARTTLS\r\n".to_vec();
        input.extend_from_slice(tail);
        let r = drive(&mut m, &[&input], None);
        assert_eq!(r.closed, Some(Close::PipelinedStartTls));
        assert!(!r.out.contains("b OK"), "{}", r.out);
    }
}

#[test]
fn starttls_on_implicit_tls_is_refused() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(&mut m, &[b"a STARTTLS\r\n"], None);
    assert!(r.out.contains("a BAD STARTTLS not available"));
}

#[test]
fn authenticate_plain_forms() {
    // SASL-IR
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(&mut m, &[b"a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n"], None);
    assert_eq!(r.logins, vec![Ok(("alice".to_owned(), b"pw".to_vec()))]);
    // continuation
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a AUTHENTICATE PLAIN\r\n", b"AGFsaWNlAHB3\r\n"],
        None,
    );
    assert!(r.out.contains("+ \r\n"));
    assert_eq!(r.logins.len(), 1);
    // cancel
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a AUTHENTICATE PLAIN\r\n", b"*\r\nb NOOP\r\n"],
        None,
    );
    assert!(r.out.contains("a BAD Authentication cancelled\r\n"));
    assert!(r.out.contains("b OK NOOP"));
    // LOGIN mechanism
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a AUTHENTICATE LOGIN\r\n", b"Ym9i\r\n", b"cHc=\r\n"],
        None,
    );
    assert!(r.out.contains("+ VXNlcm5hbWU6\r\n") && r.out.contains("+ UGFzc3dvcmQ6\r\n"));
    assert_eq!(r.logins, vec![Ok(("bob".to_owned(), b"pw".to_vec()))]);
}

#[test]
fn identity_attacks_are_refused_before_anyone_is_asked() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a LOGIN \"bob%master\" pw\r\n"],
        Some(Failure::Rejected),
    );
    assert_eq!(
        r.logins,
        vec![Err(Refusal::Identity(IdentityError::Separator))]
    );
    assert!(r
        .out
        .contains("a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"));
    // Unquoted, `%` is not even an atom character: a syntax error, never a login.
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a LOGIN bob%master pw\r\n"],
        Some(Failure::Rejected),
    );
    assert!(r.logins.is_empty());
    assert!(r.out.contains("a BAD Invalid command"));
    // PLAIN with a different authzid
    let mut m = machine(true, false);
    m.take_output();
    let payload = crate::sasl::encode_challenge(b"bob\0alice\0pw");
    let r = drive(
        &mut m,
        &[format!("a AUTHENTICATE PLAIN {payload}\r\n").as_bytes()],
        None,
    );
    assert!(r.logins.is_empty());
    assert!(r.out.contains("a NO [AUTHORIZATIONFAILED]"));
    // PLAIN carrying the separator
    let mut m = machine(true, false);
    m.take_output();
    let payload = crate::sasl::encode_challenge(b"\0bob%master\0pw");
    let r = drive(
        &mut m,
        &[format!("a AUTHENTICATE PLAIN {payload}\r\n").as_bytes()],
        None,
    );
    assert_eq!(
        r.logins,
        vec![Err(Refusal::Identity(IdentityError::Separator))]
    );
}

#[test]
fn three_failures_end_the_connection() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a LOGIN alice x\r\nb LOGIN alice y\r\nc LOGIN alice z\r\nd NOOP\r\n"],
        Some(Failure::Rejected),
    );
    assert_eq!(r.logins.len(), 3);
    assert_eq!(r.closed, Some(Close::TooManyFailures));
    assert!(r.out.ends_with("c NO [AUTHENTICATIONFAILED] Authentication failed\r\n* BYE Too many authentication failures\r\n"));
}

#[test]
fn temporary_failure_is_unavailable_and_not_counted() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a LOGIN alice x\r\nb LOGIN alice y\r\nc LOGIN alice z\r\nd NOOP\r\n"],
        Some(Failure::Temporary),
    );
    assert_eq!(r.out.matches("NO [UNAVAILABLE]").count(), 3);
    assert!(r.out.contains("d OK NOOP"));
    assert_eq!(r.closed, None);
}

#[test]
fn a_one_mebibyte_line_is_refused_with_bounded_memory() {
    let mut m = machine(true, false);
    m.take_output();
    let mut line = b"a LOGIN alice ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 1 << 20));
    line.extend_from_slice(b"\r\nb NOOP\r\n");
    let chunks: Vec<&[u8]> = line.chunks(4096).collect();
    let r = drive(&mut m, &chunks, None);
    assert!(r.logins.is_empty());
    assert!(
        r.out.contains("a BAD Command line too long\r\n"),
        "{}",
        r.out
    );
    assert!(r.out.contains("b OK NOOP"));
}

#[test]
fn huge_literals_are_refused() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(&mut m, &[b"a LOGIN {4294967295}\r\nb NOOP\r\n"], None);
    assert!(!r.out.contains("+ Ready"));
    assert!(r.out.contains("a BAD [TOOBIG]"));
    assert!(r.out.contains("b OK NOOP"));
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(&mut m, &[b"a LOGIN {4294967295+}\r\nxxxx"], None);
    assert!(r.out.contains("a BAD [TOOBIG]"));
    assert_eq!(r.closed, Some(Close::LiteralTooLarge));
    // Literal total over the connection is bounded too.
    let mut m = machine(true, false);
    m.take_output();
    let lit = vec![b'a'; 1000];
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for i in 0..9 {
        let mut c = format!("t{i} ID (\"k\" {{1000}}\r\n").into_bytes();
        chunks.push(std::mem::take(&mut c));
        let mut body = lit.clone();
        body.extend_from_slice(b")\r\n");
        chunks.push(body);
    }
    let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
    let r = drive(&mut m, &refs, None);
    assert!(r.out.contains("t8 BAD [TOOBIG]"), "{}", r.out);
}

#[test]
fn invalid_tags_are_not_echoed_and_errors_are_counted() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a\"b NOOP\r\n+ x\r\nc SELECT INBOX\r\nd NOOP\r\n"],
        None,
    );
    assert!(r.out.contains("* BAD Invalid command"), "{}", r.out);
    assert!(!r.out.contains("a\"b"));
    assert!(r.out.contains("c BAD Log in first"));
    assert_eq!(r.closed, Some(Close::TooManyErrors));
    assert!(!r.out.contains("d OK"));
}

#[test]
fn http_on_the_mail_port_closes() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(&mut m, &[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], None);
    assert_eq!(r.closed, Some(Close::HttpOnMailPort));
}

#[test]
fn id_is_bounded() {
    let mut m = machine(true, false);
    m.take_output();
    let long = "v".repeat(2000);
    let r = drive(
        &mut m,
        &[format!("a ID (\"name\" \"{long}\")\r\n").as_bytes()],
        None,
    );
    assert!(r.out.contains("a BAD ID parameters too large"), "{}", r.out);
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(
        &mut m,
        &[b"a ID (\"name\" \"Thunderbird\" \"version\" \"128.0\")\r\n"],
        None,
    );
    assert!(r.out.contains("* ID NIL\r\na OK ID completed"));
    assert_eq!(m.client_id(), Some("Thunderbird/128.0"));
}

/// The same transcript split at every byte gives the same answers.
#[test]
fn every_split_gives_the_same_result() {
    let transcript: &[u8] = b"a CAPABILITY\r\nb ID NIL\r\nc LOGIN {5}\r\nalice \"pw\"\r\nd AUTHENTICATE PLAIN\r\nAGFsaWNlAHB3\r\ne NOOP\r\nf LOGOUT\r\n";
    let whole = drive(
        &mut machine(true, false),
        &[transcript],
        Some(Failure::Rejected),
    );
    assert_eq!(whole.logins.len(), 2);
    assert_eq!(whole.closed, Some(Close::Logout));
    for cut in 0..transcript.len() {
        let r = drive(
            &mut machine(true, false),
            &[&transcript[..cut], &transcript[cut..]],
            Some(Failure::Rejected),
        );
        assert_eq!(r, whole, "cut at {cut}");
    }
    // And byte by byte.
    let bytes: Vec<&[u8]> = transcript.chunks(1).collect();
    assert_eq!(
        drive(&mut machine(true, false), &bytes, Some(Failure::Rejected)),
        whole
    );
}

proptest! {
    #[test]
    fn arbitrary_input_never_panics_and_output_stays_small(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
    ) {
        let mut m = machine(true, false);
        m.take_output();
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        let input_len: usize = chunks.iter().map(Vec::len).sum();
        let r = drive(&mut m, &refs, Some(Failure::Rejected));
        // Every reply is caused by at least one input byte; none can grow without bound.
        prop_assert!(r.out.len() <= 200 * (input_len + 1));
    }

    #[test]
    fn plaintext_connections_never_yield_credentials(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..10),
    ) {
        let mut m = machine(false, true);
        m.take_output();
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        let r = drive(&mut m, &refs, Some(Failure::Rejected));
        prop_assert!(r.logins.is_empty());
    }
}

/// Hand-typed sessions (`openssl s_client`, `nc`) end lines with a bare LF; Dovecot and
/// Stalwart accept that, so the proxy does too.
#[test]
fn bare_lf_line_endings_are_accepted() {
    let mut m = machine(true, false);
    m.take_output();
    let r = drive(&mut m, &[b"a CAPABILITY\nb LOGIN alice pw\n"], None);
    assert!(r.out.contains("a OK CAPABILITY completed"), "{}", r.out);
    assert_eq!(r.logins, vec![Ok(("alice".to_owned(), b"pw".to_vec()))]);
}

fn oauth_machine() -> PreAuth {
    let mut m = PreAuth::new(PreAuthOptions {
        limits: ImapLimits::default(),
        tls: true,
        starttls: false,
        allow_plaintext_auth: false,
        rules: IdentityRules::default(),
        sasl: Offer::with_oauth(Some("https://idp/.well-known/openid-configuration")),
    });
    m.greet();
    m
}

const XOAUTH2_B64: &str = "dXNlcj1hbGljZUBleGFtcGxlLm9yZwFhdXRoPUJlYXJlciB0b2sBAQ==";

#[test]
fn bearer_mechanisms_only_when_offered() {
    let mut m = machine(true, false);
    let run = drive(
        &mut m,
        &[format!("a AUTHENTICATE XOAUTH2 {XOAUTH2_B64}\r\n").as_bytes()],
        Some(Failure::Rejected),
    );
    assert!(run.out.contains("a NO [CANNOT]"), "{}", run.out);
    assert!(run.logins.is_empty());
    let mut m = oauth_machine();
    let greeting = String::from_utf8(m.take_output()).unwrap();
    assert!(
        greeting.contains("AUTH=PLAIN AUTH=LOGIN AUTH=OAUTHBEARER AUTH=XOAUTH2"),
        "{greeting}"
    );
}

#[test]
fn a_refused_token_gets_the_rfc7628_challenge_then_no() {
    let mut m = oauth_machine();
    m.take_output();
    let run = drive(
        &mut m,
        &[
            format!("a AUTHENTICATE XOAUTH2 {XOAUTH2_B64}\r\n").as_bytes(),
            b"AQ==\r\n",
            b"b NOOP\r\n",
        ],
        Some(Failure::Rejected),
    );
    assert_eq!(
        run.logins,
        vec![Ok(("alice@example.org".into(), b"tok".to_vec()))]
    );
    let challenge = Offer::with_oauth(Some("https://idp/.well-known/openid-configuration"));
    let expected = format!(
        "+ {}\r\na NO [AUTHENTICATIONFAILED] Authentication failed\r\nb OK NOOP completed\r\n",
        challenge.oauth_error().unwrap()
    );
    assert_eq!(run.out, expected);
    // OAUTHBEARER without an initial response, and a temporary failure skips the challenge.
    let mut m = oauth_machine();
    m.take_output();
    let payload = crate::sasl::encode_challenge(b"n,a=bob,\x01auth=Bearer t0k\x01\x01");
    let run = drive(
        &mut m,
        &[
            b"a AUTHENTICATE OAUTHBEARER\r\n",
            format!("{payload}\r\n").as_bytes(),
        ],
        Some(Failure::Temporary),
    );
    assert_eq!(run.logins, vec![Ok(("bob".into(), b"t0k".to_vec()))]);
    assert_eq!(
        run.out,
        "+ \r\na NO [UNAVAILABLE] Authentication service temporarily unavailable\r\n"
    );
}

#[test]
fn a_token_under_the_master_separator_is_refused_through_the_challenge() {
    let mut m = oauth_machine();
    m.take_output();
    let payload = crate::sasl::encode_challenge(b"user=bob%master\x01auth=Bearer t\x01\x01");
    let run = drive(
        &mut m,
        &[
            format!("a AUTHENTICATE XOAUTH2 {payload}\r\n").as_bytes(),
            b"*\r\n",
        ],
        Some(Failure::Rejected),
    );
    assert_eq!(
        run.logins,
        vec![Err(Refusal::Identity(IdentityError::Separator))]
    );
    assert!(run.out.starts_with("+ ey"), "{}", run.out);
    assert!(run
        .out
        .ends_with("a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"));
}
