#[cfg(test)]
use super::*;
use crate::proto::imap::{BackendError, BackendEvent};
use crate::proto::prelogin::BackendMachine;
use crate::secret::Secret;
use proptest::prelude::*;

fn options(tls: bool) -> SmtpOptions {
    SmtpOptions {
        tls,
        starttls: !tls,
        allow_plaintext_auth: false,
        rules: IdentityRules::default(),
        sasl: crate::sasl::Offer::passwords(),
        max_auth_failures: 3,
        max_protocol_errors: 3,
        hostname: "mx.test".into(),
        keywords: Arc::new(client_keywords(&[
            "PIPELINING".into(),
            "SIZE 1000".into(),
            "AUTH PLAIN LOGIN".into(),
            "STARTTLS".into(),
            "8BITMIME".into(),
        ])),
    }
}

fn machine(tls: bool) -> SmtpPreAuth {
    let mut m = SmtpPreAuth::new(options(tls));
    m.greet();
    m.take_output();
    m
}

type Logins = Vec<Result<String, Refusal>>;

/// Output and logins for `chunks`; every login is answered with `answer`.
fn drive(
    m: &mut SmtpPreAuth,
    chunks: &[&[u8]],
    answer: Failure,
) -> (String, Logins, Option<Close>) {
    let t = crate::proto::prelogin::script(m, chunks, answer);
    (t.text(), t.usernames(), t.close)
}

#[test]
fn greeting_and_ehlo_mirror_the_backend_but_decide_auth_and_starttls() {
    let mut m = SmtpPreAuth::new(options(true));
    m.greet();
    assert_eq!(m.take_output(), b"220 mx.test ESMTP ready\r\n");
    let (out, _, _) = drive(&mut m, &[b"EHLO client.example\r\n"], Failure::Rejected);
    assert_eq!(
        out,
        "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n"
    );
    let (out, _, _) = drive(&mut machine(false), &[b"EHLO c\r\n"], Failure::Rejected);
    assert!(!out.contains("AUTH"), "{out}");
    assert!(out.ends_with("250 STARTTLS\r\n"), "{out}");
}

#[test]
fn keywords_filter() {
    let got = client_keywords(&[
        "AUTH=LOGIN PLAIN".into(),
        "auth plain".into(),
        "XCLIENT NAME ADDR".into(),
        "SIZE 10".into(),
        "size 10".into(),
        "BAD\u{7f}".into(),
        String::new(),
        "CHUNKING".into(),
    ]);
    assert_eq!(got, vec!["SIZE 10".to_string(), "CHUNKING".to_string()]);
}

