//! HTTP end to end: curl, raw sockets and a Python CalDAV client → Portcullis → a recording
//! backend (exact headers) or a real Radicale DAV server that only knows the master logins.
//!
//! What must hold: users' own passwords work; the backend only ever sees the master form for
//! the canonical account; requests without valid credentials are answered 401 and never
//! forwarded; framing ambiguity is refused and the connection closed; keep-alive never carries an
//! identity; HTTP/2 announces its stream and header limits and refuses streams beyond them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::httpbackend::HttpBackend;
use common::ports::{free_port, wait_for_port};
use common::proxy::{dev_ca, Proxy, ProxyOptions};

const SECRET: &str = "http-master-secret";
const MASTER: &str = "proxy@example.org";

fn master_form(account: &str) -> String {
    format!("{account}%{MASTER}:{SECRET}")
}

fn backend(proxy_v2: bool) -> HttpBackend {
    HttpBackend::start(
        vec![
            master_form("alice@example.org"),
            master_form("bob@example.org"),
        ],
        proxy_v2,
    )
}

fn options(backend_port: u16) -> ProxyOptions {
    let mut opts = ProxyOptions::file_users(free_port(), SECRET);
    opts.backend_http_port = backend_port;
    opts
}

fn start(backend: &HttpBackend) -> Proxy {
    Proxy::start(options(backend.port()))
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Runs curl against the proxy's TLS port; returns (status, body).
fn curl(port: u16, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(dev_ca())
        .args(["-o", "-", "-w", "\n%{http_code}"])
        .args(args.iter().map(|a| a.replace("{port}", &port.to_string())))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Sends raw bytes on a fresh cleartext connection and reads until the proxy closes it (or 5 s).
fn raw(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response (head + Content-Length body) from a keep-alive connection.
fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, head + &String::from_utf8_lossy(&body))
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn users_own_password_reaches_the_backend_as_master_basic_for_the_canonical_account() {
    let backend = backend(false);
    let proxy = start(&backend);
    for version in ["--http1.1", "--http2"] {
        let (code, body) = curl(
            proxy.https,
            &[
                version,
                "-u",
                "alice:alice-password",
                "-H",
                "X-Forwarded-For: 6.6.6.6",
                "-H",
                "Forwarded: for=6.6.6.6",
                "-H",
                "X-Real-IP: 6.6.6.6",
                "-H",
                "Proxy-Authorization: Basic eDp5",
                "https://localhost:{port}/jmap/session",
            ],
        );
        assert_eq!(
            (code, body.as_str()),
            (200, "ok"),
            "{version}\n{}",
            proxy.log()
        );
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    for r in &seen {
        assert_eq!(
            r.basic().as_deref(),
            Some(master_form("alice@example.org").as_str())
        );
        assert_eq!(r.all("authorization").len(), 1);
        assert_eq!(r.all("x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(r.all("x-real-ip"), ["127.0.0.1"]);
        assert_eq!(r.all("forwarded"), ["for=127.0.0.1;proto=https"]);
        assert_eq!(r.header("x-forwarded-proto"), Some("https"));
        assert!(r.header("proxy-authorization").is_none(), "{r:#?}");
        assert!(
            r.header("host").is_some_and(|h| h.starts_with("localhost")),
            "{r:#?}"
        );
    }
    // The password never appears in the proxy's log.
    assert!(!proxy.log().contains("alice-password"));
    assert!(!proxy.log().contains(SECRET));
}

#[test]
fn requests_without_valid_credentials_get_401_and_are_not_forwarded() {
    let backend = backend(false);
    let proxy = start(&backend);
    let cases: &[&[&str]] = &[
        &["https://localhost:{port}/dav/cal/alice/"],
        &[
            "-u",
            "alice:wrong",
            "https://localhost:{port}/dav/cal/alice/",
        ],
        &[
            "-u",
            "nobody:alice-password",
            "https://localhost:{port}/jmap/session",
        ],
        &[
            "-u",
            "bob%proxy@example.org:http-master-secret",
            "https://localhost:{port}/jmap/session",
        ],
        &[
            "-u",
            "bob*x:bob-password",
            "https://localhost:{port}/jmap/session",
        ],
        &[
            "-H",
            "Authorization: Bearer abc",
            "https://localhost:{port}/jmap/session",
        ],
        &[
            "-H",
            "Authorization: Basic !!!",
            "https://localhost:{port}/jmap/session",
        ],
        &[
            "-H",
            "Authorization: Digest x=y",
            "https://localhost:{port}/jmap/session",
        ],
        &[
            "--path-as-is",
            "https://localhost:{port}/.well-known/../jmap/session",
        ],
        &[
            "--path-as-is",
            "https://localhost:{port}/.well-known/%2e%2e/jmap/session",
        ],
    ];
    for args in cases {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "--cacert",
            ])
            .arg(dev_ca())
            .args(
                args.iter()
                    .map(|a| a.replace("{port}", &proxy.https.to_string())),
            )
            .output()
            .unwrap();
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(head.contains(" 401"), "{args:?}: {head}");
        assert!(
            head.contains("www-authenticate: basic realm="),
            "{args:?}: {head}"
        );
    }
    assert!(backend.seen().is_empty(), "{:#?}", backend.seen());
    // Anonymous discovery is forwarded, without any credentials.
    let (code, _) = curl(
        proxy.https,
        &["https://localhost:{port}/.well-known/caldav"],
    );
    assert_eq!(code, 200);
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].header("authorization").is_none());
}

#[test]
fn smuggling_probes_are_refused_and_the_connection_closed() {
    let backend = backend(false);
    let proxy = start(&backend);
    let auth = basic("alice", "alice-password");
    let probes: Vec<(&str, String)> = vec![
        (
            "CL+TE",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
        (
            "TE+CL",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
        (
            "TE gzip, chunked",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE xchunked",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE twice",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE with space before colon",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"),
        ),
        (
            "duplicate CL, same",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd"),
        ),
        (
            "duplicate CL, different",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd"),
        ),
        (
            "CL list",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 4, 4\r\n\r\nabcd"),
        ),
        (
            "bare LF",
            format!("POST /echo HTTP/1.1\nHost: x\nAuthorization: {auth}\nContent-Length: 4\n\nabcd"),
        ),
        (
            "bare LF after a good request",
            format!("GET /jmap/session HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\nPOST /echo HTTP/1.1\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 4\r\n\r\nabcd"),
        ),
        (
            "obs-fold",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nX-Folded: a\r\n b\r\nContent-Length: 4\r\n\r\nabcd"),
        ),
        (
            "obs-fold in Transfer-Encoding",
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "duplicate Authorization",
            format!("GET /jmap/session HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nAuthorization: {}\r\n\r\n", basic("bob", "bob-password")),
        ),
        (
            "duplicate Host",
            format!("GET /jmap/session HTTP/1.1\r\nHost: x\r\nHost: y\r\nAuthorization: {auth}\r\n\r\n"),
        ),
        (
            "too many headers",
            format!(
                "GET /jmap/session HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n{}\r\n",
                (0..120).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
            ),
        ),
        (
            "header block too large",
            format!(
                "GET /jmap/session HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nX-Big: {}\r\n\r\n",
                "a".repeat(20 * 1024)
            ),
        ),
        (
            "request target too long",
            format!("GET /{} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n", "a".repeat(9 * 1024)),
        ),
    ];
    for (name, probe) in &probes {
        let reply = raw(proxy.http, probe.as_bytes());
        let status = status_of(&reply);

        assert!(
            (400..500).contains(&status) || reply.is_empty(),
            "{name}: {reply}"
        );
        // One answer at most, then the connection is closed: nothing smuggled behind it.
        assert!(reply.matches("HTTP/1.1").count() <= 1, "{name}: {reply}");
    }
    // Only the good request ahead of the bare-LF one may have been forwarded: scanning fails the
    // connection as soon as the bad head arrives, which can be before hyper dispatched the first.
    let seen = backend.seen();
    assert!(
        seen.iter()
            .all(|r| r.method == "GET" && r.path == "/jmap/session"),
        "{seen:#?}"
    );
}

#[test]
fn keep_alive_never_carries_an_identity() {
    let backend = backend(false);
    let proxy = start(&backend);
    let mut s = TcpStream::connect(("127.0.0.1", proxy.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = |auth: Option<String>| {
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        format!("GET /jmap/session HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n")
    };
    let steps = [
        (Some(basic("alice", "alice-password")), 200),
        (None, 401),
        (Some(basic("bob", "alice-password")), 401),
        (Some(basic("bob%proxy@example.org", SECRET)), 401),
        (Some(basic("bob", "bob-password")), 200),
        (None, 401),
    ];
    for (auth, want) in steps {
        s.write_all(req(auth.clone()).as_bytes()).unwrap();
        let (status, text) = read_response(&mut s);
        assert_eq!(status, want, "{auth:?}: {text}");
    }
    let users: Vec<_> = backend.seen().iter().map(|r| r.basic()).collect();
    assert_eq!(
        users,
        [
            Some(master_form("alice@example.org")),
            Some(master_form("bob@example.org"))
        ]
    );
}

#[test]
fn bodies_stream_both_ways_and_methods_pass_through() {
    let backend = backend(false);
    let proxy = start(&backend);
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("up.bin");
    let data: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&upload, &data).unwrap();
    let down = dir.path().join("down.bin");
    for version in ["--http1.1", "--http2"] {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "60", version, "--cacert"])
            .arg(dev_ca())
            .args(["-u", "alice:alice-password", "-T"])
            .arg(&upload)
            .arg("-o")
            .arg(&down)
            .arg(format!("https://localhost:{}/echo/file", proxy.https))
            .status()
            .unwrap();
        assert!(out.success());
        assert!(
            std::fs::read(&down).unwrap() == data,
            "{version}: echo differs"
        );
    }
    let (code, body) = curl(
        proxy.https,
        &[
            "-u",
            "alice:alice-password",
            "https://localhost:{port}/big/3000000",
        ],
    );
    assert_eq!((code, body.len()), (200, 3_000_000));
    for method in [
        "PROPFIND",
        "REPORT",
        "MKCALENDAR",
        "PROPPATCH",
        "DELETE",
        "OPTIONS",
    ] {
        let (code, _) = curl(
            proxy.https,
            &[
                "-u",
                "alice:alice-password",
                "-X",
                method,
                "-H",
                "Depth: 1",
                "--data-binary",
                "<x/>",
                "https://localhost:{port}/dav/cal/alice/",
            ],
        );
        assert_eq!(code, 200, "{method}");
    }
    let seen = backend.seen();
    let methods: Vec<_> = seen.iter().map(|r| r.method.as_str()).collect();
    assert!(methods.ends_with(&[
        "PROPFIND",
        "REPORT",
        "MKCALENDAR",
        "PROPPATCH",
        "DELETE",
        "OPTIONS"
    ]));
    let propfind = seen.iter().find(|r| r.method == "PROPFIND").unwrap();
    assert_eq!(propfind.body, b"<x/>");
    assert_eq!(propfind.header("depth"), Some("1"));
}

#[test]
fn websocket_upgrade_only_after_authentication() {
    let backend = backend(false);
    let proxy = start(&backend);
    let upgrade = |auth: &str| {
        format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: jmap\r\n{auth}\r\n")
    };
    let reply = raw(proxy.http, upgrade("").as_bytes());
    assert_eq!(status_of(&reply), 401, "{reply}");
    assert!(backend.seen().is_empty());

    let mut s = TcpStream::connect(("127.0.0.1", proxy.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = format!("Authorization: {}\r\n", basic("alice", "alice-password"));
    s.write_all(upgrade(&auth).as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    assert!(
        buf.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    s.write_all(b"frames both ways").unwrap();
    let mut echo = [0u8; 16];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"frames both ways");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].basic(), Some(master_form("alice@example.org")));
    assert_eq!(seen[0].header("upgrade"), Some("websocket"));
    assert_eq!(seen[0].header("sec-websocket-protocol"), Some("jmap"));
}

#[test]
fn oauth_login_form_is_checked_and_rewritten_for_the_master() {
    let backend = backend(false);
    let proxy = start(&backend);
    let (code, body) = curl(
        proxy.https,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            r#"{"accountName":"alice","accountSecret":"alice-password","mfaToken":null}"#,
            "https://localhost:{port}/api/auth",
        ],
    );
    assert_eq!(code, 200, "{body}\n{}", proxy.log());
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let form: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(form["accountName"], "alice@example.org%proxy@example.org");
    assert_eq!(form["accountSecret"], SECRET);
    assert!(form["mfaToken"].is_null());
    assert_eq!(
        seen[0].header("content-length"),
        Some(seen[0].body.len().to_string().as_str())
    );
    backend.clear();
    for bad in [
        r#"{"accountName":"alice","accountSecret":"wrong"}"#,
        r#"{"accountName":"bob%proxy@example.org","accountSecret":"http-master-secret"}"#,
        r#"{"accountName":"alice","accountSecret":"x","accountName":"bob"}"#,
        r#"not json"#,
    ] {
        let (code, _) = curl(
            proxy.https,
            &["--data-binary", bad, "https://localhost:{port}/api/auth"],
        );
        assert!(code == 401 || code == 400, "{bad}: {code}");
    }
    assert!(backend.seen().is_empty());
    // v0.15's OAuth login step carries Basic: the Basic rule covers it.
    let (code, _) = curl(
        proxy.https,
        &[
            "-u",
            "alice:alice-password",
            "--data-binary",
            r#"{"type":"code","client_id":"x","redirect_uri":"https://x/"}"#,
            "https://localhost:{port}/api/oauth",
        ],
    );
    assert_eq!(code, 200);
    assert_eq!(
        backend.seen()[0].basic(),
        Some(master_form("alice@example.org"))
    );
}

#[test]
fn auth_cache_skips_the_authenticator_within_its_ttl() {
    let backend = backend(false);
    let mut opts = options(backend.port());
    opts.extra = "[http]\nauth_cache_ttl = \"30s\"\n".into();
    let proxy = Proxy::start(opts);
    for _ in 0..3 {
        let (code, _) = curl(
            proxy.https,
            &[
                "-u",
                "alice:alice-password",
                "https://localhost:{port}/jmap/session",
            ],
        );
        assert_eq!(code, 200);
    }
    // A wrong password is never served from the cache.
    let (code, _) = curl(
        proxy.https,
        &[
            "-u",
            "alice:alice-passwordX",
            "https://localhost:{port}/jmap/session",
        ],
    );
    assert_eq!(code, 401);
    let log = proxy.log();
    assert_eq!(
        log.matches("login accepted from the cache").count(),
        2,
        "{log}"
    );
    let fresh = log
        .lines()
        .filter(|l| l.contains("login accepted") && !l.contains("from the cache"))
        .count();
    assert_eq!(fresh, 1, "{log}");
}

#[test]
fn proxy_v2_header_names_the_client_on_every_backend_connection() {
    let backend = backend(true);
    let mut opts = options(backend.port());
    opts.backend_extra = "proxy_protocol = \"v2\"".into();
    let proxy = Proxy::start(opts);
    for _ in 0..2 {
        let (code, _) = curl(
            proxy.https,
            &[
                "-u",
                "alice:alice-password",
                "https://localhost:{port}/jmap/session",
            ],
        );
        assert_eq!(code, 200, "{}", proxy.log());
    }
    let pre = backend.preambles();
    assert!(!pre.is_empty());
    for p in &pre {
        assert!(p.starts_with(b"\r\n\r\n\0\r\nQUIT\n"), "{p:?}");
        // AF_INET source 127.0.0.1
        assert_eq!(&p[16..20], &[127, 0, 0, 1]);
    }
}

#[test]
fn tls_backend_is_verified_and_gets_the_master_login() {
    let backend = backend(false);
    let front = common::httpbackend::tls_front(backend.port());
    let mut opts = options(front);
    opts.backend_extra = format!(
        "tls_ca_file = \"{}\"\ntls_server_name = \"localhost\"",
        dev_ca().display()
    );
    opts.backend_http_tls = "implicit".into();
    let proxy = Proxy::start(opts);
    let port = proxy.http;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..2 {
        s.write_all(
            format!(
                "GET /jmap/session HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\n\r\n",
                basic("alice", "alice-password")
            )
            .as_bytes(),
        )
        .unwrap();
        let (status, text) = read_response(&mut s);
        assert_eq!(status, 200, "{text}");
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 2, "{}", proxy.log());
    assert!(seen
        .iter()
        .all(|r| r.basic() == Some(master_form("alice@example.org"))));
    // Both requests of the client connection reused one backend connection.
    assert_eq!(seen[0].conn, seen[1].conn);
}

#[test]
fn guard_ban_looks_like_a_wrong_password() {
    let backend = backend(false);
    let mut opts = options(backend.port());
    opts.extra = "[[guard.window]]\nkey = \"ip\"\nperiod = \"1m\"\nmax = 2\n".into();
    let proxy = Proxy::start(opts);
    // Distinct wrong passwords: the same one repeated counts once (a stale phone).
    for i in 0..4 {
        let (code, _) = curl(
            proxy.https,
            &[
                "-u",
                &format!("alice:wrong{i}"),
                "https://localhost:{port}/jmap/session",
            ],
        );
        assert_eq!(code, 401);
    }
    let (code, _) = curl(
        proxy.https,
        &[
            "-u",
            "alice:alice-password",
            "https://localhost:{port}/jmap/session",
        ],
    );
    assert_eq!(code, 401, "{}", proxy.log());
    assert!(backend.seen().is_empty());
    assert!(proxy.log().contains("denied by the guard"));
}

/// Radicale from Debian, configured to accept only the master forms: a user's own password can
/// only work through Portcullis.
struct Radicale {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Radicale {
    fn start() -> Option<Self> {
        if Command::new("radicale").arg("--version").output().is_err() {
            eprintln!("radicale not installed; skipping");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let users = dir.path().join("users");
        std::fs::write(
            &users,
            format!("alice@example.org%{MASTER}:{SECRET}\nbob@example.org%{MASTER}:{SECRET}\n"),
        )
        .unwrap();
        let config = dir.path().join("config");
        std::fs::write(
            &config,
            format!(
                "[server]\nhosts = 127.0.0.1:{port}\n\n[auth]\ntype = htpasswd\nhtpasswd_filename = {}\nhtpasswd_encryption = plain\ndelay = 0\n\n[rights]\ntype = authenticated\n\n[storage]\nfilesystem_folder = {}\n\n[logging]\nlevel = info\n",
                users.display(),
                dir.path().join("collections").display()
            ),
        )
        .unwrap();
        let child = Command::new("radicale")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .unwrap();
        assert!(
            wait_for_port(port, Duration::from_secs(20)),
            "radicale did not start"
        );
        Some(Self {
            child,
            port,
            _dir: dir,
        })
    }
}

impl Drop for Radicale {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn radicale_dav_works_through_the_proxy_with_users_own_passwords() {
    let Some(radicale) = Radicale::start() else {
        return;
    };
    let proxy = Proxy::start(options(radicale.port));
    // Directly, the user's own password is refused: only the master form is known there.
    let direct = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-u",
            "alice:alice-password",
            "-X",
            "PROPFIND",
        ])
        .arg(format!("http://127.0.0.1:{}/", radicale.port))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&direct.stdout), "401");

    let base = "https://localhost:{port}/alice/";
    let (code, _) = curl(
        proxy.https,
        &["-u", "alice:alice-password", "-X", "MKCOL", base],
    );
    assert_eq!(code, 201, "{}", proxy.log());
    let cal = "https://localhost:{port}/alice/work/";
    let (code, _) = curl(
        proxy.https,
        &["-u", "alice:alice-password", "-X", "MKCALENDAR", cal],
    );
    assert_eq!(code, 201);
    let ics = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//portcullis//test//EN\r\nBEGIN:VEVENT\r\nUID:e1@example.org\r\nDTSTAMP:20260101T000000Z\r\nDTSTART:20260102T100000Z\r\nDTEND:20260102T110000Z\r\nSUMMARY:Through the proxy\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("e1.ics");
    std::fs::write(&file, ics).unwrap();
    let file = file.display().to_string();
    let (code, _) = curl(
        proxy.https,
        &[
            "-u",
            "alice:alice-password",
            "-T",
            &file,
            "-H",
            "Content-Type: text/calendar",
            "https://localhost:{port}/alice/work/e1.ics",
        ],
    );
    assert_eq!(code, 201);
    let (code, body) = curl(
        proxy.https,
        &[
            "-u",
            "alice:alice-password",
            "-X",
            "REPORT",
            "-H",
            "Depth: 1",
            "-H",
            "Content-Type: application/xml",
            "--data-binary",
            r#"<?xml version="1.0"?><c:calendar-query xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav"><d:prop><c:calendar-data/></d:prop><c:filter><c:comp-filter name="VCALENDAR"/></c:filter></c:calendar-query>"#,
            cal,
        ],
    );
    assert_eq!(code, 207);
    assert!(body.contains("Through the proxy"), "{body}");
    let (code, body) = curl(
        proxy.https,
        &[
            "--http2",
            "-u",
            "alice:alice-password",
            "-X",
            "PROPFIND",
            "-H",
            "Depth: 1",
            cal,
        ],
    );
    assert_eq!(code, 207);
    assert!(body.contains("e1.ics"), "{body}");
    let (code, _) = curl(proxy.https, &["-u", "alice:wrong", "-X", "PROPFIND", cal]);
    assert_eq!(code, 401);

    // A real CalDAV client library (python3-caldav) through the proxy.
    let script = format!(
        r#"
import caldav, sys
c = caldav.DAVClient(url="https://localhost:{port}/alice/", username="alice", password="alice-password", ssl_verify_cert="{ca}")
cal = c.calendar(url="https://localhost:{port}/alice/work/")
cal.save_event("""BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//portcullis//py//EN
BEGIN:VEVENT
UID:py@example.org
DTSTAMP:20260101T000000Z
DTSTART:20260103T100000Z
DTEND:20260103T110000Z
SUMMARY:From python caldav
END:VEVENT
END:VCALENDAR
""")
events = cal.events()
print(len(events))
print(sorted(e.icalendar_component["summary"] for e in events))
"#,
        port = proxy.https,
        ca = dev_ca().display()
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("2\n"), "{stdout}");
    assert!(stdout.contains("From python caldav"), "{stdout}");
}

