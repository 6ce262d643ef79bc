//! SMTP submission end to end: Python smtplib, swaks, curl and openssl s_client → Portcullis →
//! real Dovecot submission (master login `user%master`) relaying to the harness's SMTP sink, and
//! the negative cases of SECURITY.md (no relay before AUTH, ever).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::authhttp::{AuthHttpServer, Mode};
use common::clients::Client;
use common::dovecot::Dovecot;
use common::proxy::{dev_ca, Proxy, ProxyOptions, Raw};

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";
const MASTER: &str = "proxy@example.org";

fn setup_with(dovecot: &Dovecot, mut opts: ProxyOptions) -> Proxy {
    opts.backend_submission_port = dovecot.submission_port();
    Proxy::start(opts)
}

fn setup() -> (Dovecot, Proxy) {
    let dovecot = Dovecot::start();
    let proxy = setup_with(
        &dovecot,
        ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret()),
    );
    (dovecot, proxy)
}

/// Successful submission logins Dovecot saw, as (target account, master) pairs.
fn submission_logins(dovecot: &Dovecot) -> Vec<(String, Option<String>)> {
    dovecot
        .logins()
        .into_iter()
        .filter(|r| r.service == "submission")
        .map(|r| (r.user.clone(), r.master_user().map(str::to_owned)))
        .collect()
}

/// `EHLO` keywords of a reply (without the first line, AUTH and STARTTLS), upper-cased.
fn keywords(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .skip(1)
        .map(|l| l[4..].trim_end().to_ascii_uppercase())
        .filter(|k| !k.starts_with("AUTH") && k != "STARTTLS")
        .collect()
}

#[test]
fn smtplib_submits_over_implicit_tls_and_starttls_with_the_authenticated_sender() {
    let (dovecot, proxy) = setup();
    for (port, tls, mode) in [
        (proxy.submissions, "implicit", "auth-plain"),
        (proxy.submission_starttls, "starttls", "auth-login"),
    ] {
        let run = Client::smtp(port)
            .tls(tls, &dev_ca())
            .mode(mode)
            .login("alice", "alice-password")
            .arg("--mail-from")
            .arg(ALICE)
            .arg("--rcpt")
            .arg(BOB)
            .message(&format!(
                "From: {ALICE}\r\nTo: {BOB}\r\nSubject: via {mode}\r\n\r\nbody\r\n.dot line\r\n"
            ))
            .actions(&["send", "quit"])
            .run();
        run.assert_ok();
        assert!(
            run.list("auth_mechanisms").contains(&"PLAIN".to_string()),
            "{run:#?}"
        );
    }
    let messages = dovecot.sink().wait_for_messages(2, Duration::from_secs(10));
    assert_eq!(messages.len(), 2, "{}", proxy.log());
    for (m, mode) in messages.iter().zip(["auth-plain", "auth-login"]) {
        assert_eq!(m.mail_from, ALICE);
        assert_eq!(m.rcpt_to, vec![BOB.to_string()]);
        assert!(m.text().contains(&format!("Subject: via {mode}")));
        assert!(m.text().contains("\r\n.dot line\r\n"));
    }
    // The backend saw master logins for the canonical account (alice typed "alice").
    assert_eq!(
        submission_logins(&dovecot),
        vec![
            (ALICE.to_string(), Some(MASTER.to_string())),
            (ALICE.to_string(), Some(MASTER.to_string()))
        ]
    );
}

