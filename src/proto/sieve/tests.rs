#[cfg(test)]
use super::*;
use crate::identity::IdentityError;
use crate::proto::imap::{BackendError, BackendEvent};
use crate::proto::prelogin::BackendMachine;
use crate::secret::Secret;
use crate::splice::{Downstream, Upstream};
use proptest::prelude::*;

fn options(tls: bool) -> SieveOptions {
    SieveOptions {
        tls,
        starttls: !tls,
        allow_plaintext_auth: false,
        rules: IdentityRules::default(),
        sasl: crate::sasl::Offer::passwords(),
        max_auth_failures: 3,
        max_protocol_errors: 3,
        capabilities: default_capabilities(),
    }
}

fn machine(tls: bool) -> SievePreAuth {
    let mut m = SievePreAuth::new(options(tls));
    m.greet();
    m.take_output();
    m
}

type Login = Result<(String, Vec<u8>), Refusal>;

/// Output, logins and how it ended for `chunks`; every login is answered with `answer`.
fn drive(
    m: &mut SievePreAuth,
    chunks: &[&[u8]],
    answer: Failure,
) -> (String, Vec<Login>, Option<Close>) {
    let t = crate::proto::prelogin::script(m, chunks, answer);
    let logins = t
        .attempts
        .iter()
        .map(|a| {
            a.as_ref()
                .map(|c| (c.username.clone(), c.secret.expose().to_vec()))
                .map_err(Clone::clone)
        })
        .collect();
    (t.text(), logins, t.close)
}

fn ok_login(user: &str, pw: &str) -> Login {
    Ok((user.into(), pw.as_bytes().to_vec()))
}

#[test]
fn greeting_lists_capabilities_and_never_mirrors_what_the_proxy_decides() {
    let mut opts = options(false);
    opts.capabilities = vec![
        ("SIEVE".into(), Some("fileinto vacation".into())),
        ("SASL".into(), Some("PLAIN OAUTHBEARER".into())),
        ("starttls".into(), None),
        ("UNAUTHENTICATE".into(), None),
        ("OWNER".into(), Some("bob".into())),
        ("IMPLEMENTATION".into(), Some("Stalwart".into())),
        ("MAXREDIRECTS".into(), Some("4".into())),
        ("BAD NAME".into(), None),
        ("EVIL".into(), Some("a\r\nOK".into())),
    ];
    let mut m = SievePreAuth::new(opts);
    m.greet();
    let g = String::from_utf8(m.take_output()).unwrap();
    assert_eq!(
        g,
        "\"IMPLEMENTATION\" \"Portcullis\"\r\n\"SASL\" \"\"\r\n\"SIEVE\" \"fileinto vacation\"\r\n\
         \"MAXREDIRECTS\" \"4\"\r\n\"STARTTLS\"\r\n\"VERSION\" \"1.0\"\r\nOK \"ManageSieve server ready\"\r\n"
    );
    let mut m = machine(true);
    m.feed(b"CAPABILITY\r\n");
    assert!(matches!(m.advance(), Event::NeedInput));
    let caps = String::from_utf8(m.take_output()).unwrap();
    assert!(caps.contains("\"SASL\" \"PLAIN LOGIN\"\r\n"), "{caps}");
    assert!(caps.contains("\"NOTIFY\" \"mailto\"\r\n"), "{caps}");
    assert!(!caps.contains("STARTTLS"), "{caps}");
    assert!(caps.ends_with("OK \"Capability completed\"\r\n"), "{caps}");
}

