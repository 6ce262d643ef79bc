//! Proves the harness against real Dovecot: master logins on every protocol,
//! the SMTP sink, parallel instances, clean shutdown and the auth_http server;
//! and the OpenID provider's device flow, userinfo, introspection and JWTs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::authhttp::{nginx_escape, nginx_unescape, AuthHttpServer, Failure, Mode};
use common::clients::Client;
use common::dovecot::{reap_stale_instances, Dovecot, DEFAULT_MASTER_SECRET, MASTER_USER};
use common::oidc::{OidcProvider, CLIENT_ID, MAIL_RESOURCE};
use common::ports::{free_port, wait_for_port, wait_for_port_closed};

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";

fn master_login(user: &str) -> String {
    format!("{user}%{MASTER_USER}")
}

#[test]
fn imap_master_login_select_append_fetch() {
    let dovecot = Dovecot::start();
    let run = Client::imap(dovecot.imap_port())
        .login(&master_login(ALICE), dovecot.master_secret())
        .message("Subject: via master\r\n\r\nappended through the master login\r\n")
        .actions(&["select", "append", "fetch", "idle", "logout"])
        .run();
    run.assert_ok();
    assert!(run
        .fetched()
        .unwrap()
        .contains("appended through the master login"));
    assert!(run.list("capabilities").contains(&"AUTH=PLAIN".to_string()));
    assert!(run
        .list("post_login_capabilities")
        .contains(&"IDLE".to_string()));
    assert!(
        !run.stdout.contains(DEFAULT_MASTER_SECRET),
        "client printed the secret"
    );
    assert!(dovecot.saw_master_login(ALICE), "{}", dovecot.log());
    assert_eq!(dovecot.master_logins(BOB), 0);
    assert_eq!(dovecot.message_count(ALICE, "INBOX"), 1);
    let login = dovecot
        .logins()
        .into_iter()
        .find(|r| r.user == ALICE)
        .unwrap();
    assert_eq!(login.service, "imap");
    assert_eq!(login.master_user(), Some(MASTER_USER));
    assert!(!dovecot.log().contains(DEFAULT_MASTER_SECRET));
}

#[test]
fn imap_direct_login_is_not_a_master_login() {
    let dovecot = Dovecot::start();
    Client::imap(dovecot.imap_port())
        .login(ALICE, dovecot.password_of(ALICE))
        .actions(&["select", "logout"])
        .run()
        .assert_ok();
    assert!(dovecot.saw_direct_login(ALICE), "{}", dovecot.log());
    assert_eq!(dovecot.master_logins(ALICE), 0);

    let wrong = Client::imap(dovecot.imap_port())
        .login(ALICE, "not-her-password")
        .run();
    assert!(!wrong.ok());
    assert_eq!(wrong.exit_code, Some(1));
    assert!(
        wrong.error().unwrap().contains("[AUTHENTICATIONFAILED]"),
        "{wrong:?}"
    );
    assert!(!wrong.stdout.contains("not-her-password"));

    // The master passdb alone is not enough: the target must exist.
    let nobody = Client::imap(dovecot.imap_port())
        .login(&master_login("nobody@example.org"), dovecot.master_secret())
        .run();
    assert!(
        nobody.error().unwrap().contains("[AUTHORIZATIONFAILED]"),
        "{nobody:?}"
    );
    let bad_secret = Client::imap(dovecot.imap_port())
        .login(&master_login(ALICE), "wrong-secret")
        .run();
    assert!(!bad_secret.ok());
    assert_eq!(dovecot.master_logins(ALICE), 0);
}

#[test]
fn imap_authenticate_plain_forms_are_visible_in_the_rawlog() {
    let dovecot = Dovecot::builder().prelogin_rawlog().start();
    for mode in ["authenticate-plain", "authenticate-plain-ir"] {
        Client::imap(dovecot.imap_port())
            .login(&master_login(BOB), dovecot.master_secret())
            .mode(mode)
            .actions(&["select", "logout"])
            .run()
            .assert_ok();
    }
    assert!(dovecot.wait_for_log(Duration::from_secs(3), |log| log
        .matches("Login: user=<bob@example.org>")
        .count()
        == 2));
    assert_eq!(dovecot.master_logins(BOB), 2);
    // base64("\0bob@example.org%proxy@example.org\0master-secret-for-tests")
    let expected =
        "AGJvYkBleGFtcGxlLm9yZyVwcm94eUBleGFtcGxlLm9yZwBtYXN0ZXItc2VjcmV0LWZvci10ZXN0cw==";
    let rawlogs = dovecot.prelogin_rawlogs();
    assert_eq!(rawlogs.len(), 2, "{rawlogs:?}");
    assert!(rawlogs[0].input.contains(&format!("\n{expected}\n")));
    assert!(rawlogs[1]
        .input
        .contains(&format!("AUTHENTICATE PLAIN {expected}\n")));
    assert!(rawlogs[0].output.starts_with("* OK [CAPABILITY"));
}

