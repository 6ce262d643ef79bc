//! The guard as the sessions use it, end to end with real Dovecot and real Redis: one counter for
//! every protocol, a banned client refused with the reply of a wrong password, bans shared by two
//! proxies through Redis, local limits while Redis is down, the admin listener (metrics, bans
//! API behind a token), per-account session caps and SIGHUP reloading the guard settings.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::dovecot::Dovecot;
use common::ports::free_port;
use common::proxy::{Proxy, ProxyOptions, Raw};
use common::redis::RedisServer;

const ALICE: &str = "alice@example.org";
const RIGHT: &str = "a LOGIN alice alice-password\r\n";
const TOKEN: &str = "admin-token-for-tests-0123456789";

struct Setup {
    dovecot: Dovecot,
    proxy: Proxy,
    admin: u16,
    _dir: tempfile::TempDir,
}

/// A wrong-password LOGIN; each `n` is a different password (a repeated one counts once).
fn wrong(n: u32) -> String {
    format!("a LOGIN alice wrong-password-{n}\r\n")
}

/// A proxy whose guard bans an address at its third failure in a minute (`max = 2` failures
/// allowed), with an admin listener.
fn setup_with(dovecot: Dovecot, redis: Option<&RedisServer>, guard_extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let admin = free_port();
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    opts.backend_pop3_port = dovecot.pop3_port();
    opts.backend_submission_port = dovecot.submission_port();
    opts.guard = format!("ban_initial = \"1m\"\nban_jitter = 0.0\n{guard_extra}");
    if let Some(r) = redis {
        opts.guard
            .push_str(&format!("store = \"redis\"\nredis_url = \"{}\"\n", r.url()));
    }
    opts.extra = format!(
        "[[guard.window]]\nkey = \"ip\"\nperiod = \"1m\"\nmax = 2\n\n[admin]\nbind = \"127.0.0.1:{admin}\"\ntoken_file = \"{}\"\n",
        token.display()
    );
    let proxy = Proxy::start(opts);
    assert!(common::ports::wait_for_port(admin, Duration::from_secs(10)));
    Setup {
        dovecot,
        proxy,
        admin,
        _dir: dir,
    }
}

fn setup() -> Setup {
    setup_with(Dovecot::start(), None, "")
}

/// One IMAP LOGIN on a fresh connection; the tagged reply.
fn imap_login(port: u16, command: &str) -> String {
    let mut c = Raw::plain(port);
    c.line();
    c.send(command.as_bytes());
    c.until("a ").pop().unwrap_or_default()
}

fn pop3_login(port: u16, pass: &str) -> String {
    let mut c = Raw::tls_alpn(port, &["pop3"]);
    c.line();
    c.send(format!("USER alice\r\nPASS {pass}\r\n").as_bytes());
    c.line();
    c.line().unwrap_or_default()
}

fn smtp_login(port: u16, pass: &str) -> String {
    use base64_encode as b64;
    let mut c = Raw::tls_alpn(port, &["smtp"]);
    c.line();
    c.send(b"EHLO c\r\n");
    c.until("250 ");
    c.send(format!("AUTH PLAIN {}\r\n", b64(&format!("\0alice\0{pass}"))).as_bytes());
    c.line().unwrap_or_default()
}