#[test]
fn authenticate_plain_and_login_with_strings_and_literals() {
    let mut m = machine(true);
    let (out, logins, _) = drive(
        &mut m,
        &[
            b"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHB3\"\r\n",
            b"authenticate \"plain\" {12+}\r\nAGJvYgBwdzI=\r\n",
            b"AUTHENTICATE \"PLAIN\" {12}\nAGNhcmwAcHcz\n",
            b"AUTHENTICATE \"PLAIN\"\r\n\"AGRhdmUAcHc0\"\r\n",
            b"AUTHENTICATE {5+}\r\nLOGIN\r\n{4+}\r\nZXZl\r\n\"cHc1\"\r\n",
            b"AUTHENTICATE \"LOGIN\" \"ZnJhbms=\"\r\n\"cHc2\"\r\n",
        ],
        Failure::Temporary,
    );
    assert_eq!(
        logins,
        vec![
            ok_login("alice", "pw"),
            ok_login("bob", "pw2"),
            ok_login("carl", "pw3"),
            ok_login("dave", "pw4"),
            ok_login("eve", "pw5"),
            ok_login("frank", "pw6"),
        ]
    );
    // Challenges are strings: empty for PLAIN, the two prompts for LOGIN.
    assert!(out.contains("\r\n\"\"\r\n"), "{out}");
    assert!(
        out.contains("\"VXNlcm5hbWU6\"\r\n\"UGFzc3dvcmQ6\"\r\n"),
        "{out}"
    );
    assert_eq!(
        out.matches("NO (TRYLATER) \"Authentication service temporarily unavailable\"\r\n")
            .count(),
        6
    );
}

#[test]
fn cancel_and_bad_sasl_responses() {
    let mut m = machine(true);
    let (out, logins, close) = drive(
        &mut m,
        &[b"AUTHENTICATE \"PLAIN\"\r\n\"*\"\r\nAUTHENTICATE \"LOGIN\"\r\n*\r\nNOOP\r\n"],
        Failure::Rejected,
    );
    assert!(logins.is_empty());
    assert_eq!(
        out.matches("NO \"Authentication cancelled\"\r\n").count(),
        2
    );
    assert!(out.ends_with("OK \"NOOP completed\"\r\n"), "{out}");
    assert_eq!(close, None);
    let mut m = machine(true);
    let (out, _, close) = drive(
        &mut m,
        &[b"AUTHENTICATE \"PLAIN\" \"!!\"\r\nAUTHENTICATE \"PLAIN\"\r\nNOOP\r\nAUTHENTICATE \"PLAIN\" \"Ym9iAGFsaWNlAHB3\"\r\n"],
        Failure::Rejected,
    );
    assert_eq!(out.matches("NO \"Invalid SASL response\"\r\n").count(), 2);
    assert!(out.contains("NO \"Authorization identity refused\"\r\nBYE"));
    assert_eq!(close, Some(Close::TooManyErrors));
}

#[test]
fn plaintext_auth_is_refused_before_starttls_and_pipelining_closes() {
    let mut m = machine(false);
    let (out, logins, _) = drive(
        &mut m,
        &[b"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHB3\"\r\n"],
        Failure::Rejected,
    );
    assert!(logins.is_empty());
    assert_eq!(
        out,
        "NO (ENCRYPT-NEEDED) \"Authentication requires TLS; use STARTTLS\"\r\n"
    );
    let mut m = machine(false);
    m.feed(b"STARTTLS\r\nAUTHENTICATE \"PLAIN\" \"AGFsaWNlAHB3\"\r\n");
    assert!(matches!(
        m.advance(),
        Event::Close(Close::PipelinedStartTls)
    ));
    assert!(m.take_output().is_empty());
    let mut m = machine(false);
    m.feed(b"StartTLS\r\n");
    assert!(matches!(m.advance(), Event::StartTls));
    assert_eq!(m.take_output(), b"OK \"Begin TLS negotiation now\"\r\n");
    m.tls_started();
    let caps = String::from_utf8(m.take_output()).unwrap();
    assert!(caps.contains("\"SASL\" \"PLAIN LOGIN\"") && !caps.contains("STARTTLS\""));
    assert!(caps.ends_with("OK \"TLS negotiation successful\"\r\n"));
    let (out, logins, _) = drive(
        &mut m,
        &[b"STARTTLS\r\nAUTHENTICATE \"PLAIN\" \"AGFsaWNlAHB3\"\r\n"],
        Failure::Rejected,
    );
    assert!(
        out.starts_with("NO \"STARTTLS not available\"\r\n"),
        "{out}"
    );
    assert_eq!(logins, vec![ok_login("alice", "pw")]);
}