/// One HTTP/2 frame (RFC 9113 §4.1).
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

const H2_DATA: u8 = 0x0;
const H2_HEADERS: u8 = 0x1;
const H2_RST_STREAM: u8 = 0x3;
const H2_SETTINGS: u8 = 0x4;
const H2_PING: u8 = 0x6;
const H2_GOAWAY: u8 = 0x7;
const H2_END_STREAM: u8 = 0x1;
const H2_ACK: u8 = 0x1;
const H2_END_HEADERS: u8 = 0x4;
const H2_REFUSED_STREAM: u32 = 0x7;

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn read_h2_frame(s: &mut impl Read) -> Frame {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)
        .expect("an HTTP/2 frame within the read timeout");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).expect("the frame's payload");
    Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

/// A POST to the login form, HPACK-encoded from the static table and literals only (no dynamic
/// table, no Huffman), headers complete but the body still to come.
fn h2_login_form_headers(stream: u32) -> Vec<u8> {
    let mut block = vec![0x83, 0x87]; // :method POST, :scheme https
    block.extend_from_slice(&[0x04, 9]); // :path, literal without indexing
    block.extend_from_slice(b"/api/auth");
    block.extend_from_slice(&[0x01, 9]); // :authority, literal without indexing
    block.extend_from_slice(b"localhost");
    h2_frame(H2_HEADERS, H2_END_HEADERS, stream, &block)
}

