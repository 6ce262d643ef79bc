//! POP3 end to end: Python poplib, curl and openssl s_client → Portcullis → real Dovecot pop3d
//! (master login `user%master`), and the negative cases of SECURITY.md.

mod common;

use std::process::Command;
use std::time::Duration;

use common::authhttp::{AuthHttpServer, Mode};
use common::clients::Client;
use common::dovecot::Dovecot;
use common::proxy::{dev_ca, Proxy, ProxyOptions, Raw};

const ALICE: &str = "alice@example.org";

fn setup_with(dovecot: &Dovecot, mut opts: ProxyOptions) -> Proxy {
    opts.backend_pop3_port = dovecot.pop3_port();
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

#[test]
fn poplib_user_pass_and_auth_plain_retrieve_mail_through_master_login() {
    let (dovecot, proxy) = setup();
    dovecot.deliver(ALICE, b"Subject: pop\r\n\r\npop3 body\r\n");
    let run = Client::pop3(proxy.pop3s)
        .tls("implicit", &dev_ca())
        .mode("user-pass")
        .login("alice", "alice-password")
        .actions(&["stat", "retr:1", "quit"])
        .run();
    run.assert_ok();
    assert!(
        run.fetched().unwrap_or_default().contains("pop3 body"),
        "{run:#?}"
    );
    Client::pop3(proxy.pop3_starttls)
        .tls("starttls", &dev_ca())
        .mode("authenticate-plain")
        .login("alice", "alice-password")
        .actions(&["list", "quit"])
        .run()
        .assert_ok();
    assert!(dovecot.saw_master_login(ALICE));
    assert_eq!(dovecot.direct_logins(ALICE), 0);
}

#[test]
fn curl_pop3s_lists_and_retrieves() {
    let (dovecot, proxy) = setup();
    dovecot.deliver(ALICE, b"Subject: curl\r\n\r\ncurl pop3 body\r\n");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(dev_ca())
        .args(["--user", "alice:alice-password"])
        .arg(format!("pop3s://localhost:{}/1", proxy.pop3s))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("curl pop3 body"));
}