#[test]
fn noop_echoes_its_tag_and_logout_closes() {
    let mut m = machine(true);
    let (out, _, close) = drive(
        &mut m,
        &[b"NOOP \"STARTTLS-SYNC-42\"\r\nNOOP \"a\\\"b\\\\\"\r\nNOOP {3+}\r\na\r\n\r\nLOGOUT\r\n"],
        Failure::Rejected,
    );
    assert_eq!(
        out,
        "OK (TAG \"STARTTLS-SYNC-42\") \"Done\"\r\nOK (TAG \"a\\\"b\\\\\") \"Done\"\r\n\
         OK (TAG {3}\r\na\r\n) \"Done\"\r\nOK \"Logout completed\"\r\n"
    );
    assert_eq!(close, Some(Close::Logout));
}

#[test]
fn other_commands_are_refused_and_errors_close() {
    let mut m = machine(true);
    let (out, _, close) = drive(
        &mut m,
        &[b"LISTSCRIPTS\r\nUNAUTHENTICATE\r\nNOOP \"a\\x\"\r\nCAPABILITY\r\n"],
        Failure::Rejected,
    );
    assert_eq!(
        out,
        "NO \"Authenticate first\"\r\nNO \"Authenticate first\"\r\nNO \"Invalid command syntax\"\r\n\
         BYE \"Too many invalid commands\"\r\n"
    );
    assert_eq!(close, Some(Close::TooManyErrors));
    let mut m = machine(true);
    let (out, _, _) = drive(&mut m, &[b"XYZZY\r\nNOOP a\r\n"], Failure::Rejected);
    assert_eq!(
        out,
        "NO \"Unknown command\"\r\nNO \"Invalid arguments\"\r\n"
    );
    let mut m = machine(true);
    let (_, _, close) = drive(
        &mut m,
        &[b"GET / HTTP/1.1\r\nHost: x\r\n"],
        Failure::Rejected,
    );
    assert_eq!(close, Some(Close::HttpOnMailPort));
}

#[test]
fn long_lines_and_large_literals() {
    let mut m = machine(true);
    let mut long = b"NOOP \"".to_vec();
    long.extend(std::iter::repeat_n(b'x', LINE_MAX + 10));
    long.extend_from_slice(b"\" {5+}\r\nABCDE\r\nNOOP\r\n");
    let (out, _, close) = drive(&mut m, &[&long], Failure::Rejected);
    assert_eq!(out, "NO \"Line too long\"\r\nOK \"NOOP completed\"\r\n");
    assert_eq!(close, None);
    // A synchronizing literal over the bound is refused unread and the session goes on.
    let mut m = machine(true);
    let (out, _, close) = drive(
        &mut m,
        &[b"AUTHENTICATE \"PLAIN\" {9000}\r\n", b"NOOP\r\n"],
        Failure::Rejected,
    );
    assert_eq!(out, "NO \"Literal too large\"\r\nOK \"NOOP completed\"\r\n");
    assert_eq!(close, None);
    // Whatever follows the announcement is the next command, however it was split (found by
    // fuzzing: a reset once dropped what had already arrived).
    let one_chunk = drive(
        &mut machine(true),
        &[b"AUTHENTICATE \"PLAIN\" {9000}\r\nNOOP\r\n"],
        Failure::Rejected,
    );
    assert_eq!(one_chunk, (out, vec![], None));
    // A non-synchronizing one is on its way: refuse and close.
    let mut m = machine(true);
    let (out, _, close) = drive(
        &mut m,
        &[b"AUTHENTICATE \"PLAIN\" {4294967296+}\r\nxxxx"],
        Failure::Rejected,
    );
    assert_eq!(
        out,
        "NO \"Literal too large\"\r\nBYE \"Literal too large\"\r\n"
    );
    assert_eq!(close, Some(Close::LiteralTooLarge));
}

#[test]
fn failures_identity_and_temporary() {
    let mut m = machine(true);
    let (out, logins, close) = drive(
        &mut m,
        &[
            b"AUTHENTICATE \"PLAIN\" \"AGJvYiVtYXN0ZXIAcHc=\"\r\n",
            b"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHB3\"\r\n",
            b"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHB3\"\r\n",
        ],
        Failure::Rejected,
    );
    assert_eq!(logins[0], Err(Refusal::Identity(IdentityError::Separator)));
    assert_eq!(out.matches("NO \"Authentication failed\"\r\n").count(), 3);
    assert!(out.ends_with("BYE \"Too many authentication failures\"\r\n"));
    assert_eq!(close, Some(Close::TooManyFailures));
}