#[test]
fn auth_plain_login_initial_response_and_cancel() {
    let mut m = machine(true);
    let (out, logins, _) = drive(
        &mut m,
        &[b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHB3\r\nAUTH PLAIN\r\nAGJvYgBwdw==\r\nAUTH LOGIN\r\nYm9i\r\n*\r\nAUTH LOGIN Ym9i\r\ncHc=\r\n"],
        Failure::Temporary,
    );
    assert_eq!(
        logins,
        vec![Ok("alice".into()), Ok("bob".into()), Ok("bob".into())]
    );
    assert_eq!(out.matches("454 4.7.0").count(), 3, "{out}");
    assert!(out.contains("334 \r\n"), "{out}");
    assert!(
        out.contains("334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n"),
        "{out}"
    );
    assert!(
        out.contains("501 5.0.0 Authentication cancelled\r\n"),
        "{out}"
    );
}

#[test]
fn mail_before_auth_is_refused_and_pipelined_mail_behind_failing_auth_too() {
    let mut m = machine(true);
    let (out, logins, close) = drive(
        &mut m,
        &[b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHdyb25n\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"],
        Failure::Rejected,
    );
    assert_eq!(logins.len(), 1);
    assert!(out.contains("535 5.7.8"), "{out}");
    assert_eq!(out.matches("530 5.7.0 Authentication required").count(), 3);
    assert_eq!(close, Some(Close::TooManyErrors));
    assert!(out.ends_with("421 4.7.0 mx.test Too many errors, closing connection\r\n"));
}

#[test]
fn pipelined_commands_behind_auth_are_held_for_the_backend() {
    let mut m = machine(true);
    m.feed(b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHB3\r\nMAIL FROM:<alice@x>\r\nRCPT TO:<b@y>\r\n");
    assert!(matches!(m.advance(), Event::Login { .. }));
    let out = m.take_output();
    assert!(!String::from_utf8_lossy(&out).contains("530"));
    assert!(matches!(m.advance(), Event::NeedInput));
    m.login_succeeded(&[]);
    assert_eq!(m.take_output(), b"235 2.7.0 Authentication successful\r\n");
    assert_eq!(
        m.take_leftover().unwrap(),
        b"MAIL FROM:<alice@x>\r\nRCPT TO:<b@y>\r\n"
    );
}

#[test]
fn plaintext_and_order_rules() {
    let (out, logins, _) = drive(
        &mut machine(false),
        &[b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHB3\r\n"],
        Failure::Rejected,
    );
    assert!(logins.is_empty());
    assert!(out.contains("538 5.7.11"), "{out}");
    let (out, logins, _) = drive(
        &mut machine(true),
        &[b"AUTH PLAIN AGFsaWNlAHB3\r\n"],
        Failure::Rejected,
    );
    assert!(logins.is_empty());
    assert!(out.contains("503 5.5.1 Send EHLO first"), "{out}");
    let (out, _, _) = drive(
        &mut machine(true),
        &[b"EHLO c\r\nAUTH CRAM-MD5\r\n"],
        Failure::Rejected,
    );
    assert!(out.contains("504 5.5.4"), "{out}");
    let (out, _, _) = drive(&mut machine(true), &[b"STARTTLS\r\n"], Failure::Rejected);
    assert!(out.contains("502 5.5.1"), "{out}");
}

#[test]
fn starttls_forgets_the_clear_text_and_refuses_pipelining() {
    let (_, _, close) = drive(
        &mut machine(false),
        &[b"EHLO c\r\nSTARTTLS\r\nAUTH PLAIN AGFsaWNlAHB3\r\n"],
        Failure::Rejected,
    );
    assert_eq!(close, Some(Close::PipelinedStartTls));
    let mut m = machine(false);
    let (out, _, _) = drive(&mut m, &[b"EHLO c\r\nSTARTTLS\r\n"], Failure::Rejected);
    assert!(out.ends_with("220 2.0.0 Ready to start TLS\r\n"));
    m.tls_started();
    let (out, logins, _) = drive(&mut m, &[b"AUTH PLAIN AGFsaWNlAHB3\r\n"], Failure::Rejected);
    assert!(logins.is_empty(), "EHLO must be sent again after TLS");
    assert!(out.contains("503"), "{out}");
    let (out, _, _) = drive(&mut m, &[b"EHLO c\r\n"], Failure::Rejected);
    assert!(
        out.contains("AUTH PLAIN LOGIN") && !out.contains("STARTTLS"),
        "{out}"
    );
}

#[test]
fn identity_failures_and_bdat() {
    let (out, logins, close) = drive(
        &mut machine(true),
        &[b"EHLO c\r\nAUTH PLAIN AGJvYiVtYXN0ZXIAcHc=\r\nAUTH PLAIN AGFsaWNlAHB3\r\nAUTH PLAIN AGFsaWNlAHB3\r\n"],
        Failure::Rejected,
    );
    assert_eq!(
        logins[0],
        Err(Refusal::Identity(crate::identity::IdentityError::Separator))
    );
    assert_eq!(out.matches("535 5.7.8").count(), 3);
    assert_eq!(close, Some(Close::TooManyFailures));
    let (out, _, close) = drive(
        &mut machine(true),
        &[b"EHLO c\r\nBDAT 5 LAST\r\nhello"],
        Failure::Rejected,
    );
    assert!(out.ends_with("530 5.7.0 Authentication required\r\n"));
    assert_eq!(close, Some(Close::TooManyErrors));
}

#[test]
fn long_lines_http_and_quit() {
    let long = format!("NOOP {}\r\n", "x".repeat(600));
    let (out, _, _) = drive(&mut machine(true), &[long.as_bytes()], Failure::Rejected);
    assert_eq!(out, "500 5.5.6 Line too long\r\n");
    let huge = vec![b'A'; 64 * 1024];
    let (out, _, _) = drive(
        &mut machine(true),
        &[&huge, b"\r\nNOOP\r\n"],
        Failure::Rejected,
    );
    assert_eq!(out, "500 5.5.6 Line too long\r\n250 2.0.0 OK\r\n");
    let (_, _, close) = drive(
        &mut machine(true),
        &[b"GET / HTTP/1.1\r\n"],
        Failure::Rejected,
    );
    assert_eq!(close, Some(Close::HttpOnMailPort));
    let (out, _, close) = drive(&mut machine(true), &[b"QUIT\r\n"], Failure::Rejected);
    assert_eq!(out, "221 2.0.0 mx.test Bye\r\n");
    assert_eq!(close, Some(Close::Logout));
}

#[test]
fn every_split_gives_the_same_result() {
    let t: &[u8] =
        b"EHLO c\r\nNOOP\r\nAUTH LOGIN\r\nYWxpY2U=\r\ncHc=\r\nAUTH PLAIN\r\n*\r\nRSET\r\nQUIT\r\n";
    let whole = drive(&mut machine(true), &[t], Failure::Rejected);
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
}

proptest! {
    #[test]
    fn arbitrary_input_never_panics_and_output_is_bounded(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..700), 0..8)
    ) {
        let mut m = machine(true);
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let (out, logins, _) = drive(&mut m, &refs, Failure::Rejected);
        prop_assert!(logins.len() <= 3);
        let input: usize = chunks.iter().map(Vec::len).sum();
        prop_assert!(out.len() <= 200 + 120 * (input + 1));
    }
}

fn ehlo_reply() -> &'static [u8] {
    b"250-backend.test\r\n250-PIPELINING\r\n250-SIZE 5000\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n"
}

#[test]
fn backend_login_plain() {
    let mut b = SmtpBackendLogin::login(
        "alice@example.org",
        "proxy",
        "%",
        &Secret::from("s"),
        "px",
        false,
    );
    b.feed(b"220 backend ESMTP\r\n");
    assert_eq!(b.advance(), BackendEvent::NeedInput);
    assert_eq!(b.take_output(), b"EHLO px\r\n");
    b.feed(ehlo_reply());
    assert_eq!(b.advance(), BackendEvent::NeedInput);
    assert_eq!(
        b.take_output(),
        format!(
            "AUTH PLAIN {}\r\n",
            sasl::encode_challenge(b"\0alice@example.org%proxy\0s")
        )
        .into_bytes()
    );
    b.feed(b"235 2.7.0 ok\r\n");
    match b.advance() {
        BackendEvent::LoggedIn(k) => assert_eq!(k[1], "SIZE 5000"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn backend_login_starttls_and_failures() {
    let mut b = SmtpBackendLogin::login("a", "p", "%", &Secret::from("s"), "px", true);
    b.feed(b"220-backend\r\n220 ESMTP\r\n");
    b.advance();
    b.take_output();
    b.feed(ehlo_reply());
    assert_eq!(b.advance(), BackendEvent::NeedInput);
    assert_eq!(b.take_output(), b"STARTTLS\r\n");
    b.feed(b"220 2.0.0 go\r\n");
    assert_eq!(b.advance(), BackendEvent::StartTls);
    b.tls_started();
    assert_eq!(b.take_output(), b"EHLO px\r\n");
    b.feed(ehlo_reply());
    assert_eq!(b.advance(), BackendEvent::NeedInput);
    assert!(b.take_output().starts_with(b"AUTH PLAIN "));
    b.feed(b"535 5.7.8 no\r\n");
    assert_eq!(
        b.advance(),
        BackendEvent::Failed(BackendError::LoginRefused)
    );

    let mut b = SmtpBackendLogin::login("a", "p", "%", &Secret::from("s"), "px", true);
    b.feed(b"220 x\r\n");
    b.advance();
    b.feed(ehlo_reply());
    b.advance();
    b.feed(b"220 go\r\n250 injected\r\n");
    assert_eq!(
        b.advance(),
        BackendEvent::Failed(BackendError::BytesAfterStartTls)
    );

    let mut b = SmtpBackendLogin::login("a", "p", "%", &Secret::from("s"), "px", false);
    b.feed(b"554 go away\r\n");
    assert_eq!(b.advance(), BackendEvent::Failed(BackendError::BadGreeting));
}

#[test]
fn probe_learns_keywords_and_quits() {
    let mut b = SmtpBackendLogin::probe("px", false);
    b.feed(b"220 x\r\n");
    b.advance();
    assert_eq!(b.take_output(), b"EHLO px\r\n");
    b.feed(ehlo_reply());
    let BackendEvent::LoggedIn(keywords) = b.advance() else {
        panic!("no keywords");
    };
    assert_eq!(b.take_output(), b"QUIT\r\n");
    assert_eq!(
        client_keywords(&keywords),
        vec!["PIPELINING".to_string(), "SIZE 5000".to_string()]
    );
}

#[test]
fn bearer_tokens_and_the_error_challenge() {
    let offer = crate::sasl::Offer::with_oauth(None);
    let mut m = SmtpPreAuth::new(SmtpOptions {
        sasl: offer.clone(),
        ..options(true)
    });
    m.greet();
    m.take_output();
    let xoauth2 = crate::sasl::encode_challenge(b"user=alice\x01auth=Bearer tok\x01\x01");
    let bearer = crate::sasl::encode_challenge(b"n,a=bob,\x01auth=Bearer t\x01\x01");
    let (out, logins, _) = drive(
        &mut m,
        &[
            b"EHLO c\r\n",
            format!("AUTH XOAUTH2 {xoauth2}\r\n").as_bytes(),
            b"AQ==\r\n",
            format!("AUTH OAUTHBEARER {bearer}\r\n").as_bytes(),
        ],
        Failure::Rejected,
    );
    assert!(
        out.contains("250 AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2\r\n"),
        "{out}"
    );
    assert_eq!(logins, vec![Ok("alice".into()), Ok("bob".into())]);
    let challenge = format!("334 {}\r\n", offer.oauth_error().unwrap());
    assert!(
        out.contains(&format!(
            "{challenge}535 5.7.8 Authentication credentials invalid\r\n"
        )),
        "{out}"
    );
    assert!(
        out.ends_with(&challenge),
        "waits for the client's answer: {out}"
    );
    // Not offered without OAuth.
    let mut m = machine(true);
    let (out, logins, _) = drive(
        &mut m,
        &[format!("EHLO c\r\nAUTH XOAUTH2 {xoauth2}\r\n").as_bytes()],
        Failure::Rejected,
    );
    assert!(out.contains("504 5.5.4"), "{out}");
    assert!(logins.is_empty());
}
