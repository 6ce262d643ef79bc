//! Runs the real `portcullis` binary with a configuration written for one test, on free
//! loopback ports, capturing its log; stopped (SIGTERM, then kill) on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::ports::{free_port, wait_for_port};

/// The repository root (for the dev certificates and demo users).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn dev_ca() -> PathBuf {
    repo().join("certs-dev/ca.pem")
}

/// What the test wants the proxy to use.
pub struct ProxyOptions {
    pub backend_imap_port: u16,
    /// Dovecot's POP3 port (0: no POP3 listeners).
    pub backend_pop3_port: u16,
    /// Dovecot's submission port (0: no submission listeners).
    pub backend_submission_port: u16,
    /// Dovecot's ManageSieve port (0: no ManageSieve listener).
    pub backend_sieve_port: u16,
    /// `none`, `starttls` or `implicit`.
    pub backend_imap_tls: String,
    /// Extra keys for `[backend]` (e.g. `tls_ca_file`, `proxy_protocol`).
    pub backend_extra: String,
    pub master_secret: String,
    /// The `[authenticator]` section body (without the header).
    pub authenticator: String,
    /// Extra keys for `[guard]` (its `[[guard.window]]` tables go in `extra`).
    pub guard: String,
    /// Extra TOML appended to the file.
    pub extra: String,
    pub rust_log: String,
    /// `limits.per_ip_connections`.
    pub per_ip_connections: u32,
    /// An HTTP backend's port (0: no HTTP listeners).
    pub backend_http_port: u16,
    /// `none` or `implicit`.
    pub backend_http_tls: String,
    /// Extra keys for `[server]` (e.g. `scheduler`, `worker_threads`).
    pub server_extra: String,
}

impl ProxyOptions {
    /// The demo users file. The authenticator deadline is long: password hashing on a busy
    /// two-core machine can outlast the 3 s default, and a timeout is a temporary failure, which
    /// the tests would misread.
    pub fn file_users(backend_imap_port: u16, master_secret: &str) -> Self {
        Self {
            backend_imap_port,
            backend_pop3_port: 0,
            backend_submission_port: 0,
            backend_sieve_port: 0,
            backend_imap_tls: "none".into(),
            backend_extra: String::new(),
            master_secret: master_secret.to_owned(),
            authenticator: format!(
                "kind = \"file\"\nusers_file = \"{}\"\ntimeout = \"15s\"\n",
                repo().join("config/users.toml").display()
            ),
            guard: String::new(),
            extra: String::new(),
            rust_log: "portcullis=debug".into(),
            per_ip_connections: 50,
            backend_http_port: 0,
            backend_http_tls: "none".into(),
            server_extra: String::new(),
        }
    }

    pub fn nginx(backend_imap_port: u16, master_secret: &str, url: &str) -> Self {
        Self {
            authenticator: format!("kind = \"nginx\"\nurl = \"{url}\"\ntimeout = \"1s\"\n"),
            ..Self::file_users(backend_imap_port, master_secret)
        }
    }
}

pub struct Proxy {
    child: Child,
    dir: tempfile::TempDir,
    /// IMAP with implicit TLS.
    pub imaps: u16,
    /// IMAP with STARTTLS.
    pub imap_starttls: u16,
    /// IMAP without TLS, plaintext auth allowed (loopback test listener).
    pub imap_plain: u16,
    /// POP3 with implicit TLS and with STLS (0 when not configured).
    pub pop3s: u16,
    pub pop3_starttls: u16,
    /// Submission with implicit TLS and with STARTTLS (0 when not configured).
    pub submissions: u16,
    pub submission_starttls: u16,
    /// ManageSieve with STARTTLS (0 when not configured).
    pub sieve: u16,
    /// HTTP with implicit TLS (h2 and http/1.1 by ALPN) and cleartext on loopback (0 when not
    /// configured).
    pub https: u16,
    pub http: u16,
}

impl Proxy {
    /// Starts the proxy; when a free port was taken by someone else in the meantime (the proxy
    /// cannot bind), tries again with fresh ports.
    pub fn start(opts: ProxyOptions) -> Proxy {
        let mut last = String::new();
        for _ in 0..4 {
            match Self::try_start(&opts) {
                Ok(proxy) => return proxy,
                Err(log) if log.contains("cannot bind") => last = log,
                Err(log) => panic!("portcullis did not start; log:\n{log}"),
            }
        }
        panic!("portcullis could not bind its ports; log:\n{last}");
    }