#[test]
fn bytes_after_authenticate_are_held_for_the_backend() {
    let mut m = machine(true);
    m.feed(b"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHB3\"\r\nPUTSCRIPT \"a\" {4+}\r\nkeep");
    assert!(matches!(m.advance(), Event::Login { .. }));
    // Nothing is read while the login is checked.
    assert!(matches!(m.advance(), Event::NeedInput));
    m.login_succeeded(&["SIEVE fileinto".into()]);
    assert_eq!(m.take_output(), b"OK \"Logged in\"\r\n");
    assert_eq!(
        m.take_leftover().unwrap(),
        b"PUTSCRIPT \"a\" {4+}\r\nkeep".to_vec()
    );
}

#[test]
fn timeout_and_shutdown_say_bye() {
    let mut m = machine(true);
    m.timed_out();
    assert_eq!(m.take_output(), b"BYE \"Disconnected for inactivity\"\r\n");
    let mut m = machine(true);
    assert!(matches!(m.shutdown(), Event::Close(Close::Shutdown)));
    assert!(m.take_output().starts_with(b"BYE (TRYLATER)"));
}

#[test]
fn every_split_gives_the_same_result() {
    let t: &[u8] =
        b"CAPABILITY\r\nNOOP {2+}\r\nab\r\nAUTHENTICATE \"PLAIN\"\r\n{12+}\r\nAGFsaWNlAHB3\r\n\
AUTHENTICATE \"LOGIN\" \"Ym9i\"\r\n\"cHc=\"\r\nXYZ\r\nLOGOUT\r\n";
    let whole = drive(&mut machine(true), &[t], Failure::Rejected);
    assert_eq!(whole.1.len(), 2);
    for cut in 0..t.len() {
        assert_eq!(
            drive(
                &mut machine(true),
                &[&t[..cut], &t[cut..]],
                Failure::Rejected
            ),
            whole,
            "cut {cut}"
        );
    }
    let bytes: Vec<&[u8]> = t.chunks(1).collect();
    assert_eq!(drive(&mut machine(true), &bytes, Failure::Rejected), whole);
}

proptest! {
    #[test]
    fn arbitrary_input_never_panics_and_output_is_bounded(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        cut in 0usize..3000,
    ) {
        let cut = cut.min(data.len());
        let whole = drive(&mut machine(true), &[&data], Failure::Rejected);
        prop_assert_eq!(&whole, &drive(&mut machine(true), &[&data[..cut], &data[cut..]], Failure::Rejected));
        prop_assert!(whole.0.len() <= 2048 + 64 * data.len());
        // Cleartext never yields credentials.
        prop_assert!(drive(&mut machine(false), &[&data], Failure::Rejected).1.is_empty());
    }

    #[test]
    fn leftover_is_bounded(data in proptest::collection::vec(any::<u8>(), 0..20000)) {
        let mut m = machine(true);
        m.feed(b"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHB3\"\r\n");
        m.feed(&data);
        let login = matches!(m.advance(), Event::Login { .. });
        prop_assert!(login);
        if let Some(rest) = m.take_leftover() {
            prop_assert!(rest.len() <= LINE_MAX + STRING_MAX);
            prop_assert_eq!(rest, data);
        }
    }
}

// --- backend ---------------------------------------------------------------------------

const DOVECOT_GREETING: &[u8] = b"\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"\r\n\
\"SIEVE\" \"fileinto reject envelope\"\r\n\"NOTIFY\" \"mailto\"\r\n\"SASL\" \"PLAIN LOGIN\"\r\n\
\"STARTTLS\"\r\n\"VERSION\" \"1.0\"\r\nOK \"Dovecot ready.\"\r\n";

