//! IMAP end to end: stock clients (Python imaplib, curl, openssl s_client) → Portcullis → real
//! Dovecot configured like Stalwart's `user%master`, and the negative cases of SECURITY.md.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::authhttp::{AuthHttpServer, Mode};
use common::clients::Client;
use common::dovecot::Dovecot;
use common::proxy::{dev_ca, Proxy, ProxyOptions, Raw};

const ALICE: &str = "alice@example.org";

fn setup() -> (Dovecot, Proxy) {
    let dovecot = Dovecot::builder().prelogin_rawlog().start();
    let proxy = Proxy::start(ProxyOptions::file_users(
        dovecot.imap_port(),
        dovecot.master_secret(),
    ));
    (dovecot, proxy)
}

#[test]
fn imaplib_logs_in_with_own_password_reads_and_appends_through_master_login() {
    let (dovecot, proxy) = setup();
    dovecot.deliver(
        ALICE,
        b"From: a@example.org\r\nSubject: hello\r\n\r\nfirst message\r\n",
    );
    let run = Client::imap(proxy.imaps)
        .tls("implicit", &dev_ca())
        .login("alice", "alice-password")
        .actions(&["select", "fetch:1", "append", "search", "idle:1", "logout"])
        .run();
    run.assert_ok();
    assert!(
        run.fetched().unwrap_or_default().contains("first message"),
        "{run:#?}"
    );
    assert_eq!(dovecot.message_count(ALICE, "INBOX"), 2);
    // Post-login capabilities came from the backend (IDLE), filtered.
    let caps = run.list("post_login_capabilities");
    assert!(
        caps.iter().any(|c| c.eq_ignore_ascii_case("IDLE")),
        "{caps:?}"
    );
    assert!(!caps
        .iter()
        .any(|c| c.eq_ignore_ascii_case("UNAUTHENTICATE")));
    // The backend saw a master login for the canonical account, in the exact form Stalwart needs.
    assert!(dovecot.saw_master_login(ALICE));
    assert_eq!(dovecot.direct_logins(ALICE), 0);
    let expected = base64_plain(&format!(
        "\0{ALICE}%proxy@example.org\0{}",
        dovecot.master_secret()
    ));
    let raw = dovecot.prelogin_rawlogs();
    assert!(
        raw.iter()
            .any(|r| r.input.contains(&format!("AUTHENTICATE PLAIN {expected}"))),
        "no AUTHENTICATE PLAIN with an empty authzid in {raw:#?}"
    );
}

fn base64_plain(s: &str) -> String {
    portcullis::sasl::encode_challenge(s.as_bytes())
}

#[test]
fn authenticate_plain_and_app_password_and_starttls() {
    let (dovecot, proxy) = setup();
    Client::imap(proxy.imaps)
        .tls("implicit", &dev_ca())
        .mode("authenticate-plain")
        .login("alice@example.org", "alice-app-password")
        .actions(&["select", "logout"])
        .run()
        .assert_ok();
    Client::imap(proxy.imaps)
        .tls("implicit", &dev_ca())
        .mode("authenticate-plain-ir")
        .login("bob", "bob-password")
        .actions(&["select", "logout"])
        .run()
        .assert_ok();
    Client::imap(proxy.imap_starttls)
        .tls("starttls", &dev_ca())
        .login("alice", "alice-password")
        .actions(&["select", "logout"])
        .run()
        .assert_ok();
    assert!(dovecot.saw_master_login("bob@example.org"));
}