#[test]
fn submission_master_login_reaches_the_sink() {
    let dovecot = Dovecot::start();
    for mode in ["auth-plain", "auth-login"] {
        Client::smtp(dovecot.submission_port())
            .login(&master_login(ALICE), dovecot.master_secret())
            .mode(mode)
            .arg("--mail-from")
            .arg(ALICE)
            .arg("--rcpt")
            .arg(BOB)
            .message(&format!(
                "From: {ALICE}\r\nTo: {BOB}\r\nSubject: {mode}\r\n\r\n.leading dot\r\n"
            ))
            .actions(&["send", "quit"])
            .run()
            .assert_ok();
    }
    let messages = dovecot.sink().wait_for_messages(2, Duration::from_secs(5));
    assert_eq!(messages.len(), 2, "{}", dovecot.log());
    for (message, mode) in messages.iter().zip(["auth-plain", "auth-login"]) {
        assert_eq!(message.mail_from, ALICE);
        assert_eq!(message.rcpt_to, vec![BOB.to_string()]);
        assert!(message.text().contains(&format!("Subject: {mode}")));
        assert!(message.text().contains("\r\n.leading dot\r\n"));
    }
    assert_eq!(
        dovecot
            .logins()
            .iter()
            .filter(|r| r.service == "submission" && r.master_user() == Some(MASTER_USER))
            .count(),
        2
    );
}

#[test]
fn pop3_and_sieve_master_logins() {
    let dovecot = Dovecot::start();
    dovecot.deliver(
        BOB,
        b"Subject: delivered\r\n\r\nput there by doveadm save\r\n",
    );
    for mode in ["user-pass", "authenticate-plain"] {
        let run = Client::pop3(dovecot.pop3_port())
            .login(&master_login(BOB), dovecot.master_secret())
            .mode(mode)
            .actions(&["stat", "retr:1", "quit"])
            .run();
        run.assert_ok();
        assert_eq!(run.json["stat"][0], 1);
        assert!(run.fetched().unwrap().contains("put there by doveadm save"));
    }
    assert!(dovecot.saw_master_login(BOB));

    for mode in ["authenticate-plain", "authenticate-plain-cont"] {
        let run = Client::sieve(dovecot.sieve_port())
            .login(&master_login(ALICE), dovecot.master_secret())
            .mode(mode)
            .actions(&[
                "putscript:harness",
                "listscripts",
                "getscript:harness",
                "logout",
            ])
            .run();
        run.assert_ok();
        assert!(run.list("scripts").iter().any(|s| s.contains("harness")));
        assert!(run.fetched().unwrap().contains("fileinto"));
    }
    assert_eq!(
        dovecot
            .logins()
            .iter()
            .filter(|r| r.service == "managesieve" && r.user == ALICE)
            .count(),
        2
    );
}

#[test]
fn two_instances_side_by_side_and_nothing_survives() {
    let first = Dovecot::builder().master_secret("first-secret").start();
    let second = Dovecot::builder().master_secret("second-secret").start();
    assert_ne!(first.imap_port(), second.imap_port());
    assert_ne!(first.dir(), second.dir());
    first.deliver(ALICE, b"Subject: one\r\n\r\nfirst only\r\n");
    Client::imap(second.imap_port())
        .login(&master_login(ALICE), "second-secret")
        .actions(&["select", "logout"])
        .run()
        .assert_ok();
    let cross = Client::imap(second.imap_port())
        .login(&master_login(ALICE), "first-secret")
        .run();
    assert!(!cross.ok());
    assert_eq!(first.message_count(ALICE, "INBOX"), 1);
    assert_eq!(second.message_count(ALICE, "INBOX"), 0);

    // Keep a logged-in session open so a post-login imap process exists at drop.
    let mut session = TcpStream::connect(("127.0.0.1", first.imap_port())).unwrap();
    let mut reader = BufReader::new(session.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    write!(session, "a LOGIN {} first-secret\r\n", master_login(ALICE)).unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("a OK"), "{line}");

    let marker = first.process_marker().to_string();
    let dir = first.dir().to_path_buf();
    let port = first.imap_port();
    assert!(first.pids().len() >= 3, "{:?}", first.pids());
    drop(first);
    let pgrep = Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(
        pgrep.stdout.is_empty(),
        "left over: {}",
        String::from_utf8_lossy(&pgrep.stdout)
    );
    assert!(!dir.exists());
    assert!(wait_for_port_closed(port, Duration::from_secs(2)));
    // The open session was cut when the backend went away.
    line.clear();
    let _ = reader.read_line(&mut line);
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);

    // The other instance is unaffected.
    Client::imap(second.imap_port())
        .login(&master_login(BOB), "second-secret")
        .run()
        .assert_ok();
}