#[test]
fn capability_response_parser() {
    let r = parse_capability_response(DOVECOT_GREETING)
        .unwrap()
        .unwrap();
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.consumed, DOVECOT_GREETING.len());
    assert_eq!(r.capabilities.len(), 6);
    assert_eq!(
        r.capabilities[1],
        ("SIEVE".into(), Some("fileinto reject envelope".into()))
    );
    assert_eq!(r.capabilities[4], ("STARTTLS".into(), None));
    let lit =
        parse_capability_response(b"\"SIEVE\" {8}\r\nfileinto\r\nNO (TRYLATER) {3}\r\nbye\r\n")
            .unwrap()
            .unwrap();
    assert_eq!(
        lit.capabilities,
        vec![("SIEVE".into(), Some("fileinto".into()))]
    );
    assert_eq!(lit.status, Status::No);
    assert_eq!(parse_capability_response(b"\"SIEVE\" \"x\"\r\nO"), Ok(None));
    assert!(parse_capability_response(b"* OK IMAP ready\r\n").is_err());
    assert!(parse_capability_response(b"\"A\" \"b\" \"c\"\r\nOK\r\n").is_err());
}

fn caps_strategy() -> impl Strategy<Value = Vec<Capability>> {
    proptest::collection::vec(
        (
            "[A-Z][A-Z0-9-]{0,15}",
            proptest::option::of("[ -~]{0,40}|.{0,8}"),
        ),
        0..10,
    )
}

proptest! {
    #[test]
    fn capability_response_round_trips(caps in caps_strategy(), cut in 0usize..2000) {
        let mut wire = Vec::new();
        for (n, v) in &caps {
            push_string(&mut wire, n.as_bytes());
            if let Some(v) = v {
                wire.push(b' ');
                push_string(&mut wire, v.as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"OK\r\n");
        let r = parse_capability_response(&wire).unwrap().unwrap();
        prop_assert_eq!(&r.capabilities, &caps);
        prop_assert_eq!(r.consumed, wire.len());
        let strings: Vec<Capability> = caps.iter().map(|c| capability_from_string(&capability_to_string(c))).collect();
        prop_assert_eq!(strings, caps);
        // A prefix is incomplete, never a different answer.
        let cut = cut.min(wire.len() - 1);
        prop_assert_eq!(parse_capability_response(&wire[..cut]), Ok(None));
    }

    #[test]
    fn capability_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = parse_capability_response(&data);
    }
}

fn plain(raw: &[u8]) -> String {
    sasl::encode_challenge(raw)
}

#[test]
fn backend_login_with_and_without_starttls() {
    let secret = Secret::from("s");
    let mut b = SieveBackendLogin::new("alice@example.org", "proxy", "%", &secret, false);
    b.feed(&DOVECOT_GREETING[..20]);
    assert_eq!(b.advance(), BackendEvent::NeedInput);
    b.feed(&DOVECOT_GREETING[20..]);
    assert_eq!(b.advance(), BackendEvent::NeedInput);
    assert_eq!(
        b.take_output(),
        format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
            plain(b"\0alice@example.org%proxy\0s")
        )
        .into_bytes()
    );
    b.feed(b"OK (SASL \"cnNwYXV0aD1lYTQwZjYwMzM1YzQyN2I1NTI3Yjg0ZGJhYmNkZmZmZA==\") \"Logged in.\"\r\n");
    match b.advance() {
        BackendEvent::LoggedIn(caps) => {
            assert!(caps.contains(&"SIEVE fileinto reject envelope".to_owned()));
        }
        other => panic!("{other:?}"),
    }

    let mut b = SieveBackendLogin::new("a", "p", "%", &secret, true);
    b.feed(DOVECOT_GREETING);
    assert_eq!(b.advance(), BackendEvent::NeedInput);
    assert_eq!(b.take_output(), b"STARTTLS\r\n");
    b.feed(b"OK \"Begin TLS negotiation now.\"\r\n");
    assert_eq!(b.advance(), BackendEvent::StartTls);
    b.tls_started();
    assert_eq!(b.advance(), BackendEvent::NeedInput);
    assert!(b.take_output().is_empty());
    b.feed(b"\"IMPLEMENTATION\" \"x\"\r\n\"SIEVE\" \"vacation\"\r\nOK\r\n");
    assert_eq!(b.advance(), BackendEvent::NeedInput);
    assert!(b.take_output().starts_with(b"AUTHENTICATE \"PLAIN\" \""));
    b.feed(b"NO \"Authentication failed.\"\r\n");
    assert_eq!(
        b.advance(),
        BackendEvent::Failed(BackendError::LoginRefused)
    );
}