#[test]
fn curl_imaps_fetches_a_message() {
    let (dovecot, proxy) = setup();
    dovecot.deliver(ALICE, b"Subject: for curl\r\n\r\ncurl body\r\n");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(dev_ca())
        .args(["--user", "alice:alice-password"])
        .arg(format!("imaps://localhost:{}/INBOX;UID=1", proxy.imaps))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(body.contains("curl body"), "{body}");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(dev_ca())
        .args(["--user", "alice:wrong-password-xyz"])
        .arg(format!("imaps://localhost:{}/INBOX;UID=1", proxy.imaps))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn openssl_s_client_starttls_login() {
    let (_dovecot, proxy) = setup();
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-starttls", "imap", "-CAfile"])
        .arg(dev_ca())
        .args(["-connect", &format!("127.0.0.1:{}", proxy.imap_starttls)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin
            .write_all(b"a LOGIN alice alice-password\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        stdin.write_all(b"b SELECT INBOX\r\nc LOGOUT\r\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("a OK [CAPABILITY"), "{text}");
    assert!(text.contains("b OK"), "{text}");
    assert!(text.contains("c OK"), "{text}");
}

#[test]
fn wrong_password_unknown_user_and_master_separator_look_the_same() {
    let (dovecot, proxy) = setup();
    let mut answers = Vec::new();
    for (user, pass) in [
        ("alice", "wrong-password-xyz"),
        ("nobody-here", "wrong-password-xyz"),
        ("\"alice%proxy@example.org\"", "master-secret-for-tests"),
        (
            "\"alice@example.org*proxy@example.org\"",
            "master-secret-for-tests",
        ),
    ] {
        let mut c = Raw::tls(proxy.imaps);
        c.line();
        c.send(format!("a LOGIN {user} {pass}\r\n").as_bytes());
        let reply = c.until("a ");
        answers.push(reply.last().cloned().unwrap());
    }
    for a in &answers {
        assert_eq!(a, "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n");
    }
    assert_eq!(dovecot.logins().len(), 0, "the backend saw a login attempt");
}

#[test]
fn mismatched_plain_authzid_is_refused() {
    let (_dovecot, proxy) = setup();
    let mut c = Raw::tls(proxy.imaps);
    c.line();
    let payload = base64_plain("bob\0alice\0alice-password");
    c.send(format!("a AUTHENTICATE PLAIN {payload}\r\n").as_bytes());
    let reply = c.until("a ");
    assert!(
        reply
            .last()
            .unwrap()
            .starts_with("a NO [AUTHORIZATIONFAILED]"),
        "{reply:?}"
    );
}

#[test]
fn plaintext_login_before_starttls_and_pipelining_behind_starttls() {
    let (dovecot, proxy) = setup();
    let mut c = Raw::plain(proxy.imap_starttls);
    let greeting = c.line().unwrap();
    assert!(greeting.contains("LOGINDISABLED") && greeting.contains("STARTTLS"));
    assert!(!greeting.contains("AUTH="));
    c.send(b"a LOGIN alice alice-password\r\n");
    assert!(c
        .until("a ")
        .last()
        .unwrap()
        .starts_with("a NO [PRIVACYREQUIRED]"));
    c.send(b"b STARTTLS\r\nc LOGIN alice alice-password\r\n");
    assert!(
        c.closed(),
        "pipelined bytes after STARTTLS must close the connection"
    );
    assert_eq!(dovecot.logins().len(), 0);
    // A second STARTTLS inside TLS is refused.
    let mut t = Raw::starttls(proxy.imap_starttls);
    t.send(b"d STARTTLS\r\n");
    assert!(t.until("d ").last().unwrap().starts_with("d BAD"));
    t.send(b"e LOGIN alice alice-password\r\n");
    assert!(t.until("e ").last().unwrap().starts_with("e OK"));
}

#[test]
fn oversized_line_and_literals_are_refused() {
    let (_dovecot, proxy) = setup();
    let mut c = Raw::tls(proxy.imaps);
    c.line();
    let mut line = b"a LOGIN alice ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 1 << 20));
    line.extend_from_slice(b"\r\n");
    c.send(&line);
    assert_eq!(
        c.until("a ").last().unwrap(),
        "a BAD Command line too long\r\n"
    );
    c.send(b"b LOGIN {4294967295}\r\n");
    let reply = c.until("b ");
    assert!(
        reply.last().unwrap().starts_with("b BAD [TOOBIG]"),
        "{reply:?}"
    );
    assert!(!reply.iter().any(|l| l.starts_with('+')));
    // The third protocol error ends the connection.
    c.send(b"c SELECT INBOX\r\n");
    let rest = c.until("* BYE");
    assert!(rest.iter().any(|l| l.starts_with("c BAD")), "{rest:?}");
    assert!(c.closed());
}

#[test]
fn unauthenticate_after_login_is_refused_locally() {
    let (_dovecot, proxy) = setup();
    let mut c = Raw::tls(proxy.imaps);
    c.line();
    c.send(b"a LOGIN alice alice-password\r\n");
    let ok = c.until("a ");
    assert!(ok.last().unwrap().starts_with("a OK [CAPABILITY"), "{ok:?}");
    c.send(b"b UNAUTHENTICATE\r\nc NOOP\r\n");
    assert_eq!(
        c.until("b ").last().unwrap(),
        "b NO [CANNOT] UNAUTHENTICATE is not available\r\n"
    );
    assert!(c.until("c ").last().unwrap().starts_with("c OK"));
    // A second LOGIN after login never reaches the master form: the backend refuses it.
    c.send(b"d LOGIN bob bob-password\r\n");
    assert!(!c.until("d ").last().unwrap().starts_with("d OK"));
}

#[test]
fn commands_pipelined_behind_login_wait_for_the_result() {
    let (_dovecot, proxy) = setup();
    let mut c = Raw::tls(proxy.imaps);
    c.line();
    c.send(b"a LOGIN alice wrong-password-xyz\r\nb SELECT INBOX\r\nc LOGIN alice alice-password\r\nd SELECT INBOX\r\n");
    assert!(c
        .until("a ")
        .last()
        .unwrap()
        .starts_with("a NO [AUTHENTICATIONFAILED]"));
    // b was answered locally (not logged in), never forwarded.
    assert_eq!(c.until("b ").last().unwrap(), "b BAD Log in first\r\n");
    assert!(c
        .until("c ")
        .last()
        .unwrap()
        .starts_with("c OK [CAPABILITY"));
    assert!(c.until("d ").last().unwrap().starts_with("d OK"));
}

#[test]
fn authenticator_down_slow_or_garbage_is_unavailable_not_failed() {
    let dovecot = Dovecot::start();
    let auth = AuthHttpServer::start(dovecot.addr(dovecot.imap_port()));
    auth.add_account("alice", "alice-password", ALICE);
    let proxy = Proxy::start(ProxyOptions::nginx(
        dovecot.imap_port(),
        dovecot.master_secret(),
        &auth.url(),
    ));
    let login = |expect: &str| {
        let mut c = Raw::tls(proxy.imaps);
        c.line();
        c.send(b"a LOGIN alice alice-password\r\n");
        let last = c.until("a ").last().unwrap().clone();
        assert!(last.starts_with(expect), "expected {expect}, got {last}");
    };
    login("a OK [CAPABILITY");
    assert!(dovecot.saw_master_login(ALICE));
    let req = &auth.requests()[0];
    assert_eq!(req.request_line(), "GET /auth HTTP/1.0");
    assert_eq!(req.header("Auth-Protocol").as_deref(), Some("imap"));
    assert_eq!(req.header("Auth-SSL").as_deref(), Some("on"));
    for mode in [
        Mode::Down,
        Mode::Garbage,
        Mode::NoStatus,
        Mode::Hangup,
        Mode::Slow(Duration::from_secs(3)),
    ] {
        auth.set_mode(mode);
        login("a NO [UNAVAILABLE]");
    }
    auth.set_mode(Mode::Normal);
    login("a OK");
}

#[test]
fn backend_refusing_the_master_login_is_unavailable() {
    let dovecot = Dovecot::start();
    let proxy = Proxy::start(ProxyOptions::file_users(
        dovecot.imap_port(),
        "not-the-master-secret",
    ));
    let mut c = Raw::tls(proxy.imaps);
    c.line();
    c.send(b"a LOGIN alice alice-password\r\n");
    assert!(c
        .until("a ")
        .last()
        .unwrap()
        .starts_with("a NO [UNAVAILABLE]"));
    assert!(!proxy.log().contains("not-the-master-secret"));
}

#[test]
fn no_password_or_master_secret_in_logs_at_trace_level() {
    let dovecot = Dovecot::start();
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    opts.rust_log = "trace".into();
    let proxy = Proxy::start(opts);
    Client::imap(proxy.imaps)
        .tls("implicit", &dev_ca())
        .mode("authenticate-plain")
        .login("alice", "alice-password")
        .actions(&["select", "logout"])
        .run()
        .assert_ok();
    let mut c = Raw::tls(proxy.imaps);
    c.line();
    c.send(b"a LOGIN alice wrong-password-xyz\r\n");
    c.until("a ");
    let log = proxy.log();
    assert!(log.contains("login accepted"), "{log}");
    for secret in [
        "alice-password",
        "wrong-password-xyz",
        dovecot.master_secret(),
        &base64_plain("\0alice\0alice-password"),
    ] {
        assert!(!log.contains(secret), "{secret:?} leaked into the log");
    }
}

#[test]
fn strict_alpn_and_sni_default() {
    let (_dovecot, proxy) = setup();
    let tcp = || std::net::TcpStream::connect(("127.0.0.1", proxy.imaps)).unwrap();
    assert!(
        common::proxy::tls_over(tcp(), &["http/1.1"]).is_err(),
        "foreign ALPN accepted"
    );
    assert!(common::proxy::tls_over(tcp(), &["imap"]).is_ok());
    assert!(common::proxy::tls_over(tcp(), &[]).is_ok());
    assert!(common::proxy::tls_over(tcp(), &["h2", "imap"]).is_ok());
}

#[test]
fn sigterm_says_bye_to_sessions_still_logging_in() {
    let (_dovecot, mut proxy) = setup();
    let mut c = Raw::tls(proxy.imaps);
    c.line();
    proxy.terminate();
    assert!(c
        .until("* BYE")
        .last()
        .unwrap()
        .starts_with("* BYE Server shutting down"));
    assert!(
        proxy.wait_exit(Duration::from_secs(10)),
        "proxy did not exit"
    );
}

#[test]
fn check_config_names_the_bad_key() {
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let ok = Command::new(bin)
        .args(["check-config", "--config", "config/portcullis.toml"])
        .current_dir(common::proxy::repo())
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::proxy::repo().join("config/portcullis.toml"))
        .unwrap()
        .replace(
            "bind = [\"127.0.0.1:10143\"]\ntls = \"starttls\"",
            "bind = [\"0.0.0.0:10143\"]\ntls = \"none\"",
        );
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let bad = Command::new(bin)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("listener[1].tls"), "{err}");
}

#[test]
fn backend_over_tls_starttls_and_proxy_v2_and_never_downgraded() {
    let dovecot = Dovecot::builder().tls().haproxy_listeners().start();
    let ports = dovecot.ports();
    let ca = dovecot.tls_ca().unwrap().display().to_string();
    let verified = format!("tls_ca_file = \"{ca}\"\ntls_server_name = \"localhost\"");
    let cases = [
        (ports.imap_tls.unwrap(), "implicit", verified.clone()),
        (ports.imap, "starttls", verified.clone()),
        (
            ports.imap_haproxy.unwrap(),
            "none",
            "proxy_protocol = \"v2\"".to_owned(),
        ),
    ];
    for (port, tls, extra) in cases {
        let mut opts = ProxyOptions::file_users(port, dovecot.master_secret());
        opts.backend_imap_tls = tls.into();
        opts.backend_extra = extra;
        let proxy = Proxy::start(opts);
        let run = Client::imap(proxy.imaps)
            .tls("implicit", &dev_ca())
            .login("alice", "alice-password")
            .actions(&["select", "logout"])
            .run();
        assert!(run.ok(), "backend tls={tls}: {run:#?}\n{}", proxy.log());
    }
    assert!(dovecot.saw_master_login(ALICE));
    // A backend certificate that does not verify is a temporary failure, never a cleartext retry.
    let mut opts = ProxyOptions::file_users(ports.imap_tls.unwrap(), dovecot.master_secret());
    opts.backend_imap_tls = "implicit".into();
    opts.backend_extra = format!("tls_ca_file = \"{}\"", dev_ca().display());
    let proxy = Proxy::start(opts);
    let mut c = Raw::tls(proxy.imaps);
    c.line();
    c.send(b"a LOGIN alice alice-password\r\n");
    assert!(c
        .until("a ")
        .last()
        .unwrap()
        .starts_with("a NO [UNAVAILABLE]"));
}

#[test]
fn sighup_reloads_the_users_file_without_dropping_sessions() {
    let dovecot = Dovecot::start();
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let original =
        std::fs::read_to_string(common::proxy::repo().join("config/users.toml")).unwrap();
    std::fs::write(&users, &original).unwrap();
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    opts.authenticator = format!("kind = \"file\"\nusers_file = \"{}\"\n", users.display());
    let proxy = Proxy::start(opts);
    let login = |user: &str| {
        let mut c = Raw::tls(proxy.imaps);
        c.line();
        c.send(format!("a LOGIN {user} bob-password\r\n").as_bytes());
        (c.until("a ").last().unwrap().clone(), c)
    };
    assert!(login("bobby").0.starts_with("a NO [AUTHENTICATIONFAILED]"));
    let (ok, mut established) = login("bob");
    assert!(ok.starts_with("a OK"));
    std::fs::write(
        &users,
        original.replace("logins = [\"bob\"]", "logins = [\"bob\", \"bobby\"]"),
    )
    .unwrap();
    Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    let mut reloaded = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        if proxy.log().contains("reloaded") {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "{}", proxy.log());
    assert!(login("bobby").0.starts_with("a OK"));
    // The session established before the reload still works.
    established.send(b"b NOOP\r\n");
    assert!(established.until("b ").last().unwrap().starts_with("b OK"));
}

#[test]
fn sigterm_drains_spliced_sessions_until_the_grace_period() {
    let (_dovecot, mut proxy) = setup();
    let mut c = Raw::tls(proxy.imaps);
    c.line();
    c.send(b"a LOGIN alice alice-password\r\n");
    assert!(c.until("a ").last().unwrap().starts_with("a OK"));
    proxy.terminate();
    std::thread::sleep(Duration::from_millis(300));
    // Still served during the grace period (2 s in the test config)...
    c.send(b"b NOOP\r\n");
    assert!(c.until("b ").last().unwrap().starts_with("b OK"));
    // ...new connections are no longer accepted...
    assert!(std::net::TcpStream::connect(("127.0.0.1", proxy.imaps)).is_err());
    // ...and after it the session is closed and the process exits.
    assert!(proxy.wait_exit(Duration::from_secs(10)));
    assert!(c.closed());
}

#[test]
fn per_ip_connection_cap_closes_without_greeting_and_spares_other_ips() {
    let dovecot = Dovecot::start();
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    opts.per_ip_connections = 2;
    let proxy = Proxy::start(opts);
    // The start-up readiness probes were connections too and may still hold slots for a
    // moment: retry until two connections are greeted.
    let greeted = || {
        for _ in 0..50 {
            let mut c = Raw::plain(proxy.imap_plain);
            if c.line().is_some_and(|l| l.starts_with("* OK")) {
                return c;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no greeting within 5 s");
    };
    let a = greeted();
    let _b = greeted();
    let mut c = Raw::plain(proxy.imap_plain);
    assert!(c.closed(), "third connection from one IP got a greeting");
    // Another client address is still served.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let greeting = rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = socket
            .connect(format!("127.0.0.1:{}", proxy.imap_plain).parse().unwrap())
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    assert!(greeting.starts_with("* OK"), "{greeting}");
    // A slot is given back when a connection ends.
    drop(a);
    greeted();
}

#[test]
fn a_client_that_half_closes_after_logout_still_gets_the_answers() {
    use std::io::{Read, Write};
    let (_dovecot, proxy) = setup();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.imap_plain)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 512];
    let _ = s.read(&mut greeting).unwrap();
    s.write_all(b"a LOGIN alice alice-password\r\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("a OK") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the login answer");
        seen.extend_from_slice(&buf[..n]);
    }
    // Everything at once, then the client closes its sending side, as `printf ... | nc` does.
    s.write_all(b"b SELECT INBOX\r\nc LOGOUT\r\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("b OK"), "{rest}");
    assert!(rest.contains("c OK"), "{rest}");
}

#[test]
fn a_large_fetch_over_tls_arrives_whole_to_a_slow_reader() {
    let (dovecot, proxy) = setup();
    let line = "x".repeat(998);
    let mut body = String::from("Subject: big\r\n\r\n");
    // Larger than the kernel's socket buffers can hold (send buffers grow to 4 MiB).
    while body.len() < 12 << 20 {
        body.push_str(&line);
        body.push_str("\r\n");
    }
    body.push_str("the end\r\n");
    dovecot.deliver(ALICE, body.as_bytes());
    // A small receive window and a reader that lags, so the proxy's writes to the client block
    // and TLS records wait in the proxy: the tail must still be flushed.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(32 * 1024).unwrap();
    sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], proxy.imaps)).into())
        .unwrap();
    let tcp: std::net::TcpStream = sock.into();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c = Raw::over_tls(tcp, &["imap"]);
    c.line();
    c.send(b"a LOGIN alice alice-password\r\nb SELECT INBOX\r\n");
    c.until("b OK");
    c.send(b"f FETCH 1 BODY.PEEK[]\r\n");
    std::thread::sleep(Duration::from_millis(500));
    let mut total = 0;
    let mut last = String::new();
    let mut saw_end = false;
    for n in 0.. {
        let Some(l) = c.line() else {
            panic!("stalled after {total} bytes");
        };
        if n % 64 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        total += l.len();
        saw_end |= l == "the end\r\n";
        if l.starts_with("f ") {
            last = l;
            break;
        }
    }
    assert!(last.starts_with("f OK"), "{last}");
    assert!(saw_end && total > 12 << 20);
}