#[test]
fn swaks_and_curl_submit_through_the_proxy() {
    let (dovecot, proxy) = setup();
    let swaks = |extra: &[&str], port: u16, subject: &str| {
        let out = Command::new("swaks")
            .args(["--server", &format!("127.0.0.1:{port}")])
            .args(["--from", ALICE, "--to", BOB])
            .args(["--auth", "PLAIN", "--auth-user", "alice"])
            .args(["--auth-password", "alice-password"])
            .args(["--header", &format!("Subject: {subject}")])
            .args(["--tls-ca-path"])
            .arg(dev_ca())
            .args(["--tls-verify", "--tls-sni", "localhost"])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}\n{}", proxy.log());
        text
    };
    let implicit = swaks(&["--tls-on-connect"], proxy.submissions, "swaks implicit");
    assert!(implicit.contains("235 2.7.0"), "{implicit}");
    let starttls = swaks(&["--tls"], proxy.submission_starttls, "swaks starttls");
    assert!(
        starttls.contains("<-  220 2.0.0 Ready to start TLS"),
        "{starttls}"
    );

    let dir = tempfile::tempdir().unwrap();
    let mail = dir.path().join("mail.txt");
    std::fs::write(
        &mail,
        format!("From: {ALICE}\r\nTo: {BOB}\r\nSubject: curl smtps\r\n\r\nfrom curl\r\n"),
    )
    .unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(dev_ca())
        .args(["--user", "alice:alice-password"])
        .args(["--mail-from", ALICE, "--mail-rcpt", BOB, "-T"])
        .arg(&mail)
        .arg(format!("smtps://localhost:{}", proxy.submissions))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let messages = dovecot.sink().wait_for_messages(3, Duration::from_secs(10));
    let subjects: Vec<String> = messages.iter().map(|m| m.text()).collect();
    for s in ["swaks implicit", "swaks starttls", "curl smtps"] {
        assert!(
            subjects
                .iter()
                .any(|t| t.contains(&format!("Subject: {s}"))),
            "{s}: {subjects:?}"
        );
    }
    assert!(messages.iter().all(|m| m.mail_from == ALICE));
    assert_eq!(submission_logins(&dovecot).len(), 3);
}