/// The HTTP/2 limits of SECURITY.md as the server announces and enforces them: at most 100
/// concurrent streams and a 16 KiB header list (src/session/http.rs `MAX_STREAMS`, `MAX_HEAD`).
///
/// The streams are login-form POSTs whose bodies have not been sent yet: the proxy must read the
/// body before it can answer, so the first 100 streams are certainly still open when the 101st
/// arrives, whatever the scheduling. That one must be refused (RST_STREAM REFUSED_STREAM) while
/// the connection and the other 100 carry on, each answered exactly once.
#[test]
fn http2_announces_and_enforces_the_stream_and_header_limits() {
    let backend = backend(false);
    let proxy = start(&backend);
    let tcp = TcpStream::connect(("127.0.0.1", proxy.https)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut s = common::proxy::tls_over(tcp, &["h2"]).unwrap();
    assert_eq!(s.conn.alpn_protocol(), Some(&b"h2"[..]));
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&h2_frame(H2_SETTINGS, 0, 0, &[])).unwrap();
    s.flush().unwrap();

    // The server's connection preface is its SETTINGS frame (RFC 9113 §3.4).
    let settings = read_h2_frame(&mut s);
    assert_eq!(
        (settings.kind, settings.flags & H2_ACK, settings.stream),
        (H2_SETTINGS, 0, 0),
        "{settings:?}"
    );
    let announced: std::collections::HashMap<u16, u32> = settings
        .payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert_eq!(announced.get(&0x3), Some(&100), "{announced:?}");
    assert_eq!(announced.get(&0x6), Some(&(16 * 1024)), "{announced:?}");
    s.write_all(&h2_frame(H2_SETTINGS, H2_ACK, 0, &[])).unwrap();

    // 101 streams at once, in one write.
    let streams: Vec<u32> = (0..101).map(|i| 1 + 2 * i).collect();
    let burst: Vec<u8> = streams
        .iter()
        .flat_map(|&id| h2_login_form_headers(id))
        .collect();
    s.write_all(&burst).unwrap();
    s.flush().unwrap();
    let (open, excess) = streams.split_at(100);
    let excess = excess[0];
    loop {
        let f = read_h2_frame(&mut s);
        assert!(f.kind != H2_GOAWAY, "{f:?}\n{}", proxy.log());
        // Nothing can be answered before its body arrives.
        assert!(
            f.kind != H2_HEADERS && (f.kind != H2_RST_STREAM || f.stream == excess),
            "{f:?}"
        );
        if f.kind == H2_RST_STREAM {
            assert_eq!(f.payload, H2_REFUSED_STREAM.to_be_bytes(), "{f:?}");
            break;
        }
    }

    // The 100 admitted streams get their bodies (not JSON: 400 from the proxy, no backend).
    let bodies: Vec<u8> = open
        .iter()
        .flat_map(|&id| h2_frame(H2_DATA, H2_END_STREAM, id, b"x"))
        .collect();
    s.write_all(&bodies).unwrap();
    s.flush().unwrap();
    let mut answers = std::collections::HashMap::<u32, usize>::new();
    let mut ended = std::collections::HashSet::<u32>::new();
    while ended.len() < open.len() {
        let f = read_h2_frame(&mut s);
        assert!(f.kind != H2_GOAWAY && f.kind != H2_RST_STREAM, "{f:?}");
        if f.kind == H2_HEADERS {
            assert!(open.contains(&f.stream), "{f:?}");
            *answers.entry(f.stream).or_default() += 1;
            // :status 400 is static-table entry 12, sent as the indexed field 0x8c.
            assert_eq!(f.payload.first(), Some(&0x8c), "{f:?}");
        }
        if (f.kind == H2_HEADERS || f.kind == H2_DATA) && f.flags & H2_END_STREAM != 0 {
            assert!(ended.insert(f.stream), "{f:?}");
        }
    }
    assert_eq!(answers.len(), 100);
    assert!(answers.values().all(|&n| n == 1), "{answers:?}");
    assert!(backend.seen().is_empty());

    // The connection is still good: a PING is answered, and with the streams closed a new one
    // is admitted again.
    s.write_all(&h2_frame(H2_PING, 0, 0, b"portcull")).unwrap();
    s.write_all(&h2_login_form_headers(203)).unwrap();
    s.write_all(&h2_frame(H2_DATA, H2_END_STREAM, 203, b"x"))
        .unwrap();
    s.flush().unwrap();
    let (mut pong, mut answered) = (false, false);
    while !(pong && answered) {
        let f = read_h2_frame(&mut s);
        assert!(f.kind != H2_GOAWAY && f.kind != H2_RST_STREAM, "{f:?}");
        if f.kind == H2_PING && f.flags & H2_ACK != 0 {
            assert_eq!(f.payload, b"portcull");
            pong = true;
        }
        if f.kind == H2_HEADERS {
            assert_eq!(f.stream, 203, "{f:?}");
            answered = true;
        }
    }
}

