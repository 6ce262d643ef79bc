//! A JMAP backend for the HTTP tests: `tests/clients/jmap_backend.py`, a small RFC 8620 server
//! that, like Stalwart with a master user, only accepts the master forms it is given.
//!
//! It is Python (stdlib only) rather than Rust so that the JMAP answers a real client (jmapc)
//! parses come from code independent of the proxy's own. It records every request it gets
//! (method, path, the Basic user without the password), which is what the tests assert on.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

use serde_json::Value;

use super::clients::clients_dir;

/// One request as the backend saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The Basic user (`alice@example.org%proxy@example.org`), `None` without Basic.
    pub user: Option<String>,
    /// The source port of the backend connection it came on (the proxy's side).
    pub peer_port: u16,
}

pub struct JmapBackend {
    child: Child,
    /// Held open: the server exits when it closes (also if the test process dies).
    stdin: Option<ChildStdin>,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl JmapBackend {
    /// Starts on a free loopback port; `accept` are the `user:password` strings it answers
    /// (anything else gets 401).
    pub fn start(accept: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests.jsonl");
        std::fs::write(&log, "").unwrap();
        let mut child = Command::new("python3")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            // Credentials in the environment, not argv where `ps` would show them.
            .env("JMAP_BACKEND_ACCEPT", accept.join("\n"))
            .arg(clients_dir().join("jmap_backend.py"))
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run python3");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("READY ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("jmap_backend.py did not start: {line:?}"));
        Self {
            child,
            stdin,
            port,
            log,
            _dir: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                Seen {
                    method: v["method"].as_str().unwrap().to_owned(),
                    path: v["path"].as_str().unwrap().to_owned(),
                    user: v["user"].as_str().map(str::to_owned),
                    peer_port: v["peer_port"].as_u64().unwrap() as u16,
                }
            })
            .collect()
    }

    /// The Basic user of every request so far (`None` for a request without Basic).
    pub fn seen_users(&self) -> Vec<Option<String>> {
        self.seen().into_iter().map(|s| s.user).collect()
    }
}

impl Drop for JmapBackend {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
