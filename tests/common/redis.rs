//! A private `redis-server` per test (Debian's `redis-server` package), for the guard's shared
//! store.
//!
//! Each instance gets its own temporary directory holding the configuration it was started from
//! (no persistence: `save ""`, `appendonly no`) and its log, and its own loopback port. It can be
//! stopped and started again on the same port, which is how tests take Redis away in the middle
//! of a run; it is killed on drop, and with its parent thread if the test process dies first.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::ports::{free_port, wait_for_port_closed};

/// How long to wait for PING to answer after spawning.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One redis-server.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl RedisServer {
    /// Starts an instance on a free port, retrying with another port when one was taken.
    pub fn start() -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("redis-")
            .tempdir()
            .expect("create redis dir");
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir,
        };
        let mut last = String::new();
        for _ in 0..5 {
            match server.spawn() {
                Ok(()) => return server,
                Err(log) => {
                    last = log;
                    server.port = free_port();
                }
            }
        }
        panic!("redis-server did not start after 5 tries:\n{last}");
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("redis.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        fs::write(
            self.config_path(),
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode yes\nsave \"\"\nappendonly no\n\
                 dir {dir}\nlogfile {log}\ndaemonize no\ndatabases 1\n",
                port = self.port,
                dir = self.dir.path().display(),
                log = self.log_path().display(),
            ),
        )
        .expect("write redis.conf");
        let mut cmd = Command::new("redis-server");
        cmd.arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches no memory of ours. It makes the kernel
        // kill redis-server when the thread that started it ends, so a test process killed
        // before its Drop runs leaves no server behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn redis-server (apt-get install redis-server): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("redis-server exited with {status}\n{}", self.log()));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("no PONG within {START_TIMEOUT:?}\n{}", self.log()));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the server answers PING right now.
    pub fn ping(&self) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server (SIGKILL: like a crash, nothing is flushed) and waits until its port is
    /// closed.
    pub fn stop(&mut self) {
        self.kill();
        assert!(
            wait_for_port_closed(self.port, Duration::from_secs(5)),
            "redis-server still accepting on {}",
            self.port
        );
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, the way a
    /// hung or black-holed Redis looks to a client.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws a paused server (SIGCONT); it answers what queued up meanwhile.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("redis-server running").id() as i32;
        // SAFETY: kill has no memory-safety preconditions; the pid is our own live child.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// Starts the server again on the same port, empty (nothing was persisted).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The old socket may linger a moment in TIME_WAIT-like states.
                Err(log) if Instant::now() < deadline => {
                    let _ = log;
                    thread::sleep(Duration::from_millis(100));
                }
                Err(log) => panic!("redis-server did not restart:\n{log}"),
            }
        }
    }

    /// Runs one command with redis-cli and returns its output (for assertions on raw keys).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused server would not die of SIGKILL any slower, but make sure it is not left
        // stopped if killing fails.
        if self.child.is_some() {
            self.resume();
        }
        self.kill();
    }
}