/// Run as a child process by `stale_instances_are_reaped`: exits without
/// dropping its instance, like a test binary killed mid-run.
#[test]
#[ignore = "helper, run by stale_instances_are_reaped"]
fn leak_an_instance() {
    // `--include-ignored` must not end the whole test binary.
    if std::env::var_os("HARNESS_LEAK_INSTANCE").is_none() {
        return;
    }
    let dovecot = Dovecot::start();
    println!("MARKER {}", dovecot.process_marker());
    std::process::exit(0);
}

#[test]
fn stale_instances_are_reaped() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "leak_an_instance", "--nocapture"])
        .env("HARNESS_LEAK_INSTANCE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let marker = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MARKER "))
        .unwrap_or_else(|| panic!("no marker: {stdout}"))
        .to_string();
    // (A Dovecot::start in a parallel test may already have reaped it.)
    reap_stale_instances();
    let pgrep = Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(
        pgrep.stdout.is_empty(),
        "leaked instance survived: {}",
        String::from_utf8_lossy(&pgrep.stdout)
    );
    assert!(!std::env::temp_dir().join(&marker).exists());
}

#[test]
fn tls_and_haproxy_listeners() {
    let dovecot = Dovecot::builder().tls().haproxy_listeners().start();
    let ca = dovecot.tls_ca().unwrap().to_path_buf();
    let ports = dovecot.ports();
    Client::imap(ports.imap_tls.unwrap())
        .login(&master_login(ALICE), dovecot.master_secret())
        .tls("implicit", &ca)
        .actions(&["select", "logout"])
        .run()
        .assert_ok();
    let starttls = Client::imap(ports.imap)
        .login(&master_login(ALICE), dovecot.master_secret())
        .tls("starttls", &ca)
        .actions(&["logout"])
        .run();
    starttls.assert_ok();
    assert!(starttls
        .list("capabilities")
        .contains(&"AUTH=PLAIN".to_string()));

    // A PROXY v1 header: Dovecot must log the client address it carries.
    let mut stream = TcpStream::connect(("127.0.0.1", ports.imap_haproxy.unwrap())).unwrap();
    stream
        .write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("* OK"), "{line}");
    write!(
        stream,
        "a LOGIN {} {}\r\n",
        master_login(BOB),
        dovecot.master_secret()
    )
    .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("a OK"), "{line}");
    assert!(dovecot.saw_master_login(BOB));
    let record = dovecot
        .logins()
        .into_iter()
        .find(|r| r.user == BOB)
        .unwrap();
    assert_eq!(record.rip, "192.0.2.7");
}

/// Sends one raw request and reads the reply until the server closes.
fn http_exchange(port: u16, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

fn nginx_request(user: &str, pass: &str, keep_alive: bool) -> Vec<u8> {
    let mut req =
        b"GET /auth HTTP/1.0\r\nHost: localhost\r\nAuth-Method: plain\r\nAuth-User: ".to_vec();
    req.extend(nginx_escape(user.as_bytes()));
    req.extend(b"\r\nAuth-Pass: ");
    req.extend(nginx_escape(pass.as_bytes()));
    req.extend(b"\r\nAuth-Protocol: imap\r\nAuth-Login-Attempt: 1\r\nClient-IP: 192.0.2.1\r\n");
    if keep_alive {
        req.extend(b"Connection: keep-alive\r\n");
    }
    req.extend(b"\r\n");
    req
}

/// Reads one keep-alive reply head (our server sends `Content-Length: 0`).
fn read_reply_head(reader: &mut BufReader<TcpStream>) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "closed early: {head}"
        );
        head.push_str(&line);
        if line == "\r\n" {
            return head;
        }
    }
}

