//! JMAP end to end: a real JMAP client library (jmapc, from PyPI) → Portcullis over HTTPS → a
//! small JMAP server (tests/clients/jmap_backend.py) that, like Stalwart with a master user,
//! only accepts `<account>%<master>:<secret>`.
//!
//! What must hold: a JMAP client that knows nothing about the proxy works with the user's own
//! password (session discovery, then API calls at the URLs the session names); the backend only
//! ever sees the master login of the canonical account; a wrong password ends at the proxy; and
//! two users alternating on one keep-alive connection each get their own account.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine as _;

use common::clients::{Client, ClientRun};
use common::jmapbackend::JmapBackend;
use common::ports::free_port;
use common::proxy::{dev_ca, Proxy, ProxyOptions};

const SECRET: &str = "jmap-master-secret";
const MASTER: &str = "proxy@example.org";

/// The credential Portcullis sends for `account` (`user:password`).
fn master_form(account: &str) -> String {
    format!("{account}%{MASTER}:{SECRET}")
}

/// The Basic user part of [`master_form`]: what the backend's log shows.
fn master_user(account: &str) -> Option<String> {
    Some(format!("{account}%{MASTER}"))
}

fn backend() -> JmapBackend {
    JmapBackend::start(&[
        master_form("alice@example.org"),
        master_form("bob@example.org"),
    ])
}

fn proxy(backend: &JmapBackend) -> Proxy {
    let mut opts = ProxyOptions::file_users(free_port(), SECRET);
    opts.backend_http_port = backend.port();
    Proxy::start(opts)
}

fn jmapc(proxy: &Proxy, user: &str, password: &str) -> Client {
    Client::jmap(proxy.https)
        .tls("implicit", &dev_ca())
        .login(user, password)
}

/// (method, path) of every request the backend saw.
fn requests(backend: &JmapBackend) -> Vec<(String, String)> {
    backend
        .seen()
        .into_iter()
        .map(|s| (s.method, s.path))
        .collect()
}

/// What jmapc sends for one session, Core/echo and Mailbox/get: the session URL, then twice the
/// `apiUrl` the session named (it only comes back through the proxy if Host was kept). With
/// several clients taking turns, each step appears once per client.
fn expect_requests(n_clients: usize) -> Vec<(String, String)> {
    let one = [
        ("GET", "/.well-known/jmap"),
        ("POST", "/jmap/api/"),
        ("POST", "/jmap/api/"),
    ];
    one.iter()
        .flat_map(|&(m, p)| (0..n_clients).map(move |_| (m.to_owned(), p.to_owned())))
        .collect()
}

/// The client gave up on an HTTP 401, not on some other error (TLS, parsing, a crash).
fn assert_refused(run: &ClientRun) {
    assert!(!run.ok(), "{run:#?}");
    assert_eq!(run.json["status"], 401, "{run:#?}");
}

#[test]
fn jmapc_with_the_users_own_password_reaches_the_backend_as_the_master_login() {
    let backend = backend();
    // The backend does not know the user's own password: it can only work through Portcullis.
    let mut direct = TcpStream::connect(("127.0.0.1", backend.port())).unwrap();
    direct
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let own = base64::engine::general_purpose::STANDARD.encode("alice:alice-password");
    direct
        .write_all(
            format!("GET /.well-known/jmap HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {own}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    let mut answer = String::new();
    let _ = direct.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert_eq!(backend.seen_users(), [Some("alice".to_owned())]);

    let proxy = proxy(&backend);
    let before = backend.seen().len();
    let run = jmapc(&proxy, "alice", "alice-password").run();
    run.assert_ok();
    assert_eq!(run.field("username"), Some("alice@example.org"), "{run:#?}");
    assert_eq!(run.list("mailboxes"), ["Inbox"], "{run:#?}");
    assert_eq!(run.json["echo"], true);

    let seen = &backend.seen()[before..];
    assert_eq!(
        seen.iter()
            .map(|s| (s.method.clone(), s.path.clone()))
            .collect::<Vec<_>>(),
        expect_requests(1),
        "{}",
        proxy.log()
    );
    assert!(
        seen.iter()
            .all(|s| s.user == master_user("alice@example.org")),
        "{seen:#?}"
    );
    let log = proxy.log();
    assert!(!log.contains("alice-password"), "{log}");
    assert!(!log.contains(SECRET), "{log}");
    assert!(!run.stdout.contains("alice-password"));
}

#[test]
fn jmapc_with_a_wrong_password_gets_401_and_nothing_reaches_the_backend() {
    let backend = backend();
    let proxy = proxy(&backend);
    for (user, password) in [
        ("alice", "wrong"),
        ("nobody", "alice-password"),
        // The master form from outside is just an unknown user.
        ("bob%proxy@example.org", SECRET),
    ] {
        let run = jmapc(&proxy, user, password).run();
        assert_refused(&run);
        assert!(!run.stdout.contains(password), "{run:#?}");
    }
    assert!(requests(&backend).is_empty(), "{:#?}", backend.seen());
}

#[test]
fn a_bearer_token_the_proxy_cannot_check_never_becomes_a_login() {
    // File users only: no token validation is configured. The session URL is an anonymous path,
    // so the request goes on without any credentials, and the backend refuses it; the API URL is
    // not anonymous, so it would be refused by the proxy itself.
    let backend = backend();
    let proxy = proxy(&backend);
    let run = Client::jmap(proxy.https)
        .tls("implicit", &dev_ca())
        .mode("bearer")
        .login("", "some-token")
        .run();
    assert_refused(&run);
    assert_eq!(backend.seen_users(), [None], "{:#?}", backend.seen());
}

#[test]
fn two_users_alternating_on_one_keep_alive_connection_each_get_their_own_account() {
    let backend = backend();
    let proxy = proxy(&backend);
    let run = jmapc(&proxy, "alice", "alice-password")
        .arg("--second-user")
        .arg("bob")
        .arg("--second-password-env")
        .arg("JMAP_SECOND_PASSWORD")
        .env("JMAP_SECOND_PASSWORD", "bob-password")
        .run();
    run.assert_ok();
    // One TLS connection carried both users' requests, one after the other.
    assert_eq!(run.json["connections"], 1, "{run:#?}");
    assert_eq!(run.field("username"), Some("alice@example.org"));
    assert_eq!(run.json["second"]["username"], "bob@example.org");
    assert_ne!(run.json["account_id"], run.json["second"]["account_id"]);
    // Mailbox/get names the session's account: answered only for the right login.
    assert_eq!(run.list("mailboxes"), ["Inbox"]);
    assert_eq!(
        run.json["second"]["mailboxes"],
        serde_json::json!(["Inbox"])
    );
    assert!(!run.stdout.contains("bob-password"));

    assert_eq!(requests(&backend), expect_requests(2));
    let users = backend.seen_users();
    let alternating: Vec<_> = (0..6)
        .map(|i| {
            if i % 2 == 0 {
                master_user("alice@example.org")
            } else {
                master_user("bob@example.org")
            }
        })
        .collect();
    assert_eq!(users, alternating, "{}", proxy.log());
}