/// A login form announced and never sent is bounded like a slow request head: the client gets
/// 408 once `header_read_timeout` has passed, and nothing reaches the backend.
#[test]
fn a_login_form_that_never_arrives_times_out() {
    let backend = backend(false);
    let mut opts = options(backend.port());
    opts.extra = "[http]\nheader_read_timeout = \"1s\"\n".into();
    let proxy = Proxy::start(opts);
    let mut s = TcpStream::connect(("127.0.0.1", proxy.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let started = std::time::Instant::now();
    s.write_all(
        b"POST /api/auth HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 16000\r\n\r\n{\"accountName\":",
    )
    .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}\n{}", proxy.log());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(backend.seen().is_empty());
}

/// Failed authentications end a connection as they end a mail session: after
/// `limits.max_auth_failures` (3) wrong passwords, an HTTP/1.1 connection with more requests
/// pipelined is closed, and the rest never reach the authenticator.
#[test]
fn a_connection_is_closed_after_three_failed_authentications() {
    let backend = backend(false);
    let proxy = start(&backend);
    let auth = basic("alice", "wrong-password");
    let request =
        format!("GET /jmap/session HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n\r\n");
    let answers = raw(proxy.http, request.repeat(6).as_bytes());
    assert_eq!(
        answers.matches("HTTP/1.1 401").count(),
        3,
        "{answers}\n{}",
        proxy.log()
    );
    assert_eq!(proxy.log().matches("login rejected").count(), 3);
    assert!(backend.seen().is_empty());
    // A fresh connection with the right password is served (the guard's windows are wider).
    let (code, _) = curl(
        proxy.https,
        &[
            "-u",
            "alice:alice-password",
            "https://localhost:{port}/jmap/session",
        ],
    );
    assert_eq!(code, 200);
}

/// The streams of one HTTP/2 connection authenticate one at a time and share its failure
/// count: many parallel wrong passwords cost at most three attempts per connection.
#[test]
fn parallel_http2_streams_share_one_connections_failure_limit() {
    let backend = backend(false);
    let proxy = start(&backend);
    let url = format!("https://localhost:{}/jmap/session", proxy.https);
    let mut args = vec![
        "-sS".to_string(),
        "--http2".into(),
        "--parallel".into(),
        "--parallel-max".into(),
        "20".into(),
        "--cacert".into(),
        dev_ca().display().to_string(),
        "-u".into(),
        "alice:wrong-password".into(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code} %{num_connects}\n".into(),
    ];
    for _ in 0..20 {
        args.push(url.clone());
    }
    let out = Command::new("curl").args(&args).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("200"), "{text}");
    let log = proxy.log();
    let rejected = log.matches("login rejected").count();
    let connections = log
        .matches("too many failed authentications")
        .count()
        .max(1);
    assert!(
        rejected <= 3 * connections + 3,
        "{rejected} rejections over {connections} closed connections:\n{text}"
    );
    assert!(
        rejected < 20,
        "every stream reached the authenticator:\n{text}"
    );
    assert!(backend.seen().is_empty());
}
