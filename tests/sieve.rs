//! ManageSieve end to end: sieve-connect and the Python client → Portcullis (STARTTLS) → real
//! Dovecot managesieved (master login `user%master`), and the negative cases of SECURITY.md.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::authhttp::{AuthHttpServer, Mode};
use common::clients::Client;
use common::dovecot::Dovecot;
use common::ports::free_port;
use common::proxy::{dev_ca, Proxy, ProxyOptions, Raw};

const ALICE: &str = "alice@example.org";

fn setup_with(dovecot: &Dovecot, mut opts: ProxyOptions) -> Proxy {
    opts.backend_sieve_port = dovecot.sieve_port();
    Proxy::start(opts)
}

fn setup() -> (Dovecot, Proxy) {
    // A SIEVE list of its own, so the greeting shows whether it was learnt from the backend.
    let dovecot = Dovecot::builder()
        .prelogin_rawlog()
        .extra_config(
            "managesieve_sieve_capability = fileinto vacation editheader\n\
             managesieve_implementation_string = Backend Sieve\n",
        )
        .start();
    let opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    let proxy = setup_with(&dovecot, opts);
    (dovecot, proxy)
}

fn b64(s: &str) -> String {
    portcullis::sasl::encode_challenge(s.as_bytes())
}

/// STARTTLS by hand: the TLS client and the capabilities sent again over TLS.
fn starttls(port: u16) -> (Raw, Vec<String>) {
    let (mut c, tcp) = Raw::plain_with_socket(port);
    let greeting = c.until("OK");
    assert!(
        greeting.contains(&"\"STARTTLS\"\r\n".to_owned()),
        "{greeting:?}"
    );
    c.send(b"STARTTLS\r\n");
    assert_eq!(c.line().unwrap(), "OK \"Begin TLS negotiation now\"\r\n");
    let mut t = Raw::over_tls(tcp, &["managesieve"]);
    let caps = t.until("OK");
    (t, caps)
}

/// A logged-in TLS session as alice.
fn logged_in(port: u16) -> Raw {
    let (mut c, _) = starttls(port);
    c.send(
        format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
            b64("\0alice\0alice-password")
        )
        .as_bytes(),
    );
    assert_eq!(c.line().unwrap(), "OK \"Logged in\"\r\n");
    c
}

fn sieve_dir(dovecot: &Dovecot) -> std::path::PathBuf {
    dovecot.dir().join("home").join(ALICE)
}