    fn try_start(opts: &ProxyOptions) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("master.secret");
        std::fs::write(&secret, format!("{}\n", opts.master_secret)).unwrap();
        let (imaps, imap_starttls, imap_plain) = (free_port(), free_port(), free_port());
        let (pop3s, pop3_starttls) = if opts.backend_pop3_port != 0 {
            (free_port(), free_port())
        } else {
            (0, 0)
        };
        let pop3 = if opts.backend_pop3_port != 0 {
            format!(
                "[[listener]]\nprotocol = \"pop3\"\nbind = [\"127.0.0.1:{pop3s}\"]\ntls = \"implicit\"\n\n[[listener]]\nprotocol = \"pop3\"\nbind = [\"127.0.0.1:{pop3_starttls}\"]\ntls = \"starttls\"\n"
            )
        } else {
            String::new()
        };
        let pop3_backend = if opts.backend_pop3_port != 0 {
            format!(
                "pop3 = {{ port = {}, tls = \"none\" }}",
                opts.backend_pop3_port
            )
        } else {
            String::new()
        };
        let (submissions, submission_starttls) = if opts.backend_submission_port != 0 {
            (free_port(), free_port())
        } else {
            (0, 0)
        };
        let submission = if opts.backend_submission_port != 0 {
            format!(
                "[[listener]]\nprotocol = \"submission\"\nbind = [\"127.0.0.1:{submissions}\"]\ntls = \"implicit\"\n\n[[listener]]\nprotocol = \"submission\"\nbind = [\"127.0.0.1:{submission_starttls}\"]\ntls = \"starttls\"\n"
            )
        } else {
            String::new()
        };
        let submission_backend = if opts.backend_submission_port != 0 {
            format!(
                "submission = {{ port = {}, tls = \"none\" }}",
                opts.backend_submission_port
            )
        } else {
            String::new()
        };
        let sieve = if opts.backend_sieve_port != 0 {
            free_port()
        } else {
            0
        };
        let (sieve_listener, sieve_backend) = if sieve != 0 {
            (
                format!("[[listener]]\nprotocol = \"managesieve\"\nbind = [\"127.0.0.1:{sieve}\"]\ntls = \"starttls\"\n"),
                format!(
                    "managesieve = {{ port = {}, tls = \"none\" }}",
                    opts.backend_sieve_port
                ),
            )
        } else {
            (String::new(), String::new())
        };
        let (https, http) = if opts.backend_http_port != 0 {
            (free_port(), free_port())
        } else {
            (0, 0)
        };
        let (http_listener, http_backend) = if https != 0 {
            (
                format!("[[listener]]\nprotocol = \"http\"\nbind = [\"127.0.0.1:{https}\"]\ntls = \"implicit\"\n\n[[listener]]\nprotocol = \"http\"\nbind = [\"127.0.0.1:{http}\"]\ntls = \"none\"\n"),
                format!(
                    "http = {{ port = {}, tls = \"{}\" }}",
                    opts.backend_http_port, opts.backend_http_tls
                ),
            )
        } else {
            (String::new(), String::new())
        };
        let certs = repo().join("certs-dev");
        let config = format!(
            r#"
[server]
hostname = "localhost"
shutdown_grace = "2s"
{server_extra}

[tls]
default_cert = "{cert}"
default_key = "{key}"
handshake_timeout = "3s"

[[listener]]
protocol = "imap"
bind = ["127.0.0.1:{imaps}"]
tls = "implicit"

[[listener]]
protocol = "imap"
bind = ["127.0.0.1:{imap_starttls}"]
tls = "starttls"

[[listener]]
protocol = "imap"
bind = ["127.0.0.1:{imap_plain}"]
tls = "none"
allow_plaintext_auth = true

{pop3}

{submission}
{sieve_listener}
{http_listener}

[backend]
host = "127.0.0.1"
{http_backend}
{pop3_backend}
{submission_backend}
{sieve_backend}
imap = {{ port = {backend}, tls = "{backend_tls}" }}
{backend_extra}

[master]
user = "proxy@example.org"
secret_file = "{secret}"

[authenticator]
{authn}

[guard]
failure_delay = "0s"
failure_jitter = "0s"
{guard}

[limits]
per_ip_connections = {per_ip}
per_ip_new_per_minute = 10000

{extra}
"#,
            cert = certs.join("server.pem").display(),
            key = certs.join("server.key").display(),
            backend = opts.backend_imap_port,
            backend_tls = opts.backend_imap_tls,
            backend_extra = opts.backend_extra,
            secret = secret.display(),
            authn = opts.authenticator,
            extra = opts.extra,
            guard = opts.guard,
            per_ip = opts.per_ip_connections,
            server_extra = opts.server_extra,
        );
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("portcullis.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", &opts.rust_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start portcullis");
        let proxy = Proxy {
            child,
            dir,
            imaps,
            imap_starttls,
            imap_plain,
            pop3s,
            pop3_starttls,
            submissions,
            submission_starttls,
            sieve,
            https,
            http,
        };
        for port in [
            imaps,
            imap_starttls,
            imap_plain,
            pop3s,
            pop3_starttls,
            submissions,
            submission_starttls,
            sieve,
            https,
            http,
        ] {
            if port == 0 {
                continue;
            }
            if !wait_for_port(port, Duration::from_secs(10)) {
                return Err(proxy.log());
            }
        }
        Ok(proxy)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.toml")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("portcullis.log")).unwrap_or_default()
    }