#[test]
fn openssl_s_client_stls() {
    let (_dovecot, proxy) = setup();
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-crlf",
            "-starttls",
            "pop3",
            "-CAfile",
        ])
        .arg(dev_ca())
        .args(["-connect", &format!("127.0.0.1:{}", proxy.pop3_starttls)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin
            .write_all(b"USER alice\nPASS alice-password\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        stdin.write_all(b"STAT\nQUIT\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("+OK Logged in"), "{text}");
    assert!(text.matches("+OK").count() >= 4, "{text}");
}

#[test]
fn failures_look_the_same_and_plaintext_is_refused() {
    let (dovecot, proxy) = setup();
    for (user, pass) in [
        ("alice", "wrong-password-xyz"),
        ("nobody", "x-password"),
        ("alice%proxy@example.org", "master-secret-for-tests"),
    ] {
        let mut c = Raw::tls_alpn(proxy.pop3s, &["pop3"]);
        c.line();
        c.send(format!("USER {user}\r\nPASS {pass}\r\n").as_bytes());
        c.line();
        assert_eq!(c.line().unwrap(), "-ERR [AUTH] Authentication failed\r\n");
    }
    assert_eq!(dovecot.logins().len(), 0);
    let mut c = Raw::plain(proxy.pop3_starttls);
    c.line();
    c.send(b"USER alice\r\n");
    assert!(c.line().unwrap().starts_with("-ERR [AUTH] Plaintext"));
    c.send(b"STLS\r\nUSER alice\r\n");
    assert!(c.closed());
    // A 1 MiB line is refused without buffering it.
    let mut c = Raw::tls_alpn(proxy.pop3s, &["pop3"]);
    c.line();
    let mut line = b"USER ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 1 << 20));
    line.extend_from_slice(b"\r\nCAPA\r\n");
    c.send(&line);
    assert_eq!(c.line().unwrap(), "-ERR Command line too long\r\n");
    assert_eq!(c.line().unwrap(), "+OK Capability list follows\r\n");
}

#[test]
fn authenticator_down_is_sys_temp() {
    let dovecot = Dovecot::start();
    let auth = AuthHttpServer::start(dovecot.addr(dovecot.pop3_port()));
    auth.add_account("alice", "alice-password", ALICE);
    let proxy = setup_with(
        &dovecot,
        ProxyOptions::nginx(dovecot.imap_port(), dovecot.master_secret(), &auth.url()),
    );
    let login = |expect: &str| {
        let mut c = Raw::tls_alpn(proxy.pop3s, &["pop3"]);
        c.line();
        c.send(b"USER alice\r\nPASS alice-password\r\n");
        c.line();
        let reply = c.line().unwrap();
        assert!(reply.starts_with(expect), "expected {expect}, got {reply}");
    };
    login("+OK Logged in");
    assert_eq!(
        auth.requests()[0].header("Auth-Protocol").as_deref(),
        Some("pop3")
    );
    auth.set_mode(Mode::Down);
    login("-ERR [SYS/TEMP]");
}

#[test]
fn cleartext_retr_of_a_large_message_arrives_intact_mostly_socket_to_socket() {
    use std::io::{Read, Write};
    let dovecot = Dovecot::start();
    // A cleartext POP3 listener (loopback only), so both legs are plain sockets.
    let plain = common::ports::free_port();
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    opts.extra = format!(
        "[[listener]]\nprotocol = \"pop3\"\nbind = [\"127.0.0.1:{plain}\"]\ntls = \"none\"\nallow_plaintext_auth = true\n"
    );
    let proxy = setup_with(&dovecot, opts);
    assert!(common::ports::wait_for_port(plain, Duration::from_secs(10)));
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while body.len() < 3 << 20 {
        let pad = "z".repeat((i % 53) as usize);
        body.extend_from_slice(format!("{i:016x}-{pad}\r\n").as_bytes());
        i += 1;
    }
    dovecot.deliver(ALICE, &body);
    dovecot.deliver(ALICE, b"Subject: small\r\n\r\nsmall one\r\n");

    let mut s = std::net::TcpStream::connect(("127.0.0.1", plain)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut seen = Vec::new();
    let mut read_until = |s: &mut std::net::TcpStream, end: &[u8]| {
        let mut buf = [0u8; 16384];
        while memchr::memmem::find(&seen, end).is_none() {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {} bytes", seen.len());
            seen.extend_from_slice(&buf[..n]);
        }
        std::mem::take(&mut seen)
    };
    read_until(&mut s, b"\r\n");
    s.write_all(b"USER alice\r\n").unwrap();
    read_until(&mut s, b"\r\n");
    s.write_all(b"PASS alice-password\r\n").unwrap();
    let login = read_until(&mut s, b"\r\n");
    assert!(
        login.starts_with(b"+OK"),
        "{}",
        String::from_utf8_lossy(&login)
    );
    // Both messages back to back: the large one through the pipe, then the small one.
    s.write_all(b"RETR 1\r\n").unwrap();
    let first = read_until(&mut s, b"\r\n.\r\n");
    s.write_all(b"RETR 2\r\nQUIT\r\n").unwrap();
    // The small message, then QUIT's answer, arrive behind it.
    read_until(&mut s, b"small one\r\n.\r\n+OK");
    let head = b"+OK ";
    assert!(first.starts_with(head), "{:?}", &first[..40]);
    let at = memchr::memmem::find(&first, b"\r\n").unwrap() + 2;
    let got = &first[at..first.len() - 3];
    assert_eq!(got.len(), body.len(), "message length");
    assert!(got == &body[..], "message 1 differs");
    let zero_copy = proxy.first_session_zero_copy();
    assert!(
        zero_copy > (body.len() as u64) / 2 && zero_copy <= body.len() as u64 + 100,
        "zero_copy={zero_copy}"
    );
}