#[test]
fn openssl_starttls_and_ehlo_mirrors_the_backend() {
    let (dovecot, proxy) = setup();
    // What the backend itself offers.
    let mut direct = Raw::plain(dovecot.submission_port());
    direct.line();
    direct.send(b"EHLO probe.example\r\n");
    let backend = keywords(&direct.until("250 "));
    assert!(backend.iter().any(|k| k.starts_with("SIZE")), "{backend:?}");

    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-crlf",
            "-starttls",
            "smtp",
            "-CAfile",
        ])
        .arg(dev_ca())
        .args([
            "-connect",
            &format!("127.0.0.1:{}", proxy.submission_starttls),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(b"EHLO client.example\n").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        stdin
            .write_all(b"AUTH PLAIN AGFsaWNlAGFsaWNlLXBhc3N3b3Jk\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        stdin.write_all(b"NOOP\nQUIT\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let ehlo: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("250-"))
        .take_while(|l| l.starts_with("250"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    assert_eq!(keywords(&ehlo), backend, "{text}");
    assert!(
        ehlo.iter().any(|l| l.contains("AUTH PLAIN LOGIN")),
        "{text}"
    );
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")), "{text}");
    assert!(text.contains("235 2.7.0"), "{text}");
    // After the splice the NOOP is the backend's.
    assert!(
        text.contains("250 2.0.0 OK") || text.contains("250 OK"),
        "{text}"
    );
}

#[test]
fn nothing_reaches_the_backend_before_auth() {
    let (dovecot, proxy) = setup();
    let mut c = Raw::tls_alpn(proxy.submissions, &["smtp"]);
    assert!(c.line().unwrap().starts_with("220 "));
    c.send(b"MAIL FROM:<alice@example.org>\r\n");
    assert_eq!(c.line().unwrap(), "530 5.7.0 Authentication required\r\n");
    c.send(b"EHLO c\r\n");
    c.until("250 ");
    // A failing AUTH with the whole transaction pipelined behind it.
    c.send(
        b"AUTH PLAIN AGFsaWNlAHdyb25nLXBhc3N3b3Jk\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
    );
    assert_eq!(
        c.line().unwrap(),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
    assert_eq!(c.line().unwrap(), "530 5.7.0 Authentication required\r\n");
    assert_eq!(c.line().unwrap(), "530 5.7.0 Authentication required\r\n");
    assert!(c.line().unwrap().starts_with("421 4.7.0"));
    assert!(c.closed());
    std::thread::sleep(Duration::from_millis(300));
    assert!(dovecot.sink_messages().is_empty());
    assert!(submission_logins(&dovecot).is_empty());
}

#[test]
fn pipelined_transaction_behind_a_good_auth_is_delivered() {
    let (dovecot, proxy) = setup();
    let mut c = Raw::tls_alpn(proxy.submissions, &["smtp"]);
    c.line();
    c.send(b"EHLO c\r\n");
    let ehlo = c.until("250 ");
    assert!(ehlo.iter().any(|l| l.contains("PIPELINING")), "{ehlo:?}");
    c.send(b"AUTH PLAIN AGFsaWNlAGFsaWNlLXBhc3N3b3Jk\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n");
    assert_eq!(c.line().unwrap(), "235 2.7.0 Authentication successful\r\n");
    assert!(c.line().unwrap().starts_with("250"));
    assert!(c.line().unwrap().starts_with("250"));
    assert!(c.line().unwrap().starts_with("354"));
    c.send(b"Subject: pipelined\r\n\r\nhello\r\n.\r\nQUIT\r\n");
    assert!(c.line().unwrap().starts_with("250"));
    assert!(c.line().unwrap().starts_with("221"));
    let m = dovecot.sink().wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(m.len(), 1);
    assert!(m[0].text().contains("Subject: pipelined"));
}

#[test]
fn clear_text_rules_identity_and_failures() {
    let (dovecot, proxy) = setup();
    // Before STARTTLS: no AUTH offered, AUTH refused; pipelining behind STARTTLS closes.
    let mut c = Raw::plain(proxy.submission_starttls);
    c.line();
    c.send(b"EHLO c\r\n");
    let ehlo = c.until("250 ");
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")), "{ehlo:?}");
    assert!(ehlo.last().unwrap().contains("STARTTLS"));
    c.send(b"AUTH PLAIN AGFsaWNlAGFsaWNlLXBhc3N3b3Jk\r\n");
    assert!(c.line().unwrap().starts_with("538 5.7.11"));
    c.send(b"STARTTLS\r\nAUTH PLAIN AGFsaWNlAGFsaWNlLXBhc3N3b3Jk\r\n");
    assert!(c.closed());

    // Wrong password, unknown user and a master-form name all get the same reply.
    for payload in [
        "\0alice\0wrong-password",
        "\0nobody\0some-password",
        "\0alice%proxy@example.org\0master-secret-for-tests",
    ] {
        let mut c = Raw::tls_alpn(proxy.submissions, &["smtp"]);
        c.line();
        c.send(b"EHLO c\r\n");
        c.until("250 ");
        c.send(format!("AUTH PLAIN {}\r\n", b64(payload)).as_bytes());
        assert_eq!(
            c.line().unwrap(),
            "535 5.7.8 Authentication credentials invalid\r\n"
        );
    }
    // An oversized line is refused without buffering it; the session goes on.
    let mut c = Raw::tls_alpn(proxy.submissions, &["smtp"]);
    c.line();
    let mut line = b"EHLO ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 1 << 20));
    line.extend_from_slice(b"\r\nNOOP\r\n");
    c.send(&line);
    assert_eq!(c.line().unwrap(), "500 5.5.6 Line too long\r\n");
    assert_eq!(c.line().unwrap(), "250 2.0.0 OK\r\n");
    assert!(submission_logins(&dovecot).is_empty());
    let log = proxy.log();
    assert!(!log.contains("wrong-password") && !log.contains("master-secret-for-tests"));
}

#[test]
fn authenticator_down_is_454() {
    let dovecot = Dovecot::start();
    let auth = AuthHttpServer::start(dovecot.addr(dovecot.submission_port()));
    auth.add_account("alice", "alice-password", ALICE);
    let proxy = setup_with(
        &dovecot,
        ProxyOptions::nginx(dovecot.imap_port(), dovecot.master_secret(), &auth.url()),
    );
    let login = |expect: &str| {
        let mut c = Raw::tls_alpn(proxy.submissions, &["smtp"]);
        c.line();
        c.send(b"EHLO c\r\n");
        c.until("250 ");
        c.send(b"AUTH PLAIN AGFsaWNlAGFsaWNlLXBhc3N3b3Jk\r\n");
        let reply = c.line().unwrap();
        assert!(reply.starts_with(expect), "expected {expect}, got {reply}");
    };
    login("235 2.7.0");
    assert_eq!(
        auth.requests()[0].header("Auth-Protocol").as_deref(),
        Some("smtp")
    );
    auth.set_mode(Mode::Down);
    login("454 4.7.0");
}

fn b64(s: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(s.as_bytes())
        .unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

/// A submission backend that waits `delay` before each greeting and offers `keyword` in its
/// `EHLO` reply; counts the connections it accepted. No real server can be told to stall.
fn slow_smtp_backend(
    delay: Duration,
    keyword: &'static str,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = stream.write_all(b"220 slow.example ESMTP\r\n");
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    let verb = line.trim().to_ascii_uppercase();
                    let reply = if verb.starts_with("EHLO") {
                        format!("250-slow.example\r\n250-{keyword}\r\n250 SIZE 4242\r\n")
                    } else if verb == "QUIT" {
                        let _ = stream.write_all(b"221 2.0.0 Bye\r\n");
                        return;
                    } else {
                        "250 2.0.0 OK\r\n".to_owned()
                    };
                    let _ = stream.write_all(reply.as_bytes());
                    line.clear();
                }
            });
        }
    });
    (port, accepted)
}

