//! Runs the Python protocol clients in `tests/clients/` and parses their JSON.
//!
//! Independent, well-known client libraries (imaplib, poplib, smtplib) talk
//! to the proxy, so a test does not grade the proxy with the proxy's own
//! protocol code. The password travels in an environment variable, never in
//! argv where `ps` would show it.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Variable the wrapper passes the password in (`--password-env`).
const PASSWORD_ENV: &str = "HARNESS_CLIENT_PASSWORD";

/// Directory holding the client scripts.
pub fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("clients")
}

/// Which script to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Imap,
    Pop3,
    Smtp,
    Sieve,
    Jmap,
}

impl Protocol {
    fn script(self) -> &'static str {
        match self {
            Protocol::Imap => "imap_client.py",
            Protocol::Pop3 => "pop3_client.py",
            Protocol::Smtp => "smtp_client.py",
            Protocol::Sieve => "sieve_client.py",
            Protocol::Jmap => "jmap_client.py",
        }
    }
}

/// A client invocation; see each script's docstring for modes and actions.
#[derive(Clone, Debug)]
pub struct Client {
    protocol: Protocol,
    args: Vec<String>,
    password: Option<String>,
    /// Extra environment (e.g. a second password), kept out of argv.
    env: Vec<(String, String)>,
    actions: Vec<String>,
}

impl Client {
    /// A client for `protocol` connecting to 127.0.0.1:`port` without TLS.
    pub fn new(protocol: Protocol, port: u16) -> Client {
        Client {
            protocol,
            args: vec!["--port".into(), port.to_string()],
            password: None,
            env: Vec::new(),
            actions: Vec::new(),
        }
    }

    pub fn imap(port: u16) -> Client {
        Client::new(Protocol::Imap, port)
    }

    pub fn pop3(port: u16) -> Client {
        Client::new(Protocol::Pop3, port)
    }

    pub fn smtp(port: u16) -> Client {
        Client::new(Protocol::Smtp, port)
    }

    pub fn sieve(port: u16) -> Client {
        Client::new(Protocol::Sieve, port)
    }

    /// jmapc against `https://localhost:<port>` (give the CA with [`Client::tls`]).
    pub fn jmap(port: u16) -> Client {
        Client::new(Protocol::Jmap, port)
            .arg("--host")
            .arg("localhost")
    }

    /// Login name and password.
    pub fn login(mut self, user: &str, password: &str) -> Client {
        self.args.extend(["--user".into(), user.into()]);
        self.password = Some(password.into());
        self
    }

    /// `--mode`, e.g. `authenticate-plain`, `user-pass`, `auth-login`, `none`.
    pub fn mode(self, mode: &str) -> Client {
        self.arg("--mode").arg(mode)
    }

    /// `--tls starttls|implicit` with `cafile` as the trust anchor.
    pub fn tls(self, how: &str, cafile: &std::path::Path) -> Client {
        self.arg("--tls")
            .arg(how)
            .arg("--cafile")
            .arg(&cafile.display().to_string())
    }

    /// Message text for `append` / `send`.
    pub fn message(self, text: &str) -> Client {
        self.arg("--message").arg(text)
    }

    /// Any other option, verbatim.
    pub fn arg(mut self, arg: &str) -> Client {
        self.args.push(arg.into());
        self
    }

    /// An environment variable for the script, e.g. a second secret it reads by name.
    pub fn env(mut self, name: &str, value: &str) -> Client {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Actions run after login, in order.
    pub fn actions(mut self, actions: &[&str]) -> Client {
        self.actions.extend(actions.iter().map(|a| a.to_string()));
        self
    }

    /// Runs the script and waits for it.
    pub fn run(&self) -> ClientRun {
        let script = clients_dir().join(self.protocol.script());
        let mut cmd = Command::new("python3");
        // No __pycache__ next to the scripts in the source tree.
        cmd.env("PYTHONDONTWRITEBYTECODE", "1");
        cmd.arg(&script).args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(password) = &self.password {
            cmd.args(["--password-env", PASSWORD_ENV]);
            cmd.env(PASSWORD_ENV, password);
        }
        // "--" keeps actions like "raw:..." from being read as options.
        cmd.arg("--").args(&self.actions);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .expect("run python3 (apt-get install python3)");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = stdout
            .lines()
            .last()
            .and_then(|line| serde_json::from_str(line).ok())
            .unwrap_or(Value::Null);
        ClientRun {
            exit_code: out.status.code(),
            json,
            stdout,
            stderr,
        }
    }
}

/// What a client script reported.
#[derive(Clone, Debug)]
pub struct ClientRun {
    pub exit_code: Option<i32>,
    /// The printed JSON object (`Null` if the script crashed before printing).
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl ClientRun {
    /// Exit 0 and `"ok": true`.
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0) && self.json["ok"] == Value::Bool(true)
    }

    /// Panics with everything the script said unless it succeeded.
    pub fn assert_ok(&self) -> &ClientRun {
        assert!(self.ok(), "client failed: {self:#?}");
        self
    }

    /// The error text (server's NO/-ERR/5xx text or the exception).
    pub fn error(&self) -> Option<&str> {
        self.json["error"].as_str()
    }

    /// `"fetched"`: the body from FETCH / RETR / GETSCRIPT.
    pub fn fetched(&self) -> Option<&str> {
        self.json["fetched"].as_str()
    }

    /// A string field of the JSON result.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.json[key].as_str()
    }

    /// A list-of-strings field such as `capabilities`.
    pub fn list(&self, key: &str) -> Vec<String> {
        self.json[key]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Runs a Python snippet with the given environment; returns (exit code, stdout, stderr).
///
/// For one-off checks that the client scripts do not cover.
pub fn run_python(code: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(code)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