#[test]
fn cleartext_fetches_arrive_byte_exact_with_long_bodies_spliced_past_the_proxy() {
    use std::io::{Read, Write};
    let (dovecot, proxy) = setup();
    // A body far over the zero-copy threshold, one just over it, and a short one (copied).
    let bodies: Vec<Vec<u8>> = [3usize << 20, 20 * 1024, 300]
        .iter()
        .enumerate()
        .map(|(m, &size)| {
            let mut b = format!("Subject: m{m}\r\n\r\n").into_bytes();
            let mut i = 0u64;
            while b.len() < size {
                let pad = "y".repeat((i % 61) as usize);
                b.extend_from_slice(format!("{m}-{i:016x}-{pad}\r\n").as_bytes());
                i += 1;
            }
            b
        })
        .collect();
    for b in &bodies {
        dovecot.deliver(ALICE, b);
    }
    // A small receive window and a lagging reader: the proxy's writes to the client block
    // in the middle of a body.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(32 * 1024).unwrap();
    sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], proxy.imap_plain)).into())
        .unwrap();
    let mut s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut seen = Vec::new();
    let read_until = |s: &mut std::net::TcpStream, seen: &mut Vec<u8>, end: &[u8]| {
        let mut buf = [0u8; 8192];
        let mut reads = 0;
        while memchr::memmem::find(seen, end).is_none() {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {} bytes", seen.len());
            seen.extend_from_slice(&buf[..n]);
            reads += 1;
            if reads % 64 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    read_until(&mut s, &mut seen, b"\r\n");
    s.write_all(b"a LOGIN alice alice-password\r\nb SELECT INBOX\r\n")
        .unwrap();
    read_until(&mut s, &mut seen, b"\r\nb OK");
    read_until(&mut s, &mut seen, b"\r\n");
    seen.clear();
    s.write_all(b"f FETCH 1:3 BODY.PEEK[]\r\n").unwrap();
    read_until(&mut s, &mut seen, b"\r\nf OK");
    let mut rest = &seen[..];
    for (m, body) in bodies.iter().enumerate() {
        let head = format!("* {} FETCH (BODY[] {{{}}}\r\n", m + 1, body.len());
        let at = memchr::memmem::find(rest, head.as_bytes()).unwrap_or_else(|| {
            panic!(
                "no {head:?} in {:?}",
                String::from_utf8_lossy(&rest[..rest.len().min(300)])
            )
        });
        let literal = &rest[at + head.len()..at + head.len() + body.len()];
        assert!(literal == &body[..], "message {} differs", m + 1);
        rest = &rest[at + head.len() + body.len()..];
        assert!(
            rest.starts_with(b")\r\n"),
            "{:?}",
            String::from_utf8_lossy(&rest[..rest.len().min(80)])
        );
    }
    s.write_all(b"z LOGOUT\r\n").unwrap();
    let mut tail = Vec::new();
    let _ = s.read_to_end(&mut tail);
    // The session's last log line says how much went socket to socket.
    let zero_copy = proxy.first_session_zero_copy();
    // Most of the long bodies (not what arrived with their FETCH line in an ordinary read),
    // none of the short one.
    let long = (bodies[0].len() + bodies[1].len()) as u64;
    assert!(
        zero_copy > long - 64 * 1024 && zero_copy <= long,
        "zero_copy={zero_copy}"
    );
}

#[test]
fn cleartext_append_arrives_byte_exact_with_the_body_spliced_past_the_proxy() {
    let (dovecot, proxy) = setup();
    // Python's imaplib sends the message as a synchronizing literal and waits for the
    // backend's "+" before it; the body holds command-like lines that must pass as data.
    // The stored message is read back directly from Dovecot with the master login.
    let code = r#"
import imaplib, os
lines = []
size = 0
i = 0
while size < 3 << 20:
    lines.append(("x%d UNAUTHENTICATE line %016x %s\r\n" % (i, i, "z" * (i % 53))).encode())
    size += len(lines[-1])
    i += 1
body = b"Subject: big\r\n\r\n" + b"".join(lines)
c = imaplib.IMAP4("127.0.0.1", int(os.environ["PROXY_PORT"]))
c.login("alice", "alice-password")
typ, data = c.append("INBOX", None, None, body)
assert typ == "OK", (typ, data)
typ, data = c.noop()
assert typ == "OK", (typ, data)
c.logout()
d = imaplib.IMAP4("127.0.0.1", int(os.environ["BACKEND_PORT"]))
d.login(os.environ["MASTER_LOGIN"], os.environ["MASTER_SECRET"])
d.select("INBOX", readonly=True)
typ, data = d.fetch("1", "(BODY.PEEK[])")
assert typ == "OK", (typ, data)
stored = data[0][1]
assert stored == body, "stored %d bytes, sent %d" % (len(stored), len(body))
d.logout()
print(len(body))
"#;
    let proxy_port = proxy.imap_plain.to_string();
    let backend_port = dovecot.imap_port().to_string();
    let master_login = dovecot.master_login_for(ALICE);
    let (code_rc, out, err) = common::clients::run_python(
        code,
        &[
            ("PROXY_PORT", &proxy_port),
            ("BACKEND_PORT", &backend_port),
            ("MASTER_LOGIN", &master_login),
            ("MASTER_SECRET", dovecot.master_secret()),
        ],
    );
    assert_eq!(code_rc, Some(0), "{out}\n{err}");
    let sent: u64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out}\n{err}"));
    assert_eq!(dovecot.message_count(ALICE, "INBOX"), 1);
    // All of the body but what arrived in a read with its APPEND line.
    let zero_copy = proxy.first_session_zero_copy_to_backend();
    assert!(
        zero_copy > sent - 64 * 1024 && zero_copy <= sent,
        "zero_copy_to_backend={zero_copy} of {sent}"
    );
}