fn base64_encode(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `curl` against the admin listener: (status, body).
fn admin(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn metric(port: u16, needle: &str) -> f64 {
    let (_, body) = admin(port, "GET", "/metrics", None);
    body.lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_banned_address_gets_the_wrong_password_reply_even_with_the_right_one_until_lifted() {
    let s = setup();
    let failed = imap_login(s.proxy.imap_plain, &wrong(1));
    assert!(
        failed.starts_with("a NO [AUTHENTICATIONFAILED]"),
        "{failed}"
    );
    imap_login(s.proxy.imap_plain, &wrong(2));
    assert!(
        imap_login(s.proxy.imap_plain, RIGHT).starts_with("a OK"),
        "not banned yet"
    );
    imap_login(s.proxy.imap_plain, &wrong(3));
    // Banned now: the right password gets exactly the wrong password's reply.
    assert_eq!(imap_login(s.proxy.imap_plain, RIGHT), failed);
    assert_eq!(
        s.dovecot.logins().len(),
        1,
        "the backend was reached while banned"
    );

    // The bans API needs the token; with it, the ban is listed and can be lifted.
    assert_eq!(admin(s.admin, "GET", "/bans", None).0, 401);
    assert_eq!(
        admin(s.admin, "GET", "/bans", Some("wrong-token-0123456789")).0,
        401
    );
    let (code, body) = admin(s.admin, "GET", "/bans", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    let bans: serde_json::Value = serde_json::from_str(&body).unwrap();
    let key = bans["bans"][0]["key"].as_str().unwrap().to_owned();
    assert_eq!(key, "ip:127.0.0.1");
    assert_eq!(bans["bans"][0]["protocol"], "imap");
    assert!(metric(s.admin, "portcullis_auth_attempts_total{protocol=\"imap\",mechanism=\"login\",result=\"denied\"}") >= 1.0);
    assert_eq!(metric(s.admin, "portcullis_guard_bans_active"), 1.0);
    assert_eq!(metric(s.admin, "portcullis_guard_bans_started_total"), 1.0);
    let (code, _) = admin(s.admin, "DELETE", &format!("/bans/{key}"), Some(TOKEN));
    assert_eq!(code, 200);
    assert!(imap_login(s.proxy.imap_plain, RIGHT).starts_with("a OK"));
    assert!(s.dovecot.saw_master_login(ALICE));
    assert_eq!(s.dovecot.logins().len(), 2);
    assert_eq!(admin(s.admin, "GET", "/healthz", None).0, 200);
    let log = s.proxy.log();
    assert!(!log.contains("wrong-password") && !log.contains("alice-password"));
}

#[test]
fn one_counter_across_imap_pop3_and_smtp() {
    let s = setup();
    assert!(imap_login(s.proxy.imap_plain, &wrong(1)).starts_with("a NO"));
    assert!(pop3_login(s.proxy.pop3s, "wrong-password-2").starts_with("-ERR [AUTH]"));
    assert!(smtp_login(s.proxy.submissions, "wrong-password-3").starts_with("535 5.7.8"));
    // Three failures from one address, three protocols: banned everywhere.
    assert!(pop3_login(s.proxy.pop3s, "alice-password").starts_with("-ERR [AUTH]"));
    assert!(smtp_login(s.proxy.submissions, "alice-password").starts_with("535 5.7.8"));
    assert!(imap_login(s.proxy.imap_plain, RIGHT).starts_with("a NO [AUTHENTICATIONFAILED]"));
    assert!(s.dovecot.logins().is_empty());
    let (_, body) = admin(s.admin, "GET", "/bans", Some(TOKEN));
    assert!(body.contains("\"protocol\":\"submission\""), "{body}");
}

#[test]
fn the_same_wrong_password_again_and_again_is_one_failure() {
    let s = setup();
    for _ in 0..10 {
        assert!(imap_login(s.proxy.imap_plain, &wrong(1)).starts_with("a NO"));
    }
    // A phone retrying yesterday's password is not an attacker.
    assert!(imap_login(s.proxy.imap_plain, RIGHT).starts_with("a OK"));
}

#[test]
fn two_proxies_share_bans_through_redis_and_keep_limits_when_it_goes() {
    let mut redis = RedisServer::start();
    let a = setup_with(Dovecot::start(), Some(&redis), "");
    let b = setup_with(Dovecot::start(), Some(&redis), "");
    assert!(imap_login(b.proxy.imap_plain, RIGHT).starts_with("a OK"));
    for n in 0..3 {
        imap_login(a.proxy.imap_plain, &wrong(n));
    }
    // The ban made through A holds on B within a second.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let reply = imap_login(b.proxy.imap_plain, RIGHT);
        if reply.starts_with("a NO [AUTHENTICATIONFAILED]") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B still lets the banned address in: {reply}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric(b.admin, "portcullis_guard_store_up"), 1.0);

    // Redis goes away: B counts locally, never unlimited. A fresh address (127.0.0.5) guesses
    // bob's password three times and is banned; another (127.0.0.6) is still served.
    redis.stop();
    let from = |ip: [u8; 4], command: &str| {
        let mut c = Raw::plain_from(b.proxy.imap_plain, std::net::Ipv4Addr::from(ip));
        c.line();
        c.send(command.as_bytes());
        c.until("a ").pop().unwrap_or_default()
    };
    let bob = "a LOGIN bob bob-password\r\n";
    for n in 0..3 {
        assert!(from([127, 0, 0, 5], &format!("a LOGIN bob wrong-{n}\r\n")).starts_with("a NO"));
    }
    assert!(from([127, 0, 0, 5], bob).starts_with("a NO [AUTHENTICATIONFAILED]"));
    assert!(from([127, 0, 0, 6], bob).starts_with("a OK"));
    assert_eq!(metric(b.admin, "portcullis_guard_store_up"), 0.0);
}

#[test]
fn per_account_session_cap_and_reload() {
    let s = setup_with(Dovecot::start(), None, "account_sessions = 1\n");
    let mut first = Raw::plain(s.proxy.imap_plain);
    first.line();
    first.send(RIGHT.as_bytes());
    assert!(first.until("a ").pop().unwrap().starts_with("a OK"));
    // A second session for the same account is a temporary failure while the first lives.
    let second = imap_login(s.proxy.imap_plain, RIGHT);
    assert!(second.starts_with("a NO [UNAVAILABLE]"), "{second}");

    // SIGHUP applies a new limit without dropping the first session.
    let config = std::fs::read_to_string(s.proxy.config_path()).unwrap();
    std::fs::write(
        s.proxy.config_path(),
        config.replace("account_sessions = 1", "account_sessions = 2"),
    )
    .unwrap();
    Command::new("kill")
        .args(["-HUP", &s.proxy.pid().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if imap_login(s.proxy.imap_plain, RIGHT).starts_with("a OK") {
            break;
        }
        assert!(Instant::now() < deadline, "reload did not apply");
        std::thread::sleep(Duration::from_millis(100));
    }
    first.send(b"b NOOP\r\n");
    assert!(first.until("b ").pop().unwrap().starts_with("b OK"));
}

#[test]
fn an_account_under_attack_stays_open_to_its_known_address() {
    // Only an account window here (the ip window of `setup_with` is replaced).
    let dovecot = Dovecot::start();
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    opts.guard = "ban_initial = \"1m\"\nban_jitter = 0.0\n".into();
    opts.extra = "[[guard.window]]\nkey = \"account\"\nperiod = \"1m\"\nmax = 2\n".into();
    let proxy = Proxy::start(opts);
    let from = |ip: [u8; 4], command: &str| {
        let mut c = Raw::plain_from(proxy.imap_plain, std::net::Ipv4Addr::from(ip));
        c.line();
        c.send(command.as_bytes());
        c.until("a ").pop().unwrap_or_default()
    };
    // Alice logs in from home with her short name, as her phone does.
    assert!(from([127, 0, 0, 1], RIGHT).starts_with("a OK"));
    // Attackers elsewhere guess her password with her short name.
    for (n, ip) in [[127, 0, 0, 21], [127, 0, 0, 22], [127, 0, 0, 23]]
        .into_iter()
        .enumerate()
    {
        assert!(from(ip, &wrong(n as u32)).starts_with("a NO"));
    }
    // Under protection: a new address is refused even with the right password...
    assert!(from([127, 0, 0, 24], RIGHT).starts_with("a NO [AUTHENTICATIONFAILED]"));
    // ...but her known address still gets in.
    assert!(from([127, 0, 0, 1], RIGHT).starts_with("a OK"));
}

#[test]
fn the_session_cap_spans_mail_and_http() {
    let dovecot = Dovecot::start();
    let secret = dovecot.master_secret().to_owned();
    let backend = common::httpbackend::HttpBackend::start(
        vec![format!("alice@example.org%proxy@example.org:{secret}")],
        false,
    );
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), &secret);
    opts.backend_http_port = backend.port();
    opts.guard = "account_sessions = 1\n".into();
    let proxy = Proxy::start(opts);
    let dav = || -> String {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "30",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(["-u", "alice:alice-password"])
            .arg(format!("http://127.0.0.1:{}/dav/", proxy.http))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(dav(), "200");
    // An IMAP session holds Alice's only slot: her HTTP requests wait their turn.
    let mut imap = Raw::plain(proxy.imap_plain);
    imap.line();
    imap.send(RIGHT.as_bytes());
    assert!(imap.until("a ").pop().unwrap().starts_with("a OK"));
    assert_eq!(dav(), "429");
    assert_eq!(
        backend.seen().len(),
        1,
        "the refused request was not forwarded"
    );
    imap.send(b"b LOGOUT\r\n");
    imap.until("b ");
    let deadline = Instant::now() + Duration::from_secs(5);
    while dav() != "200" {
        assert!(Instant::now() < deadline, "the slot was not given back");
        std::thread::sleep(Duration::from_millis(100));
    }
}