    /// Of the first session that ended, the bytes that went backend to client socket to socket
    /// (its `session ended` line's `zero_copy`); waits up to 5 s for that line.
    pub fn first_session_zero_copy(&self) -> u64 {
        self.first_session_end_field("zero_copy")
    }

    /// Of the first session that ended, the bytes that went client to backend socket to socket
    /// (`zero_copy_to_backend`).
    pub fn first_session_zero_copy_to_backend(&self) -> u64 {
        self.first_session_end_field("zero_copy_to_backend")
    }

    /// A numeric field of the first `session ended` line; waits up to 5 s for that line.
    fn first_session_end_field(&self, name: &str) -> u64 {
        let key = format!(" {name}=");
        for _ in 0..50 {
            let found = self
                .log()
                .lines()
                .find(|l| l.contains("session ended") && l.contains(&key))
                .and_then(|l| {
                    let v = l.split(&key).nth(1)?;
                    v.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse::<u64>()
                        .ok()
                });
            if let Some(n) = found {
                return n;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no session end with {name}: {}", self.log())
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY-free: libc::kill is a plain syscall wrapper; tests may use it.
        unsafe_free_kill(self.pid(), libc::SIGTERM);
    }

    /// Waits for the process to exit; returns whether it did within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

fn unsafe_free_kill(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Proxy {
    fn drop(&mut self) {
        unsafe_free_kill(self.pid(), libc::SIGTERM);
        if !self.wait_exit(Duration::from_secs(5)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A raw line-oriented client over plain TCP or TLS (trusting the dev CA), for byte-exact
/// negative tests no stock client can produce.
pub struct Raw {
    stream: Box<dyn ReadWrite>,
    buf: Vec<u8>,
}

pub trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

fn tls_client(alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(dev_ca()).unwrap();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
        let cert: rustls_pki_types::CertificateDer = cert.unwrap();
        roots.add(cert).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// Performs a TLS handshake over `tcp`; `Err` if the server refused it.
pub fn tls_over(
    tcp: TcpStream,
    alpn: &[&str],
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(tls_client(alpn), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

impl Raw {
    /// Connects in the clear from the loopback address `source` (any 127.x.y.z works on Linux),
    /// so a test can be a different client IP.
    pub fn plain_from(port: u16, source: std::net::Ipv4Addr) -> Raw {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&std::net::SocketAddr::from((source, 0)).into())
            .unwrap();
        sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
            .unwrap();
        let tcp: TcpStream = sock.into();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            stream: Box::new(tcp),
            buf: Vec::new(),
        }
    }

    pub fn plain(port: u16) -> Raw {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            stream: Box::new(tcp),
            buf: Vec::new(),
        }
    }

    /// Connects in the clear; also returns the socket, for a STARTTLS upgrade by hand
    /// ([`Raw::over_tls`]).
    pub fn plain_with_socket(port: u16) -> (Raw, TcpStream) {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let raw = Raw {
            stream: Box::new(tcp.try_clone().unwrap()),
            buf: Vec::new(),
        };
        (raw, tcp)
    }

    /// A TLS client over `tcp` (after the protocol's STARTTLS exchange).
    pub fn over_tls(tcp: TcpStream, alpn: &[&str]) -> Raw {
        Raw {
            stream: Box::new(tls_over(tcp, alpn).unwrap()),
            buf: Vec::new(),
        }
    }

    pub fn tls(port: u16) -> Raw {
        Raw::tls_alpn(port, &["imap"])
    }

    pub fn tls_alpn(port: u16, alpn: &[&str]) -> Raw {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            stream: Box::new(tls_over(tcp, alpn).unwrap()),
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        self.stream.flush().unwrap();
    }

    /// Reads one line (with CRLF); `None` at EOF or error.
    pub fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads lines until one starts with `prefix`; returns all of them.
    pub fn until(&mut self, prefix: &str) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(l) = self.line() {
            let done = l.starts_with(prefix);
            lines.push(l);
            if done {
                return lines;
            }
        }
        panic!("connection closed before a line starting with {prefix:?}: {lines:?}");
    }

    /// True if the server closed the connection (reads EOF) without sending a line.
    pub fn closed(&mut self) -> bool {
        self.line().is_none()
    }

    /// Connects in the clear, checks the greeting offers STARTTLS, upgrades, and returns the
    /// TLS client (nothing of the cleartext phase is left in its buffer).
    pub fn starttls(port: u16) -> Raw {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut plain = Raw {
            stream: Box::new(tcp.try_clone().unwrap()),
            buf: Vec::new(),
        };
        let greeting = plain.line().unwrap();
        assert!(greeting.contains("STARTTLS"), "{greeting}");
        plain.send(b"s STARTTLS\r\n");
        let ok = plain.line().unwrap();
        assert!(ok.starts_with("s OK"), "{ok}");
        Raw {
            stream: Box::new(tls_over(tcp, &["imap"]).unwrap()),
            buf: Vec::new(),
        }
    }
}