#[test]
fn clients_arriving_during_the_first_probe_wait_for_it() {
    // The proxy's start-up port check opens the first submission session, which starts the
    // probe; every client below arrives while that probe waits for the slow greeting.
    let (backend, probes) = slow_smtp_backend(Duration::from_millis(1500), "X-SLOW-BACKEND");
    let mut opts = ProxyOptions::file_users(backend, "unused");
    opts.backend_submission_port = backend;
    let proxy = Proxy::start(opts);
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let port = proxy.submission_starttls;
            std::thread::spawn(move || {
                let mut c = Raw::plain(port);
                let greeting = c.line().unwrap_or_default();
                c.send(b"EHLO client.example\r\n");
                let ehlo = c.until("250 ");
                c.send(b"QUIT\r\n");
                (greeting, keywords(&ehlo))
            })
        })
        .collect();
    for c in clients {
        let (greeting, keywords) = c.join().unwrap();
        assert!(greeting.starts_with("220 "), "{greeting}");
        assert!(
            keywords.iter().any(|k| k == "X-SLOW-BACKEND"),
            "a client saw the defaults instead of the backend's keywords: {keywords:?}"
        );
        assert!(keywords.iter().any(|k| k == "SIZE 4242"), "{keywords:?}");
    }
    assert_eq!(
        probes.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one probe serves every waiting session"
    );
}

#[test]
fn cleartext_data_of_a_large_message_arrives_intact_mostly_socket_to_socket() {
    let dovecot = Dovecot::start();
    // A cleartext submission listener (loopback only), so both legs are plain sockets.
    let plain = common::ports::free_port();
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    opts.extra = format!(
        "[[listener]]\nprotocol = \"submission\"\nbind = [\"127.0.0.1:{plain}\"]\ntls = \"none\"\nallow_plaintext_auth = true\n"
    );
    let proxy = setup_with(&dovecot, opts);
    assert!(common::ports::wait_for_port(plain, Duration::from_secs(10)));
    // Python's smtplib over the plain listener; the body holds lines that look like SMTP
    // commands, which must pass as data.
    let code = r#"
import os, smtplib
lines = []
size = 0
i = 0
while size < 3 << 20:
    lines.append(("RCPT TO:<x%d@example.org> %016x %s\r\n" % (i, i, "q" * (i % 47))).encode())
    size += len(lines[-1])
    i += 1
body = b"".join(lines)
msg = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: big\r\n\r\n" + body
s = smtplib.SMTP("127.0.0.1", int(os.environ["PORT"]))
s.login("alice", "alice-password")
s.sendmail("alice@example.org", ["bob@example.org"], msg)
s.quit()
open(os.environ["BODY_FILE"], "wb").write(body)
"#;
    let dir = tempfile::tempdir().unwrap();
    let body_file = dir.path().join("body");
    let (rc, out, err) = common::clients::run_python(
        code,
        &[
            ("PORT", &plain.to_string()),
            ("BODY_FILE", body_file.to_str().unwrap()),
        ],
    );
    assert_eq!(rc, Some(0), "{out}\n{err}");
    let body = std::fs::read(&body_file).unwrap();
    let messages = dovecot.sink().wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages.len(), 1, "{}", proxy.log());
    assert_eq!(messages[0].rcpt_to, vec![BOB.to_string()]);
    assert!(
        messages[0].data.ends_with(&body),
        "the relayed message differs ({} bytes, body {})",
        messages[0].data.len(),
        body.len()
    );
    let zero_copy = proxy.first_session_zero_copy_to_backend();
    let sent = body.len() as u64;
    assert!(
        zero_copy > sent / 2 && zero_copy <= sent + 200,
        "zero_copy_to_backend={zero_copy} of {sent}"
    );
}
