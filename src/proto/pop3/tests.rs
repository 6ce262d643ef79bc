#[cfg(test)]
use super::*;

fn machine(tls: bool) -> Pop3PreAuth {
    let mut m = Pop3PreAuth::new(Pop3Options {
        tls,
        starttls: !tls,
        allow_plaintext_auth: false,
        rules: IdentityRules::default(),
        sasl: crate::sasl::Offer::passwords(),
        max_auth_failures: 3,
        max_protocol_errors: 3,
    });
    m.greet();
    m.take_output();
    m
}

/// Output and logins for `chunks`; every login is answered with `answer`.
fn drive(
    m: &mut Pop3PreAuth,
    chunks: &[&[u8]],
    answer: Failure,
) -> (String, Vec<Result<String, Refusal>>, Option<Close>) {
    let t = crate::proto::prelogin::script(m, chunks, answer);
    (t.text(), t.usernames(), t.close)
}

#[test]
fn user_pass_and_auth_plain() {
    let mut m = machine(true);
    let (out, logins, _) = drive(
        &mut m,
        &[b"CAPA\r\nUSER alice\r\nPASS pw\r\nAUTH PLAIN AGJvYgBwdw==\r\nAUTH LOGIN\r\nYm9i\r\ncHc=\r\n"],
        Failure::Temporary,
    );
    assert!(out.contains("SASL PLAIN LOGIN\r\n") && out.contains("USER\r\n"));
    assert_eq!(
        logins,
        vec![Ok("alice".into()), Ok("bob".into()), Ok("bob".into())]
    );
    assert_eq!(out.matches("-ERR [SYS/TEMP]").count(), 3);
}

#[test]
fn plaintext_refused_before_stls_and_pipelining_closes() {
    let mut m = machine(false);
    let (out, logins, _) = drive(&mut m, &[b"CAPA\r\nUSER alice\r\n"], Failure::Rejected);
    assert!(out.contains("STLS\r\n") && !out.contains("SASL"));
    assert!(out.contains("-ERR [AUTH] Plaintext authentication disallowed"));
    assert!(logins.is_empty());
    let mut m = machine(false);
    let (_, _, close) = drive(&mut m, &[b"STLS\r\nUSER alice\r\n"], Failure::Rejected);
    assert_eq!(close, Some(Close::PipelinedStartTls));
}

#[test]
fn identity_and_failures() {
    let mut m = machine(true);
    let (out, logins, close) = drive(
        &mut m,
        &[b"USER bob%master\r\nPASS x\r\nUSER a\r\nPASS x\r\nUSER a\r\nPASS y\r\n"],
        Failure::Rejected,
    );
    assert_eq!(
        logins[0],
        Err(Refusal::Identity(crate::identity::IdentityError::Separator))
    );
    assert_eq!(
        out.matches("-ERR [AUTH] Authentication failed\r\n").count(),
        3
    );
    assert_eq!(close, Some(Close::TooManyFailures));
}

#[test]
fn long_lines_and_unknown_commands_count_as_errors() {
    let mut m = machine(true);
    let long = format!("NOOP {}\r\n", "x".repeat(600));
    let (out, _, close) = drive(
        &mut m,
        &[long.as_bytes(), b"RETR 1\r\nAPOP a b\r\n"],
        Failure::Rejected,
    );
    assert!(out.starts_with("-ERR Command line too long\r\n"), "{out}");
    assert_eq!(close, Some(Close::TooManyErrors));
}

#[test]
fn every_split_gives_the_same_result() {
    let t: &[u8] = b"CAPA\r\nAUTH PLAIN\r\nAGFsaWNlAHB3\r\nUSER bob\r\nPASS pw\r\nQUIT\r\n";
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

#[test]
fn backend_login() {
    let mut b = Pop3BackendLogin::new("alice@example.org", "proxy", "%", &Secret::from("s"), false);
    b.feed(b"+OK ready\r\n");
    assert_eq!(b.advance(), BackendEvent::NeedInput);
    let sent = b.take_output();
    assert_eq!(
        sent,
        format!(
            "AUTH PLAIN {}\r\n",
            sasl::encode_challenge(b"\0alice@example.org%proxy\0s")
        )
        .into_bytes()
    );
    b.feed(b"+OK Logged in.\r\n");
    assert_eq!(b.advance(), BackendEvent::LoggedIn(vec![]));
    let mut b = Pop3BackendLogin::new("a", "p", "%", &Secret::from("s"), false);
    b.feed(b"+OK\r\n-ERR [AUTH] no\r\n");
    assert_eq!(
        b.advance(),
        BackendEvent::Failed(BackendError::LoginRefused)
    );
}

#[test]
fn bearer_tokens_and_the_error_challenge() {
    let offer = crate::sasl::Offer::with_oauth(None);
    let mut m = Pop3PreAuth::new(Pop3Options {
        tls: true,
        starttls: false,
        allow_plaintext_auth: false,
        rules: IdentityRules::default(),
        sasl: offer.clone(),
        max_auth_failures: 2,
        max_protocol_errors: 3,
    });
    m.greet();
    m.take_output();
    let xoauth2 = crate::sasl::encode_challenge(b"user=alice\x01auth=Bearer tok\x01\x01");
    let (out, logins, close) = drive(
        &mut m,
        &[
            b"CAPA\r\nAUTH\r\n",
            format!("AUTH XOAUTH2 {xoauth2}\r\n").as_bytes(),
            b"AQ==\r\n",
            b"AUTH OAUTHBEARER\r\n",
            crate::sasl::encode_challenge(b"n,a=bob,\x01auth=Bearer t\x01\x01").as_bytes(),
            b"\r\n",
            b"AQ==\r\n",
        ],
        Failure::Rejected,
    );
    assert!(
        out.contains("SASL PLAIN LOGIN OAUTHBEARER XOAUTH2\r\n"),
        "{out}"
    );
    assert!(out.contains("+OK\r\nPLAIN\r\nLOGIN\r\nOAUTHBEARER\r\nXOAUTH2\r\n.\r\n"));
    assert_eq!(logins, vec![Ok("alice".into()), Ok("bob".into())]);
    let challenge = format!("+ {}\r\n", offer.oauth_error().unwrap());
    assert_eq!(out.matches(&challenge).count(), 2, "{out}");
    assert!(out.ends_with(&format!("{challenge}-ERR [AUTH] Authentication failed\r\n")));
    assert_eq!(close, Some(Close::TooManyFailures));
    // Without OAuth configured the mechanisms do not exist.
    let mut m = machine(true);
    let (out, logins, _) = drive(
        &mut m,
        &[format!("AUTH XOAUTH2 {xoauth2}\r\n").as_bytes()],
        Failure::Rejected,
    );
    assert!(out.starts_with("-ERR Unsupported"), "{out}");
    assert!(logins.is_empty());
}