#[test]
fn auth_http_answers_as_configured() {
    let backend = "127.0.0.1:1143".parse().unwrap();
    let server = AuthHttpServer::start(backend);
    let port = server.port();

    let ok = String::from_utf8(http_exchange(
        port,
        &nginx_request(ALICE, "alice-password", false),
    ))
    .unwrap();
    assert!(ok.starts_with("HTTP/1.0 200 OK\r\n"), "{ok}");
    assert!(ok.contains("\r\nAuth-Status: OK\r\n"));
    assert!(ok.contains("\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 1143\r\n"));
    assert!(ok.contains("\r\nAuth-User: alice@example.org\r\n"));
    assert!(!ok.contains("Auth-Pass"));

    let fail =
        String::from_utf8(http_exchange(port, &nginx_request(ALICE, "wrong", false))).unwrap();
    assert!(
        fail.contains("\r\nAuth-Status: Invalid login or password\r\nAuth-Wait: 0\r\n"),
        "{fail}"
    );

    // Escaped credentials are decoded before the lookup; raw bytes are recorded.
    server.add_account("carol smith", "pa%ss word\t", "carol@example.org");
    let escaped = nginx_request("carol smith", "pa%ss word\t", false);
    let reply = String::from_utf8(http_exchange(port, &escaped)).unwrap();
    assert!(reply.contains("Auth-User: carol@example.org"), "{reply}");
    let recorded = server.requests().last().unwrap().clone();
    assert_eq!(recorded.raw, escaped);
    assert_eq!(recorded.header("Auth-Pass").unwrap(), "pa%25ss%20word%09");
    assert_eq!(recorded.pass().unwrap(), b"pa%ss word\t");
    assert_eq!(nginx_unescape("carol%20smith"), b"carol smith");

    // Master replay, as used to make nginx log in with the master secret.
    server.set_master_replay(Some((MASTER_USER.into(), "s3cret".into())));
    let replay = String::from_utf8(http_exchange(
        port,
        &nginx_request(BOB, "bob-password", false),
    ))
    .unwrap();
    assert!(
        replay
            .contains("\r\nAuth-User: bob@example.org%proxy@example.org\r\nAuth-Pass: s3cret\r\n"),
        "{replay}"
    );
    server.set_master_replay(None);

    server.set_failure(Failure {
        status: "Temporary server problem, try again later".into(),
        wait: None,
        error_code: Some("451 4.3.0".into()),
    });
    let temp = String::from_utf8(http_exchange(port, &nginx_request(BOB, "x", false))).unwrap();
    assert!(temp.contains("Auth-Status: Temporary server problem, try again later\r\nAuth-Error-Code: 451 4.3.0\r\n"), "{temp}");
    assert!(!temp.contains("Auth-Wait"));

    // Keep-alive: two requests, one connection.
    server.clear();
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..2 {
        writer
            .write_all(&nginx_request(ALICE, "alice-password", true))
            .unwrap();
        let head = read_reply_head(&mut reader);
        assert!(head.contains("Auth-Status: OK\r\n"));
        assert!(
            head.contains("Connection: keep-alive\r\nContent-Length: 0\r\n"),
            "{head}"
        );
    }
    drop(writer);
    assert_eq!(server.connections(), 1);
    assert_eq!(server.request_count(), 2);
    assert!(server.requests().iter().all(|r| r.connection == 0));

    server.set_mode(Mode::Garbage);
    let garbage = http_exchange(port, &nginx_request(ALICE, "alice-password", false));
    assert!(!garbage.starts_with(b"HTTP/"));
    assert!(garbage.len() > 4);

    server.set_mode(Mode::NoStatus);
    let no_status = String::from_utf8(http_exchange(
        port,
        &nginx_request(ALICE, "alice-password", false),
    ))
    .unwrap();
    assert!(no_status.starts_with("HTTP/1.0 200 OK\r\n"));
    assert!(!no_status.contains("Auth-Status"));

    server.set_mode(Mode::Slow(Duration::from_millis(300)));
    let started = Instant::now();
    let slow = String::from_utf8(http_exchange(
        port,
        &nginx_request(ALICE, "alice-password", false),
    ))
    .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(slow.contains("Auth-Status: OK"));

    server.set_mode(Mode::Hangup);
    assert!(http_exchange(port, &nginx_request(ALICE, "alice-password", false)).is_empty());

    server.set_mode(Mode::Raw(
        b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-User: x%y\r\n\r\n".to_vec(),
    ));
    let raw = http_exchange(port, &nginx_request(ALICE, "alice-password", false));
    assert!(raw.ends_with(b"Auth-User: x%y\r\n\r\n"));

    server.set_mode(Mode::Down);
    assert!(wait_for_port_closed(port, Duration::from_secs(2)));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    server.set_mode(Mode::Normal);
    assert!(wait_for_port(port, Duration::from_secs(2)));
    let back = String::from_utf8(http_exchange(
        port,
        &nginx_request(ALICE, "alice-password", false),
    ))
    .unwrap();
    assert!(back.contains("Auth-Status: OK"));
}