#[test]
fn sieve_connect_uploads_and_activates_a_script_through_master_login() {
    let (dovecot, proxy) = setup();
    let work = tempfile::tempdir().unwrap();
    let script = "require \"fileinto\";\r\nif header :contains \"subject\" \"[list]\" { fileinto \"Lists\"; }\r\n";
    std::fs::write(work.path().join("rules.sieve"), script).unwrap();
    std::fs::write(
        work.path().join("commands"),
        "put rules.sieve portcullis\nactivate portcullis\nlist\nquit\n",
    )
    .unwrap();
    let mut child = Command::new("sieve-connect")
        .current_dir(work.path())
        .args(["-4", "-s", "localhost", "-p", &proxy.sieve.to_string()])
        .args(["-u", "alice", "--passwordfd", "0", "--tlscafile"])
        .arg(dev_ca())
        .args(["--exec", "commands"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sieve-connect (apt-get install sieve-connect)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"alice-password\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", proxy.log());
    assert!(stdout.contains("portcullis"), "{stdout}");
    let home = sieve_dir(&dovecot);
    assert_eq!(
        std::fs::read_to_string(home.join("sieve/portcullis.sieve")).unwrap(),
        script
    );
    let active = std::fs::read_link(home.join(".dovecot.sieve")).unwrap();
    assert!(active.ends_with("sieve/portcullis.sieve"), "{active:?}");
    assert!(dovecot.saw_master_login(ALICE));
    assert_eq!(dovecot.direct_logins(ALICE), 0);
    assert!(dovecot
        .logins()
        .iter()
        .all(|l| l.service == "managesieve" && l.method == "PLAIN"));
    // The empty-authzid form Stalwart needs, not the authzid form Dovecot would also accept.
    let expected = b64(&format!(
        "\0{ALICE}%proxy@example.org\0{}",
        dovecot.master_secret()
    ));
    let raw = dovecot.prelogin_rawlogs();
    assert!(
        raw.iter().any(|r| r
            .input
            .contains(&format!("AUTHENTICATE \"PLAIN\" \"{expected}\""))),
        "no AUTHENTICATE \"PLAIN\" with an empty authzid in {raw:#?}"
    );
    let log = proxy.log();
    for secret in ["alice-password", dovecot.master_secret(), &expected] {
        assert!(!log.contains(secret), "{secret:?} leaked into the log");
    }
}

#[test]
fn python_client_manages_scripts_and_sees_the_backend_capabilities() {
    let (dovecot, proxy) = setup();
    let script = "require \"vacation\";\r\nvacation \"away\";\r\n";
    let run = Client::sieve(proxy.sieve)
        .tls("starttls", &dev_ca())
        .arg("--server-name")
        .arg("localhost")
        .mode("authenticate-plain")
        .login("alice", "alice-password")
        .arg("--script")
        .arg(script)
        .actions(&[
            "capability",
            "putscript:away",
            "listscripts",
            "getscript:away",
            "setactive:away",
            "havespace:away",
            "raw:NOOP \"sync-1\"",
            "logout",
        ])
        .run();
    run.assert_ok();
    assert_eq!(run.fetched(), Some(script));
    let caps = run.list("capabilities");
    assert!(
        caps.contains(&"\"IMPLEMENTATION\" \"Portcullis\"".to_owned()),
        "{caps:?}"
    );
    assert!(
        caps.contains(&"\"SIEVE\" \"fileinto vacation editheader\"".to_owned()),
        "{caps:?}"
    );
    assert!(
        caps.contains(&"\"SASL\" \"PLAIN LOGIN\"".to_owned()),
        "{caps:?}"
    );
    assert!(!caps
        .iter()
        .any(|c| c.contains("STARTTLS") || c.contains("Backend")));
    let post = run.list("post_login_capabilities");
    assert!(!post
        .iter()
        .any(|c| c.to_ascii_uppercase().contains("UNAUTHENTICATE")));
    assert!(run.list("scripts").iter().any(|s| s.contains("away")));
    assert!(run.field("raw_response").unwrap().contains("sync-1"));
    assert!(sieve_dir(&dovecot).join("sieve/away.sieve").exists());
    // The SASL response as a separate string after an empty challenge.
    Client::sieve(proxy.sieve)
        .tls("starttls", &dev_ca())
        .arg("--server-name")
        .arg("localhost")
        .mode("authenticate-plain-cont")
        .login("alice", "alice-password")
        .actions(&["listscripts", "logout"])
        .run()
        .assert_ok();
    assert_eq!(dovecot.master_logins(ALICE), 2);
}

#[test]
fn failures_look_the_same_and_never_reach_the_backend() {
    let (dovecot, proxy) = setup();
    for (user, pass) in [
        ("alice", "wrong-password-xyz"),
        ("nobody", "x-password"),
        ("alice%proxy@example.org", "master-secret-for-tests"),
        (
            "alice@example.org*proxy@example.org",
            "master-secret-for-tests",
        ),
    ] {
        let (mut c, _) = starttls(proxy.sieve);
        c.send(
            format!(
                "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
                b64(&format!("\0{user}\0{pass}"))
            )
            .as_bytes(),
        );
        assert_eq!(c.line().unwrap(), "NO \"Authentication failed\"\r\n");
    }
    // LOGIN with a literal username: same answer.
    let (mut c, _) = starttls(proxy.sieve);
    c.send(b"AUTHENTICATE \"LOGIN\"\r\n");
    assert_eq!(c.line().unwrap(), "\"VXNlcm5hbWU6\"\r\n");
    let user = b64("bob%proxy@example.org");
    c.send(format!("{{{}+}}\r\n{user}\r\n", user.len()).as_bytes());
    // The name is refused by the identity rules before a password is asked for.
    assert_eq!(c.line().unwrap(), "NO \"Authentication failed\"\r\n");
    assert_eq!(dovecot.logins().len(), 0);
    // Three failures end the connection.
    c.send(format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64("\0alice\0bad")).as_bytes());
    c.line();
    c.send(format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64("\0alice\0bad")).as_bytes());
    assert_eq!(c.line().unwrap(), "NO \"Authentication failed\"\r\n");
    assert_eq!(
        c.line().unwrap(),
        "BYE \"Too many authentication failures\"\r\n"
    );
    assert!(c.closed());
}

#[test]
fn plaintext_is_refused_before_starttls_and_pipelining_behind_it_closes() {
    let (dovecot, proxy) = setup();
    let mut c = Raw::plain(proxy.sieve);
    let greeting = c.until("OK");
    assert!(
        greeting.contains(&"\"SASL\" \"\"\r\n".to_owned()),
        "{greeting:?}"
    );
    c.send(
        format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
            b64("\0alice\0alice-password")
        )
        .as_bytes(),
    );
    assert!(c.line().unwrap().starts_with("NO (ENCRYPT-NEEDED)"));
    c.send(b"STARTTLS\r\nAUTHENTICATE \"PLAIN\" \"AGFsaWNlAGFsaWNlLXBhc3N3b3Jk\"\r\n");
    assert!(c.closed(), "pipelined bytes after STARTTLS must close");
    // No second STARTTLS inside TLS.
    let (mut t, caps) = starttls(proxy.sieve);
    assert!(!caps.iter().any(|c| c.contains("STARTTLS")));
    t.send(b"STARTTLS\r\n");
    assert_eq!(t.line().unwrap(), "NO \"STARTTLS not available\"\r\n");
    assert_eq!(dovecot.logins().len(), 0);
}

