//! OAuth end to end: a real OpenID provider (node-oidc-provider) issues tokens through the
//! Device Authorization flow (RFC 8628); mail clients present them as XOAUTH2 or OAUTHBEARER
//! (Python imaplib and smtplib) and HTTP clients as `Authorization: Bearer` (curl) to Portcullis,
//! which checks them with the same provider (userinfo, RFC 7662 introspection, or JWT against the
//! discovered JWKS) and logs in to the real Dovecot backend as the master user for the token's
//! owner.
//!
//! What must hold: a token only opens its owner's mailbox, whatever name the client claims; an
//! expired, foreign or made-up token is refused with the RFC 7628 error challenge and never
//! reaches the backend; the token is never logged.

mod common;

use std::process::Command;
use std::time::Duration;

use common::clients::{Client, ClientRun};
use common::dovecot::Dovecot;
use common::httpbackend::HttpBackend;
use common::oidc::{OidcProvider, INTROSPECTION_CLIENT_ID, INTROSPECTION_SECRET, MAIL_RESOURCE};
use common::ports::free_port;
use common::proxy::{dev_ca, Proxy, ProxyOptions};

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";

/// Password logins from the users file, tokens through `[authenticator.oauth]` with `oauth`.
fn options(dovecot: &Dovecot, oauth: &str) -> ProxyOptions {
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    opts.authenticator
        .push_str(&format!("\n[authenticator.oauth]\n{oauth}\n"));
    opts
}

fn userinfo(idp: &OidcProvider) -> String {
    format!(
        "method = \"userinfo\"\nurl = \"{}/me\"\nissuer = \"{}\"",
        idp.issuer(),
        idp.issuer()
    )
}

fn imap(port: u16, mode: &str, user: &str, token: &str) -> ClientRun {
    Client::imap(port)
        .tls("implicit", &dev_ca())
        .mode(mode)
        .login(user, token)
        .actions(&["select", "logout"])
        .run()
}

/// Like `assert_ok`, with the proxy's log to say why not.
fn assert_ok(run: &ClientRun, proxy: &Proxy) {
    assert!(run.ok(), "{run:#?}\nproxy log:\n{}", proxy.log());
}

fn assert_refused_with_challenge(run: &ClientRun, idp: &OidcProvider) {
    assert!(!run.ok(), "{run:#?}");
    let login = run.field("login_response").unwrap_or_default();
    assert!(login.contains("AUTHENTICATIONFAILED"), "{run:#?}");
    let error: serde_json::Value = serde_json::from_str(
        run.field("oauth_error")
            .expect("the RFC 7628 error challenge"),
    )
    .unwrap();
    assert_eq!(error["status"], "invalid_token", "{error}");
    assert_eq!(
        error["openid-configuration"],
        format!("{}/.well-known/openid-configuration", idp.issuer())
    );
}

#[test]
fn device_flow_then_imap_with_xoauth2_and_oauthbearer() {
    let idp = OidcProvider::start();
    let dovecot = Dovecot::start();
    let proxy = Proxy::start(options(&dovecot, &userinfo(&idp)));
    let tokens = idp.device_flow(ALICE, "alice-at-the-idp", None);

    for mode in ["xoauth2", "oauthbearer"] {
        let run = imap(proxy.imaps, mode, ALICE, &tokens.access_token);
        assert_ok(&run, &proxy);
        let caps = run.list("capabilities");
        for mech in ["AUTH=PLAIN", "AUTH=XOAUTH2", "AUTH=OAUTHBEARER"] {
            assert!(caps.iter().any(|c| c == mech), "{caps:?}");
        }
    }
    assert_eq!(dovecot.master_logins(ALICE), 2, "{}", dovecot.log());
    // Passwords keep working next to tokens.
    imap(proxy.imaps, "login", "alice", "alice-password").assert_ok();
    assert!(
        !proxy.log().contains(&tokens.access_token),
        "the token must never be logged"
    );
    let log = proxy.log();
    assert!(
        log.contains("\"xoauth2\"") && log.contains("\"oauth\""),
        "{log}"
    );
}

#[test]
fn a_token_opens_only_its_owners_mailbox() {
    let idp = OidcProvider::start();
    let dovecot = Dovecot::start();
    let proxy = Proxy::start(options(&dovecot, &userinfo(&idp)));
    let alice = idp.device_flow(ALICE, "pw", None);

    // Alice's token under Bob's name, in both mechanisms: refused, challenge first.
    for mode in ["xoauth2", "oauthbearer"] {
        assert_refused_with_challenge(&imap(proxy.imaps, mode, BOB, &alice.access_token), &idp);
    }
    // A made-up token.
    assert_refused_with_challenge(&imap(proxy.imaps, "xoauth2", ALICE, "made-up.token"), &idp);
    // A token under the master separator never reaches anyone.
    assert_refused_with_challenge(
        &imap(
            proxy.imaps,
            "xoauth2",
            &format!("{ALICE}%{}", dovecot.master_user()),
            &alice.access_token,
        ),
        &idp,
    );
    // The ID token is not an access token.
    if let Some(id_token) = &alice.id_token {
        assert_refused_with_challenge(&imap(proxy.imaps, "xoauth2", ALICE, id_token), &idp);
    }
    assert!(dovecot.logins().is_empty(), "{}", dovecot.log());
    assert!(!proxy.log().contains(&alice.access_token));
}