#[test]
fn free_port_is_bindable() {
    let port = free_port();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    assert!(wait_for_port(port, Duration::from_secs(1)));
    drop(listener);
}

/// Decodes one base64url segment of a JWT into JSON.
fn jwt_part(token: &str, index: usize) -> serde_json::Value {
    use base64::Engine;
    let part = token.split('.').nth(index).expect("JWT part");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("JWT part is base64url");
    serde_json::from_slice(&bytes).expect("JWT part is JSON")
}

#[test]
fn oidc_device_flow_opaque_token_works_at_userinfo_and_introspection() {
    let op = OidcProvider::start();
    let discovery = op.discovery();
    for key in [
        "jwks_uri",
        "introspection_endpoint",
        "userinfo_endpoint",
        "device_authorization_endpoint",
        "token_endpoint",
    ] {
        let url = discovery[key].as_str().unwrap_or_default();
        assert!(url.starts_with(&op.issuer()), "{key}: {discovery}");
    }
    assert_eq!(discovery["issuer"], op.issuer().as_str());

    let tokens = op.device_flow(ALICE, "alice-password", None);
    assert_eq!(tokens.access_token.split('.').count(), 1, "{tokens:?}");
    assert!(tokens.refresh_token.is_some(), "{tokens:?}");
    assert!(tokens.id_token.is_some(), "{tokens:?}");
    assert_eq!(tokens.expires_in, 3600);

    let (status, body) = op.userinfo(&tokens.access_token);
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["sub"], ALICE);
    assert_eq!(info["email"], ALICE);
    assert_eq!(info["preferred_username"], ALICE);
    assert_eq!(op.userinfo("not-a-token").0, 401);

    let intro = op.introspect(&tokens.access_token);
    assert_eq!(intro["active"], true, "{intro}");
    assert_eq!(intro["sub"], ALICE, "{intro}");
    assert_eq!(intro["username"], ALICE, "{intro}");
    assert_eq!(intro["client_id"], CLIENT_ID, "{intro}");
    assert!(intro["exp"].as_u64().is_some(), "{intro}");
    assert_eq!(op.introspect("not-a-token")["active"], false);

    // Names outside the provider's accounts cannot log in.
    let refused = op
        .try_device_flow("mallory@example.org", "pw", None)
        .unwrap_err();
    assert!(refused.contains("unknown account"), "{refused}");
}

#[test]
fn oidc_device_flow_with_mail_resource_yields_a_jwt_signed_by_a_jwks_key() {
    let op = OidcProvider::start();
    let tokens = op.device_flow(BOB, "bob-password", Some(MAIL_RESOURCE));
    assert_eq!(tokens.access_token.split('.').count(), 3, "{tokens:?}");
    let header = jwt_part(&tokens.access_token, 0);
    let claims = jwt_part(&tokens.access_token, 1);
    assert_eq!(header["alg"], "ES256", "{header}");
    assert_eq!(header["typ"], "at+jwt", "{header}");
    let kid = header["kid"].as_str().expect("kid in the JWT header");
    let jwks = op.jwks();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys in the JWKS")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert!(kids.contains(&kid), "{kid} not in {jwks}");
    assert_eq!(claims["aud"], MAIL_RESOURCE, "{claims}");
    assert_eq!(claims["iss"], op.issuer().as_str(), "{claims}");
    assert_eq!(claims["sub"], BOB, "{claims}");
    assert_eq!(claims["username"], BOB, "{claims}");
    assert_eq!(claims["client_id"], CLIENT_ID, "{claims}");
    // The provider does not store JWT access tokens: only the signature vouches for them.
    assert_eq!(op.introspect(&tokens.access_token)["active"], false);
}

#[test]
fn oidc_access_tokens_expire_after_their_ttl() {
    let op = OidcProvider::start_with(2);
    let tokens = op.device_flow("carol@example.org", "carol-password", None);
    assert_eq!(tokens.expires_in, 2);
    assert_eq!(op.introspect(&tokens.access_token)["active"], true);
    std::thread::sleep(Duration::from_secs(3));
    let intro = op.introspect(&tokens.access_token);
    assert_eq!(intro["active"], false, "{intro}");
    assert_eq!(op.userinfo(&tokens.access_token).0, 401);
}
