//! A private OpenID provider per test: node-oidc-provider run by `tests/oidc/provider.mjs`.
//!
//! Tests get real OAuth tokens from it through the Device Authorization flow (RFC 8628, driven by
//! `tests/oidc/device_flow.mjs` as a device plus a person at a browser would) and present them to
//! the proxy, which checks them against the same provider (JWKS for JWT access tokens,
//! introspection or userinfo for opaque ones).
//!
//! The provider knows `alice@`, `bob@` and `carol@example.org` (any non-empty password), the
//! public client [`CLIENT_ID`] and the confidential [`INTROSPECTION_CLIENT_ID`]. Requesting the
//! resource [`MAIL_RESOURCE`] yields a JWT access token with that audience; without a resource the
//! access token is opaque and works at the userinfo endpoint. Introspection knows only the opaque
//! ones (a JWT access token introspects as `{"active":false}`; verify it with the JWKS); see
//! `tests/oidc/provider.mjs` for the exact claims.
//!
//! The node process reads nothing but its stdin, which it watches: it exits when the test drops
//! the [`OidcProvider`] (killed and reaped) and also when the test process dies, because stdin
//! closes and the kernel sends it SIGKILL with its parent thread.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

/// The public client the device flow runs as.
pub const CLIENT_ID: &str = "mail-client";
/// The confidential client allowed to introspect every client's tokens: what the proxy uses.
pub const INTROSPECTION_CLIENT_ID: &str = "portcullis";
/// Secret of [`INTROSPECTION_CLIENT_ID`] (client_secret_basic).
pub const INTROSPECTION_SECRET: &str = "portcullis-introspection-secret";
/// Resource indicator (RFC 8707) that turns access tokens into JWTs for the mail proxy.
pub const MAIL_RESOURCE: &str = "urn:portcullis:mail";
/// Access token lifetime unless a test picks another one.
pub const DEFAULT_ACCESS_TTL_SECS: u64 = 3600;

/// Node starts in well under a second; the margin is for a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// `npm ci` of the pinned provider takes seconds with a warm cache, longer on a cold one.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// What the token endpoint answered at the end of a device flow.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub access_token: String,
    /// Present because the flow asks for `offline_access`.
    pub refresh_token: Option<String>,
    /// Seconds, as the token endpoint said.
    pub expires_in: u64,
    pub id_token: Option<String>,
    /// The whole token response.
    pub raw: Value,
}

/// One running provider on 127.0.0.1.
pub struct OidcProvider {
    child: Option<Child>,
    /// Held open: the provider exits when it closes.
    stdin: Option<ChildStdin>,
    port: u16,
    stderr: Arc<Mutex<String>>,
}

impl OidcProvider {
    /// Starts a provider whose access tokens live an hour.
    pub fn start() -> OidcProvider {
        OidcProvider::start_with(DEFAULT_ACCESS_TTL_SECS)
    }