#[test]
fn both_schedulers_serve_concurrent_logins_and_per_core_uses_every_runtime() {
    // Connections are spread over the runtimes by a hash of their addresses: with 20, all on
    // one of two runtimes has a chance of one in half a million.
    const CLIENTS: usize = 20;
    let dovecot = Dovecot::builder().start();
    for scheduler in ["per-core", "work-stealing"] {
        let proxy = Proxy::start(ProxyOptions {
            server_extra: format!("scheduler = \"{scheduler}\"\nworker_threads = 2\n"),
            ..ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret())
        });
        let before = dovecot.master_logins(ALICE);
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let port = proxy.imaps;
                std::thread::spawn(move || {
                    Client::imap(port)
                        .tls("implicit", &dev_ca())
                        .login("alice", "alice-password")
                        // Twenty Argon2id checks and master logins at once on a CI machine
                        // busy with the other tests: allow more than the default 10 s.
                        .arg("--timeout")
                        .arg("30")
                        .actions(&["select", "logout"])
                        .run()
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap().assert_ok();
        }
        // Dovecot writes its log asynchronously.
        let mut seen = 0;
        for _ in 0..50 {
            seen = dovecot.master_logins(ALICE) - before;
            if seen == CLIENTS {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(seen, CLIENTS, "{scheduler}: master logins at the backend");
        let log = proxy.log();
        let sessions_on = |worker: usize| {
            log.lines()
                .filter(|l| l.contains("login accepted") && l.contains(&format!("worker={worker}")))
                .count()
        };
        assert_eq!(
            sessions_on(0) + sessions_on(1),
            CLIENTS,
            "{scheduler}: {log}"
        );
        if scheduler == "per-core" {
            // The second runtime accepts its share.
            assert!(
                sessions_on(1) > 0,
                "no session on the second runtime: {log}"
            );
        } else {
            assert_eq!(sessions_on(1), 0, "work-stealing has one runtime: {log}");
        }
    }
}

/// A client that pipelines commands and never reads their answers: once its window is full,
/// the proxy's writes block. They are bounded by the pre-login idle limit, so the connection
/// is closed instead of held, long before every answer was written.
#[test]
fn a_client_that_stops_reading_before_login_is_let_go() {
    use std::io::{Read, Write};
    let dovecot = Dovecot::builder().start();
    let proxy = Proxy::start(ProxyOptions {
        extra: "preauth_idle = \"1s\"\n".into(),
        ..ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret())
    });
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], proxy.imap_plain)).into())
        .unwrap();
    let mut s: std::net::TcpStream = sock.into();
    const COMMANDS: usize = 100_000;
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let cmds = b"a CAPABILITY\r\n".repeat(1000);
        for _ in 0..COMMANDS / 1000 {
            if writer.write_all(&cmds).is_err() {
                break;
            }
        }
    });
    // Long enough for the proxy's write to block and its limit to pass.
    std::thread::sleep(Duration::from_secs(4));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answered = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                carry.extend_from_slice(&buf[..n]);
                answered += memchr::memmem::find_iter(&carry, b"a OK").count();
                let keep = carry.len().saturating_sub(3);
                carry.drain(..keep);
            }
        }
    }
    drop(s);
    let _ = sender.join();
    assert!(
        answered < COMMANDS / 2,
        "the proxy kept writing to a client that did not read: {answered} answers"
    );
    let log = proxy.log();
    assert!(!log.contains("panicked"), "the proxy panicked:\n{log}");
}