#[test]
fn introspected_tokens_expire_and_are_not_cached_past_expiry() {
    let idp = OidcProvider::start_with(4);
    let dovecot = Dovecot::start();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), INTROSPECTION_SECRET).unwrap();
    let oauth = format!(
        "method = \"introspection\"\nurl = \"{}/token/introspection\"\nissuer = \"{}\"\nclient_id = \"{INTROSPECTION_CLIENT_ID}\"\nclient_secret_file = \"{}\"",
        idp.issuer(),
        idp.issuer(),
        secret.path().display()
    );
    let proxy = Proxy::start(options(&dovecot, &oauth));
    let tokens = idp.device_flow(BOB, "pw", None);
    assert_ok(
        &imap(proxy.imaps, "oauthbearer", BOB, &tokens.access_token),
        &proxy,
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_refused_with_challenge(
        &imap(proxy.imaps, "oauthbearer", BOB, &tokens.access_token),
        &idp,
    );
    assert_eq!(dovecot.master_logins(BOB), 1, "{}", dovecot.log());
}

#[test]
fn jwt_access_tokens_over_imap_and_submission() {
    let idp = OidcProvider::start();
    let dovecot = Dovecot::start();
    let oauth = format!(
        "method = \"jwt\"\nissuer = \"{}\"\naudience = [\"{MAIL_RESOURCE}\"]\naccount_claim = \"email\"",
        idp.issuer()
    );
    let mut opts = options(&dovecot, &oauth);
    opts.backend_submission_port = dovecot.submission_port();
    let proxy = Proxy::start(opts);
    let jwt = idp.device_flow(BOB, "pw", Some(MAIL_RESOURCE));
    assert_eq!(jwt.access_token.split('.').count(), 3, "a JWT");

    assert_ok(
        &imap(proxy.imaps, "oauthbearer", BOB, &jwt.access_token),
        &proxy,
    );
    let run = Client::smtp(proxy.submissions)
        .tls("implicit", &dev_ca())
        .mode("xoauth2")
        .login(BOB, &jwt.access_token)
        .arg("--mail-from")
        .arg(BOB)
        .arg("--rcpt")
        .arg(ALICE)
        .message(&format!(
            "From: {BOB}\r\nTo: {ALICE}\r\nSubject: token\r\n\r\nsent with a token\r\n"
        ))
        .actions(&["send", "quit"])
        .run();
    assert_ok(&run, &proxy);
    assert!(run.list("auth_mechanisms").iter().any(|m| m == "XOAUTH2"));
    let messages = dovecot.sink().wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages.len(), 1);
    assert_eq!(dovecot.master_logins(BOB), 2, "{}", dovecot.log());

    // An opaque token from the same provider is not a JWT for this audience: refused, over SMTP
    // with the challenge too.
    let opaque = idp.device_flow(BOB, "pw", None);
    let run = Client::smtp(proxy.submissions)
        .tls("implicit", &dev_ca())
        .mode("oauthbearer")
        .login(BOB, &opaque.access_token)
        .run();
    assert!(!run.ok(), "{run:#?}");
    assert!(
        run.field("login_response")
            .unwrap_or_default()
            .starts_with("535"),
        "{run:#?}"
    );
    assert!(run
        .field("oauth_error")
        .unwrap_or_default()
        .contains("invalid_token"));
    assert_eq!(dovecot.master_logins(BOB), 2);
}