    /// Starts a provider whose access tokens expire after `access_ttl_secs` (expiry tests use a
    /// few seconds).
    ///
    /// The provider binds port 0 and reports the port the kernel chose, so there is no window in
    /// which another process could take a port probed free.
    pub fn start_with(access_ttl_secs: u64) -> OidcProvider {
        ensure_node_modules();
        let mut cmd = Command::new("node");
        cmd.arg("provider.mjs")
            .arg("0")
            .arg(access_ttl_secs.to_string())
            .current_dir(oidc_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and touches no memory of ours. It makes the kernel
        // kill node when the thread that started it ends, so a test process killed before its
        // Drop runs leaves no provider behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .expect("spawn node tests/oidc/provider.mjs (apt-get install nodejs npm)");
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(
            child.stderr.take().expect("provider stderr"),
            stderr.clone(),
        );
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("provider stdout");
        thread::spawn(move || {
            // Keep draining after READY so the provider can never block on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line.strip_prefix("READY ") {
                    let _ = ready_tx.send(port.trim().parse::<u16>().ok());
                }
            }
        });
        let stdin = child.stdin.take();
        let mut provider = OidcProvider {
            child: Some(child),
            stdin,
            port: 0,
            stderr,
        };
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(port)) => provider.port = port,
            Ok(None) => provider.fail("printed a malformed READY line"),
            Err(_) => {
                let status = provider
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                match status {
                    Some(status) => provider.fail(&format!("exited with {status}")),
                    None => provider.fail(&format!("was not READY within {START_TIMEOUT:?}")),
                }
            }
        }
        provider
    }

    /// Stops the provider and panics with what it wrote on stderr.
    fn fail(&mut self, what: &str) -> ! {
        self.kill();
        panic!("OpenID provider {what}; stderr:\n{}", self.stderr());
    }

    /// `http://127.0.0.1:<port>`, exactly as the provider writes it into `iss`.
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `<issuer>/.well-known/openid-configuration`.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer())
    }

    /// The provider's stderr so far (warnings, server errors), for failure messages.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Runs the whole Device Authorization flow for `user` and returns the tokens.
    ///
    /// With `resource` (normally [`MAIL_RESOURCE`]) the access token is a JWT for that audience.
    /// Panics with the script's and the provider's stderr when the flow fails; use
    /// [`try_device_flow`](Self::try_device_flow) to test refusals. Takes about a second: the
    /// device polls once a second.
    pub fn device_flow(&self, user: &str, password: &str, resource: Option<&str>) -> Tokens {
        self.try_device_flow(user, password, resource)
            .unwrap_or_else(|e| panic!("device flow for {user}: {e}\nprovider:\n{}", self.stderr()))
    }

    /// Like [`device_flow`](Self::device_flow), but returns the failure (the script's stderr).
    pub fn try_device_flow(
        &self,
        user: &str,
        password: &str,
        resource: Option<&str>,
    ) -> Result<Tokens, String> {
        let mut cmd = Command::new("node");
        cmd.arg("device_flow.mjs")
            .arg(self.issuer())
            .arg(user)
            .arg(password)
            .current_dir(oidc_dir());
        if let Some(resource) = resource {
            cmd.arg(resource);
        }
        let out = cmd.output().expect("run node tests/oidc/device_flow.mjs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(format!(
                "device_flow.mjs exited with {}: {stderr}",
                out.status
            ));
        }
        let raw: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "device_flow.mjs printed no JSON ({e}): {}{stderr}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let text = |k: &str| raw.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(Tokens {
            access_token: text("access_token")
                .ok_or_else(|| format!("no access_token in {raw}"))?,
            refresh_token: text("refresh_token"),
            expires_in: raw
                .get("expires_in")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("no expires_in in {raw}"))?,
            id_token: text("id_token"),
            raw,
        })
    }

    /// GETs `<issuer><path>` with optional extra curl arguments; returns (status, body).
    pub fn http(&self, path: &str, args: &[&str]) -> (u16, String) {
        curl(&format!("{}{path}", self.issuer()), args)
    }

    /// The discovery document.
    pub fn discovery(&self) -> Value {
        let (status, body) = curl(&self.discovery_url(), &[]);
        assert_eq!(status, 200, "discovery: {body}");
        serde_json::from_str(&body).expect("discovery is JSON")
    }

    /// The JWKS from `jwks_uri`.
    pub fn jwks(&self) -> Value {
        let uri = self.discovery()["jwks_uri"]
            .as_str()
            .expect("jwks_uri in discovery")
            .to_owned();
        let (status, body) = curl(&uri, &[]);
        assert_eq!(status, 200, "jwks: {body}");
        serde_json::from_str(&body).expect("JWKS is JSON")
    }

    /// Calls the userinfo endpoint with `access_token`; returns (status, body).
    pub fn userinfo(&self, access_token: &str) -> (u16, String) {
        self.http(
            "/me",
            &["-H", &format!("Authorization: Bearer {access_token}")],
        )
    }

    /// Introspects `token` as the `portcullis` client (RFC 7662); the JSON response.
    pub fn introspect(&self, token: &str) -> Value {
        let (status, body) = self.http(
            "/token/introspection",
            &[
                "-u",
                &format!("{INTROSPECTION_CLIENT_ID}:{INTROSPECTION_SECRET}"),
                "--data-urlencode",
                &format!("token={token}"),
            ],
        );
        assert_eq!(status, 200, "introspection: {body}");
        serde_json::from_str(&body).expect("introspection response is JSON")
    }

    fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `tests/oidc`, where the provider's scripts and its `node_modules` live.
pub fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

/// Runs curl on `url`; returns (HTTP status, body). Panics when curl itself fails.
fn curl(url: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {url}: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, status) = text.rsplit_once('\n').expect("curl printed the status");
    (status.trim().parse().expect("HTTP status"), body.to_owned())
}

/// Appends everything `from` yields to `into`, on its own thread.
fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = into.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
}

/// Installs the provider (`npm ci`) unless `tests/oidc/node_modules` already has it.
///
/// CI installs it before the tests (`.ci/run`); this is for a developer's first run. Test
/// threads and test binaries may get here at the same time, so one of them takes a lock
/// directory (creating a directory is atomic) and the others wait for it to disappear.
fn ensure_node_modules() {
    let dir = oidc_dir();
    let installed = || dir.join("node_modules/oidc-provider/package.json").exists();
    let lock = dir.join(".npm-install.lock");
    let deadline = Instant::now() + INSTALL_TIMEOUT;
    loop {
        if installed() && !lock.exists() {
            return;
        }
        match fs::create_dir(&lock) {
            Ok(()) => {
                let result = if installed() { Ok(()) } else { npm_ci(&dir) };
                let _ = fs::remove_dir(&lock);
                if let Err(e) = result {
                    panic!("{e}");
                }
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A lock left behind by a killed test run would block every later run.
                let stale = fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > INSTALL_TIMEOUT);
                if stale {
                    let _ = fs::remove_dir(&lock);
                }
                assert!(
                    Instant::now() < deadline,
                    "another test held {} for {INSTALL_TIMEOUT:?}",
                    lock.display()
                );
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("create {}: {e}", lock.display()),
        }
    }
}

fn npm_ci(dir: &Path) -> Result<(), String> {
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .output()
        .map_err(|e| format!("run npm ci in {} (apt-get install npm): {e}", dir.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "npm ci in {} failed with {}:\n{}{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