#[test]
fn misbehaving_backends_abort_the_login() {
    let secret = Secret::from("s");
    let run = |starttls: bool, input: &[u8]| {
        let mut b = SieveBackendLogin::new("a", "p", "%", &secret, starttls);
        b.feed(input);
        loop {
            match b.advance() {
                BackendEvent::StartTls => b.tls_started(),
                BackendEvent::NeedInput => return BackendEvent::NeedInput,
                other => return other,
            }
        }
    };
    assert_eq!(
        run(false, b"BYE \"go away\"\r\n"),
        BackendEvent::Failed(BackendError::BadGreeting)
    );
    assert_eq!(
        run(false, b"* OK IMAP\r\n"),
        BackendEvent::Failed(BackendError::Protocol)
    );
    assert_eq!(
        run(true, b"OK\r\nOK\r\n\"SASL\" \"PLAIN\"\r\n"),
        BackendEvent::Failed(BackendError::BytesAfterStartTls)
    );
    assert_eq!(
        run(true, b"OK\r\nNO\r\n"),
        BackendEvent::Failed(BackendError::StartTlsRefused)
    );
    assert_eq!(
        run(false, b"OK\r\n\"\"\r\n"),
        BackendEvent::Failed(BackendError::Protocol)
    );
}

#[test]
fn probe_learns_capabilities_and_logs_out() {
    let mut p = SieveProbe::new();
    p.feed(DOVECOT_GREETING);
    let BackendEvent::LoggedIn(caps) = p.advance() else {
        panic!("no capabilities");
    };
    assert_eq!(p.take_output(), b"LOGOUT\r\n");
    let caps: Vec<Capability> = caps.iter().map(|c| capability_from_string(c)).collect();
    assert!(caps.contains(&("NOTIFY".into(), Some("mailto".into()))));
    let mut p = SieveProbe::new();
    p.feed(b"NO \"busy\"\r\n");
    assert_eq!(p.advance(), BackendEvent::Failed(BackendError::BadGreeting));
}

// --- splice ----------------------------------------------------------------------------

fn up(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
    let (mut u, _) = splice_filters();
    let (mut fwd, mut abort) = (Vec::new(), false);
    for c in chunks {
        let o = Upstream::push(&mut u, c);
        assert!(o.replies.is_empty());
        fwd.extend(o.forward);
        abort |= o.abort;
    }
    (fwd, abort)
}

#[test]
fn refused_commands_become_noop_and_their_answer_is_replaced_in_order() {
    let (mut u, mut d) = splice_filters();
    let o = Upstream::push(
        &mut u,
        b"LISTSCRIPTS\r\nUNAUTHENTICATE\r\nAuthenticate \"PLAIN\" {4+}\r\nAAAA\r\nXLIST\r\nNOOP\r\n",
    );
    assert!(!o.abort);
    assert_eq!(
        o.forward,
        b"LISTSCRIPTS\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n".to_vec()
    );
    let mut out = Vec::new();
    d.push(
        b"\"UNAUTHENTICATE\"\r\n\"b\" ACTIVE\r\nOK \"Listscripts completed.\"\r\nOK \"NOOP\"\r\nOK \"NOOP\"\r\n",
        &mut out,
    );
    d.push(b"OK \"NOOP\"\r\nOK \"NOOP completed.\"\r\n", &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "\"UNAUTHENTICATE\"\r\n\"b\" ACTIVE\r\nOK \"Listscripts completed.\"\r\n\
         NO \"UNAUTHENTICATE is not allowed\"\r\nNO \"Already authenticated\"\r\n\
         NO \"Unknown command\"\r\nOK \"NOOP completed.\"\r\n"
    );
    assert!(d.at_boundary());
}