#[test]
fn oversized_lines_and_literals_are_refused() {
    let (_dovecot, proxy) = setup();
    let (mut c, _) = starttls(proxy.sieve);
    let mut line = b"NOOP \"".to_vec();
    line.extend(std::iter::repeat_n(b'x', 1 << 20));
    line.extend_from_slice(b"\"\r\nNOOP\r\n");
    c.send(&line);
    assert_eq!(c.line().unwrap(), "NO \"Line too long\"\r\n");
    assert_eq!(c.line().unwrap(), "OK \"NOOP completed\"\r\n");
    c.send(b"AUTHENTICATE \"PLAIN\" {4294967296+}\r\nAAAA");
    assert_eq!(c.line().unwrap(), "NO \"Literal too large\"\r\n");
    assert_eq!(c.line().unwrap(), "BYE \"Literal too large\"\r\n");
    assert!(c.closed());
}

#[test]
fn unauthenticate_after_login_is_refused_locally_and_the_session_goes_on() {
    let (dovecot, proxy) = setup();
    let mut c = logged_in(proxy.sieve);
    // Pipelined: every answer must stay in its place, since ManageSieve has no tags.
    c.send(
        format!(
            "LISTSCRIPTS\r\nUNAUTHENTICATE\r\nAUTHENTICATE \"PLAIN\" \"{}\"\r\nNOOP \"after\"\r\n",
            b64("\0bob@example.org%proxy@example.org\0master-secret-for-tests")
        )
        .as_bytes(),
    );
    assert!(c.until("OK").last().unwrap().starts_with("OK"));
    assert_eq!(
        c.line().unwrap(),
        "NO \"UNAUTHENTICATE is not allowed\"\r\n"
    );
    assert_eq!(c.line().unwrap(), "NO \"Already authenticated\"\r\n");
    assert!(c.line().unwrap().contains("after"));
    // Script bodies are never read as commands: this one has a line of its own saying
    // UNAUTHENTICATE, inside a Sieve multi-line string.
    let body = "require \"vacation\";\r\nvacation text:\r\nUNAUTHENTICATE\r\n.\r\n;\r\n";
    c.send(format!("PUTSCRIPT \"trap\" {{{}+}}\r\n{body}\r\n", body.len()).as_bytes());
    assert!(c.line().unwrap().starts_with("OK"));
    c.send(b"GETSCRIPT \"trap\"\r\n");
    let got = c.until("OK");
    assert!(got.contains(&"UNAUTHENTICATE\r\n".to_owned()), "{got:?}");
    c.send(b"LOGOUT\r\n");
    assert!(c.line().unwrap().starts_with("OK"));
    assert_eq!(dovecot.logins().len(), 1);
    assert!(!dovecot.saw_direct_login("bob@example.org"));
}

#[test]
fn authenticator_down_is_trylater() {
    let dovecot = Dovecot::start();
    let auth = AuthHttpServer::start(dovecot.addr(dovecot.sieve_port()));
    auth.add_account("alice", "alice-password", ALICE);
    let proxy = setup_with(
        &dovecot,
        ProxyOptions::nginx(dovecot.imap_port(), dovecot.master_secret(), &auth.url()),
    );
    let login = |expect: &str| {
        let (mut c, _) = starttls(proxy.sieve);
        c.send(
            format!(
                "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
                b64("\0alice\0alice-password")
            )
            .as_bytes(),
        );
        let reply = c.line().unwrap();
        assert!(reply.starts_with(expect), "expected {expect}, got {reply}");
    };
    login("OK \"Logged in\"");
    assert_eq!(
        auth.requests()[0].header("Auth-Protocol").as_deref(),
        Some("sieve")
    );
    auth.set_mode(Mode::Down);
    login("NO (TRYLATER)");
}

#[test]
fn backend_down_greets_with_the_default_list_and_logins_are_trylater() {
    let dovecot = Dovecot::start();
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    opts.backend_sieve_port = free_port();
    let proxy = Proxy::start(opts);
    let (mut c, caps) = starttls(proxy.sieve);
    assert!(
        caps.iter().any(|c| c.starts_with("\"SIEVE\" \"fileinto")),
        "{caps:?}"
    );
    c.send(
        format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
            b64("\0alice\0alice-password")
        )
        .as_bytes(),
    );
    assert!(c.line().unwrap().starts_with("NO (TRYLATER)"));
}

#[test]
fn commands_pipelined_behind_authenticate_wait_for_the_result() {
    let (_dovecot, proxy) = setup();
    let (mut c, _) = starttls(proxy.sieve);
    c.send(
        format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\nLISTSCRIPTS\r\nAUTHENTICATE \"PLAIN\" \"{}\"\r\nNOOP \"spliced\"\r\n",
            b64("\0alice\0wrong-password-xyz"),
            b64("\0alice\0alice-password")
        )
        .as_bytes(),
    );
    assert_eq!(c.line().unwrap(), "NO \"Authentication failed\"\r\n");
    // Answered locally (not logged in yet), never forwarded.
    assert_eq!(c.line().unwrap(), "NO \"Authenticate first\"\r\n");
    assert_eq!(c.line().unwrap(), "OK \"Logged in\"\r\n");
    // Held during the login, then handed to the backend.
    let noop = c.line().unwrap();
    assert!(noop.starts_with("OK (TAG \"spliced\")"), "{noop}");
}