#[test]
fn http_bearer_becomes_the_master_login_of_the_owner() {
    let idp = OidcProvider::start();
    let secret = "http-master-secret";
    let backend = HttpBackend::start(vec![format!("{ALICE}%proxy@example.org:{secret}")], false);
    let mut opts = ProxyOptions::file_users(free_port(), secret);
    opts.backend_http_port = backend.port();
    opts.authenticator
        .push_str(&format!("\n[authenticator.oauth]\n{}\n", userinfo(&idp)));
    let proxy = Proxy::start(opts);
    let tokens = idp.device_flow(ALICE, "pw", None);
    let curl = |auth: &str| -> u16 {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(dev_ca())
            .args(["-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("Authorization: {auth}"))
            .arg(format!("https://localhost:{}/dav/calendars/", proxy.https))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    assert_eq!(curl(&format!("Bearer {}", tokens.access_token)), 200);
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].basic().as_deref(),
        Some(format!("{ALICE}%proxy@example.org:{secret}").as_str())
    );
    for bad in ["Bearer made-up", "Bearer ", "Bearer a b"] {
        assert_eq!(curl(bad), 401, "{bad}");
    }
    assert_eq!(
        backend.seen().len(),
        1,
        "refused tokens are never forwarded"
    );
    assert!(!proxy.log().contains(&tokens.access_token));
}

#[test]
fn token_endpoint_failures_feed_the_guard() {
    let idp = OidcProvider::start();
    let mut opts = ProxyOptions::file_users(free_port(), "http-master-secret");
    opts.backend_http_port = idp.port();
    // One window, long enough that no bucket boundary falls inside the test.
    opts.extra = "[http]\nanonymous_paths = [\"/.well-known/*\", \"/token\"]\noauth_endpoints = [\"/token\"]\n\n[[guard.window]]\nkey = \"ip_account\"\nperiod = \"1d\"\nmax = 5\n".into();
    let proxy = Proxy::start(opts);
    let post_token = || -> (u16, String) {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(dev_ca())
            .args(["-o", "-", "-w", "\n%{http_code}"])
            .args([
                "-d",
                "grant_type=urn:ietf:params:oauth:grant-type:device_code",
                "-d",
                "device_code=guessed-device-code",
                "-d",
                "client_id=mail-client",
            ])
            .arg(format!("https://localhost:{}/token", proxy.https))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    };
    // A guessed device code, polled too fast: the provider answers `invalid_grant` or
    // `slow_down`, both attack signals. One address may reach 5 failures on one name: the sixth
    // bans.
    for i in 0..6 {
        let (status, body) = post_token();
        assert_eq!(status, 400, "attempt {i}: {body}");
        assert!(
            body.contains("invalid_grant") || body.contains("slow_down"),
            "{body}"
        );
    }
    assert!(!proxy.log().contains("denied by the guard"));
    let (status, body) = post_token();
    assert_eq!(
        (status, body.as_str()),
        (400, "{\"error\":\"invalid_grant\"}"),
        "{}",
        proxy.log()
    );
    let log = proxy.log();
    assert!(
        log.contains("token endpoint request denied by the guard"),
        "{log}"
    );
    // Other anonymous paths still pass: only the endpoint under attack is closed to the address.
    let discovery = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
        ])
        .arg(dev_ca())
        .arg(format!(
            "https://localhost:{}/.well-known/openid-configuration",
            proxy.https
        ))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&discovery.stdout).trim(), "200");
}

#[test]
fn pop3_and_managesieve_take_tokens_too() {
    let idp = OidcProvider::start();
    let dovecot = Dovecot::start();
    let mut opts = options(&dovecot, &userinfo(&idp));
    opts.backend_pop3_port = dovecot.pop3_port();
    opts.backend_sieve_port = dovecot.sieve_port();
    let proxy = Proxy::start(opts);
    let tokens = idp.device_flow(ALICE, "pw", None);

    let run = Client::pop3(proxy.pop3s)
        .tls("implicit", &dev_ca())
        .mode("xoauth2")
        .login(ALICE, &tokens.access_token)
        .run();
    assert_ok(&run, &proxy);
    assert!(
        run.list("capabilities").iter().any(|c| c == "SASL"),
        "{run:#?}"
    );
    let run = Client::sieve(proxy.sieve)
        .tls("starttls", &dev_ca())
        .mode("oauthbearer")
        .login(ALICE, &tokens.access_token)
        .actions(&["listscripts"])
        .run();
    assert_ok(&run, &proxy);
    assert!(dovecot.saw_master_login(ALICE));
    let services: Vec<String> = dovecot
        .logins()
        .into_iter()
        .filter(|r| r.user == ALICE && r.master_user().is_some())
        .map(|r| r.service)
        .collect();
    assert!(services.iter().any(|s| s == "pop3"), "{services:?}");
    assert!(services.iter().any(|s| s == "managesieve"), "{services:?}");

    // Alice's token under Bob's name: the error challenge, then the failure, in both protocols.
    let run = Client::pop3(proxy.pop3s)
        .tls("implicit", &dev_ca())
        .mode("oauthbearer")
        .login(BOB, &tokens.access_token)
        .run();
    assert!(!run.ok(), "{run:#?}");
    assert!(run
        .field("oauth_error")
        .unwrap_or_default()
        .contains("invalid_token"));
    let run = Client::sieve(proxy.sieve)
        .tls("starttls", &dev_ca())
        .mode("xoauth2")
        .login(BOB, &tokens.access_token)
        .run();
    assert!(!run.ok(), "{run:#?}");
    assert!(run
        .field("oauth_error")
        .unwrap_or_default()
        .contains("invalid_token"));
    assert_eq!(dovecot.master_logins(BOB), 0);
}