#[test]
fn capability_responses_lose_unauthenticate() {
    let (mut u, mut d) = splice_filters();
    let o = Upstream::push(&mut u, b"CAPABILITY\r\nGETSCRIPT \"x\"\r\n");
    assert_eq!(o.forward, b"CAPABILITY\r\nGETSCRIPT \"x\"\r\n".to_vec());
    let script = b"\"UNAUTHENTICATE\"\r\nOK\r\n";
    let mut getscript = format!("{{{}}}\r\n", script.len()).into_bytes();
    getscript.extend_from_slice(script);
    getscript.extend_from_slice(b"\r\nOK \"Getscript completed.\"\r\n");
    let mut input =
        b"\"IMPLEMENTATION\" \"S\"\r\n\"unauthenticate\"\r\n\"VERSION\" \"1.0\"\r\nOK\r\n".to_vec();
    input.extend_from_slice(&getscript);
    let mut out = Vec::new();
    for b in &input {
        d.push(std::slice::from_ref(b), &mut out);
    }
    let mut expected = b"\"IMPLEMENTATION\" \"S\"\r\n\"VERSION\" \"1.0\"\r\nOK\r\n".to_vec();
    expected.extend_from_slice(&getscript);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        String::from_utf8(expected).unwrap()
    );
    assert!(d.at_boundary());
}

#[test]
fn literal_bytes_are_never_commands_and_sync_literals_go_non_sync() {
    let mut input = b"PUTSCRIPT \"s\" {18+}\r\nUNAUTHENTICATE\r\n\r\n\r\n".to_vec();
    input.extend_from_slice(b"CHECKSCRIPT {5}\r\nkeep;\r\nHAVESPACE \"s\" 100\r\n");
    let (fwd, abort) = up(&[&input]);
    assert!(!abort);
    let expected = String::from_utf8(input.clone())
        .unwrap()
        .replace("{5}", "{5+}");
    assert_eq!(String::from_utf8(fwd).unwrap(), expected);
}

#[test]
fn empty_lines_are_dropped() {
    assert_eq!(up(&[b"\r\n\nNOOP\r\n\r\n"]), (b"NOOP\r\n".to_vec(), false));
}

#[test]
fn malformed_commands_end_the_session() {
    for bad in [
        &b"NOOP x\r\n"[..],
        b"NOOP \"a\" \"b\"\r\n",
        b"GETSCRIPT\r\n",
        b"HAVESPACE \"s\" \"100\"\r\n",
        b"NOOP \"\xff\"\r\n",
        b"NOOP {1+}\r\n\xff\r\n",
        b"NOOP \"a\\n\"\r\n",
        b"NOOP \"a\rb\"\r\n",
        b"NOOP {x}\r\n",
        b"NOOP {1}x\r\n",
        b"NOOP \"a\"x\r\n",
        b"NOOP\rx",
        b"NO-OP\r\n",
        b" NOOP\r\n",
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJ\r\n",
    ] {
        let (_, abort) = up(&[bad]);
        assert!(abort, "{:?}", String::from_utf8_lossy(bad));
    }
    let mut long = b"GETSCRIPT \"".to_vec();
    long.extend(std::iter::repeat_n(b'a', 5000));
    assert!(up(&[&long]).1);
    // Once aborted, nothing more is forwarded.
    let (mut u, _) = splice_filters();
    assert!(Upstream::push(&mut u, b"NOOP x\r\n").abort);
    let o = Upstream::push(&mut u, b"NOOP\r\n");
    assert!(o.abort && o.forward.is_empty());
}

#[test]
fn refused_commands_with_literals_are_dropped_whole() {
    let (fwd, abort) = up(&[b"UNAUTHENTICATE {16+}\r\nDELETESCRIPT \"a\"\r\n\r\nNOOP\r\n"]);
    assert!(!abort);
    assert_eq!(fwd, b"NOOP\r\nNOOP\r\n".to_vec());
}

#[test]
fn upstream_every_split_gives_the_same_result() {
    let input: &[u8] = b"PUTSCRIPT \"a\" {10}\r\n0123456789\r\nUNAUTHENTICATE\r\n\r\nSETACTIVE {1+}\r\na\r\nHAVESPACE \"b\" 77\r\nLOGOUT\r\n";
    let whole = up(&[input]);
    assert!(!whole.1);
    for cut in 0..input.len() {
        assert_eq!(up(&[&input[..cut], &input[cut..]]), whole, "cut {cut}");
    }
}

#[test]
fn invalid_utf8_in_a_literal_aborts_at_the_same_byte_whatever_the_split() {
    // Found by fuzzing: the valid head of the literal used to be forwarded only when it arrived
    // in an earlier read.
    let input: &[u8] = b"PUTSCRIPT \"s\" {16}\r\nUNANAUTH\xb4\xb1\xab\xb6CATE\r\n";
    let whole = up(&[input]);
    assert!(whole.1);
    assert!(whole.0.ends_with(b"{16+}\r\nUNANAUTH"));
    for cut in 0..input.len() {
        assert_eq!(up(&[&input[..cut], &input[cut..]]), whole, "cut {cut}");
    }
}

#[test]
fn bye_for_a_refused_command_passes_through() {
    let (mut u, mut d) = splice_filters();
    Upstream::push(&mut u, b"UNAUTHENTICATE\r\n");
    let mut out = Vec::new();
    d.push(b"BYE \"Server shutting down\"\r\n", &mut out);
    assert_eq!(out, b"BYE \"Server shutting down\"\r\n");
}

proptest! {
    #[test]
    fn upstream_never_panics_and_is_split_independent(
        data in proptest::collection::vec(any::<u8>(), 0..2000),
        cut in 0usize..2000,
    ) {
        let cut = cut.min(data.len());
        let whole = up(&[&data]);
        prop_assert_eq!(&whole, &up(&[&data[..cut], &data[cut..]]));
        prop_assert!(whole.0.len() <= 3 * data.len());
    }

    #[test]
    fn upstream_forwards_well_formed_commands_unchanged(
        names in proptest::collection::vec("[a-z0-9 .-]{1,20}", 1..8),
        script in "[ -~\r\n]{0,200}",
    ) {
        let mut input = Vec::new();
        for n in &names {
            input.extend_from_slice(b"GETSCRIPT ");
            push_string(&mut input, n.as_bytes());
            input.extend_from_slice(b"\r\n");
        }
        input.extend(format!("PUTSCRIPT \"x\" {{{}+}}\r\n{script}\r\n", script.len()).as_bytes());
        prop_assert_eq!(up(&[&input]), (input.clone(), false));
    }

    #[test]
    fn downstream_passes_everything_when_nothing_was_asked(
        data in proptest::collection::vec(any::<u8>(), 0..4000),
        cut in 0usize..4000,
    ) {
        let cut = cut.min(data.len());
        let (_, mut d) = splice_filters();
        let mut out = Vec::new();
        d.push(&data[..cut], &mut out);
        d.push(&data[cut..], &mut out);
        prop_assert!(data.starts_with(&out));
    }
}

#[test]
fn bearer_tokens_and_the_error_challenge() {
    let offer = crate::sasl::Offer::with_oauth(None);
    let mut m = SievePreAuth::new(SieveOptions {
        sasl: offer.clone(),
        ..options(true)
    });
    m.greet();
    let greeting = String::from_utf8(m.take_output()).unwrap();
    assert!(
        greeting.contains("\"SASL\" \"PLAIN LOGIN OAUTHBEARER XOAUTH2\""),
        "{greeting}"
    );
    let bearer = crate::sasl::encode_challenge(b"n,a=bob,\x01auth=Bearer t\x01\x01");
    let (out, logins, _) = drive(
        &mut m,
        &[
            format!("AUTHENTICATE \"OAUTHBEARER\" \"{bearer}\"\r\n").as_bytes(),
            b"\"AQ==\"\r\n",
        ],
        Failure::Rejected,
    );
    assert_eq!(logins, vec![Ok(("bob".into(), b"t".to_vec()))]);
    assert_eq!(
        out,
        format!(
            "\"{}\"\r\nNO \"Authentication failed\"\r\n",
            offer.oauth_error().unwrap()
        )
    );
}
