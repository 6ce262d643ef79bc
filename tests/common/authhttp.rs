//! An nginx-style `auth_http` authenticator for tests.
//!
//! It answers the nginx mail `auth_http` protocol from an in-memory account
//! map, records every request head byte for byte and counts connections, and
//! can be switched at runtime into the hostile or flaky behaviours the proxy
//! must survive (garbage, slowness, no `Auth-Status`, gone).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use super::dovecot::TEST_USERS;

/// Largest request head accepted; larger ones close the connection.
const MAX_HEAD: usize = 64 * 1024;

/// How the server answers; switch with [`AuthHttpServer::set_mode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answers from the account map.
    Normal,
    /// Answers random bytes that are not HTTP (ending in CRLFCRLF), then closes.
    Garbage,
    /// Sleeps this long, then answers like `Normal`.
    Slow(Duration),
    /// Stops listening (connections are refused) and closes open connections
    /// at their next request; listens again on the same port when switched back.
    Down,
    /// Accepts, reads the request, closes without a byte.
    Hangup,
    /// `HTTP/1.0 200 OK` without any `Auth-Status` header.
    NoStatus,
    /// Sends exactly these bytes as the reply, then closes.
    Raw(Vec<u8>),
}

/// An account the authenticator knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub password: String,
    /// Returned as `Auth-User`: the name the proxy must replay to the backend.
    pub canonical: String,
}

/// What a failed lookup answers (nginx shows the status text to the client).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub status: String,
    /// `Auth-Wait: N`; nginx lets the client retry on the same connection then.
    pub wait: Option<u32>,
    /// `Auth-Error-Code`, e.g. `535 5.7.8` (SMTP).
    pub error_code: Option<String>,
}

impl Default for Failure {
    fn default() -> Self {
        Failure {
            status: "Invalid login or password".into(),
            wait: Some(0),
            error_code: None,
        }
    }
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// 0-based number of the TCP connection that carried it.
    pub connection: usize,
    /// The head exactly as sent, including the final CRLFCRLF.
    pub raw: Vec<u8>,
}

impl RecordedRequest {
    /// `GET /path HTTP/1.0`.
    pub fn request_line(&self) -> String {
        String::from_utf8_lossy(&self.raw)
            .split("\r\n")
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// Header fields in order, values as sent (still `%XX`-escaped).
    pub fn headers(&self) -> Vec<(String, String)> {
        String::from_utf8_lossy(&self.raw)
            .split("\r\n")
            .skip(1)
            .filter_map(|line| {
                let (name, value) = line.split_once(':')?;
                Some((name.to_string(), value.trim_start().to_string()))
            })
            .collect()
    }

    /// The first header called `name` (case-insensitive), as sent.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers()
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// `Auth-User` with nginx's `%XX` escaping undone.
    pub fn user(&self) -> Option<Vec<u8>> {
        self.header("Auth-User").map(|v| nginx_unescape(&v))
    }

    /// `Auth-Pass` with nginx's `%XX` escaping undone.
    pub fn pass(&self) -> Option<Vec<u8>> {
        self.header("Auth-Pass").map(|v| nginx_unescape(&v))
    }
}

/// Escapes like nginx does for `Auth-User`/`Auth-Pass`: SP, `%` and bytes
/// below 0x20 become `%XX`; everything else (including >= 0x7F) stays raw.
pub fn nginx_escape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        if b == b' ' || b == b'%' || b < 0x20 {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

/// Undoes `%XX` escaping; a `%` not followed by two hex digits stays as is.
pub fn nginx_unescape(value: &str) -> Vec<u8> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

struct Shared {
    mode: watch::Sender<Mode>,
    accounts: Mutex<HashMap<String, Account>>,
    backend: Mutex<SocketAddr>,
    master_replay: Mutex<Option<(String, String)>>,
    failure: Mutex<Failure>,
    requests: Mutex<Vec<RecordedRequest>>,
    connections: AtomicUsize,
}

/// The running authenticator; stops when dropped.
///
/// Runs on its own thread and runtime, so it works from plain `#[test]`s and
/// keeps answering while a `#[tokio::test]` blocks on something else.
pub struct AuthHttpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl AuthHttpServer {
    /// Starts on 127.0.0.1 at a kernel-chosen port, in `Normal` mode, knowing
    /// the Dovecot test users (canonical name = login), pointing at `backend`.
    pub fn start(backend: SocketAddr) -> AuthHttpServer {
        let std_listener =
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind auth_http");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("auth_http addr");
        let accounts = TEST_USERS
            .iter()
            .map(|(login, password)| {
                let account = Account {
                    password: password.to_string(),
                    canonical: login.to_string(),
                };
                (login.to_string(), account)
            })
            .collect();
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(Mode::Normal),
            accounts: Mutex::new(accounts),
            backend: Mutex::new(backend),
            master_replay: Mutex::new(None),
            failure: Mutex::new(Failure::default()),
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
        });
        let (tx, rx) = oneshot::channel();
        let state = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("auth-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("auth_http runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("auth_http listener");
                    tokio::select! {
                        _ = rx => {}
                        _ = serve(listener, addr, state) => {}
                    }
                });
            })
            .expect("spawn auth_http thread");
        AuthHttpServer {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port>/auth`, for the proxy's configuration.
    pub fn url(&self) -> String {
        format!("http://{}/auth", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode.borrow().clone()
    }

    /// Adds or replaces `login` (as the client typed it, after unescaping).
    pub fn add_account(&self, login: &str, password: &str, canonical: &str) {
        let account = Account {
            password: password.into(),
            canonical: canonical.into(),
        };
        self.lock_accounts().insert(login.into(), account);
    }

    pub fn remove_account(&self, login: &str) {
        self.lock_accounts().remove(login);
    }

    /// Replaces the whole account map.
    pub fn set_accounts(&self, accounts: HashMap<String, Account>) {
        *self.lock_accounts() = accounts;
    }

    /// Where `Auth-Server`/`Auth-Port` point.
    pub fn set_backend(&self, backend: SocketAddr) {
        *self.shared.backend.lock().expect("lock") = backend;
    }

    /// With `Some((master, secret))`, OK answers carry `Auth-User: <canonical>%<master>`
    /// and `Auth-Pass: <secret>`, the way nginx is made to do master logins.
    pub fn set_master_replay(&self, replay: Option<(String, String)>) {
        *self.shared.master_replay.lock().expect("lock") = replay;
    }

    pub fn set_failure(&self, failure: Failure) {
        *self.shared.failure.lock().expect("lock") = failure;
    }

    /// Every request head so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().expect("lock").clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().expect("lock").len()
    }

    /// TCP connections accepted so far (keep-alive reuse keeps this low).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Forgets recorded requests and the connection count.
    pub fn clear(&self) {
        self.shared.requests.lock().expect("lock").clear();
        self.shared.connections.store(0, Ordering::SeqCst);
    }

    /// Waits until at least `n` requests arrived.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if requests.len() >= n || Instant::now() >= deadline {
                return requests;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn lock_accounts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Account>> {
        self.shared.accounts.lock().expect("lock")
    }
}

impl Drop for AuthHttpServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections; drops the listener while `Down` and binds the same
/// port again afterwards.
async fn serve(listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    let mut mode_rx = shared.mode.subscribe();
    let mut listener = Some(listener);
    loop {
        let down = *mode_rx.borrow_and_update() == Mode::Down;
        if down {
            listener = None;
            if mode_rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        let active = match listener.take() {
            Some(l) => l,
            None => rebind(addr).await,
        };
        tokio::select! {
            accepted = active.accept() => {
                if let Ok((stream, _)) = accepted {
                    let id = shared.connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(connection(stream, id, Arc::clone(&shared)));
                }
            }
            changed = mode_rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        listener = Some(active);
    }
}

/// Binds `addr` again (SO_REUSEADDR is set by tokio); retries while the port is busy.
async fn rebind(addr: SocketAddr) -> TcpListener {
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Serves one connection: one request, or several with `Connection: keep-alive`.
async fn connection(mut stream: TcpStream, id: usize, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(&mut stream, &mut buf).await else {
            return;
        };
        let request = RecordedRequest {
            connection: id,
            raw: head,
        };
        shared.requests.lock().expect("lock").push(request.clone());
        let keep_alive = request.header("Connection").is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
        });
        let mode = shared.mode.borrow().clone();
        let reply = match mode {
            Mode::Down | Mode::Hangup => return,
            Mode::Garbage => {
                let _ = stream.write_all(&garbage()).await;
                return;
            }
            Mode::Raw(bytes) => {
                let _ = stream.write_all(&bytes).await;
                return;
            }
            Mode::Slow(delay) => {
                tokio::time::sleep(delay).await;
                answer(&request, &shared)
            }
            Mode::NoStatus => "HTTP/1.0 200 OK\r\n".to_string(),
            Mode::Normal => answer(&request, &shared),
        };
        let framing = if keep_alive {
            "Connection: keep-alive\r\nContent-Length: 0\r\n"
        } else {
            "Connection: close\r\n"
        };
        let reply = format!("{reply}{framing}\r\n");
        if stream.write_all(reply.as_bytes()).await.is_err() || !keep_alive {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Reads up to and including CRLFCRLF; bytes after it stay in `buf` for the next request.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(pos + 4);
            return Some(std::mem::replace(buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Status line and `Auth-*` headers for a `Normal` answer (without the final CRLF).
fn answer(request: &RecordedRequest, shared: &Shared) -> String {
    let user = request.user().unwrap_or_default();
    let pass = request.pass().unwrap_or_default();
    let method_ok = request
        .header("Auth-Method")
        .is_some_and(|m| m.eq_ignore_ascii_case("plain") || m.eq_ignore_ascii_case("login"));
    let account = std::str::from_utf8(&user)
        .ok()
        .and_then(|u| shared.accounts.lock().expect("lock").get(u).cloned())
        .filter(|a| method_ok && a.password.as_bytes() == pass.as_slice());
    let mut out = String::from("HTTP/1.0 200 OK\r\n");
    match account {
        Some(account) => {
            let backend = *shared.backend.lock().expect("lock");
            out.push_str("Auth-Status: OK\r\n");
            out.push_str(&format!("Auth-Server: {}\r\n", backend.ip()));
            out.push_str(&format!("Auth-Port: {}\r\n", backend.port()));
            match &*shared.master_replay.lock().expect("lock") {
                Some((master, secret)) => {
                    out.push_str(&format!("Auth-User: {}%{master}\r\n", account.canonical));
                    out.push_str(&format!("Auth-Pass: {secret}\r\n"));
                }
                None => out.push_str(&format!("Auth-User: {}\r\n", account.canonical)),
            }
        }
        None => {
            let failure = shared.failure.lock().expect("lock").clone();
            out.push_str(&format!("Auth-Status: {}\r\n", failure.status));
            if let Some(wait) = failure.wait {
                out.push_str(&format!("Auth-Wait: {wait}\r\n"));
            }
            if let Some(code) = failure.error_code {
                out.push_str(&format!("Auth-Error-Code: {code}\r\n"));
            }
        }
    }
    out
}

/// 64 pseudo-random bytes that cannot be an HTTP status line, then CRLFCRLF.
fn garbage() -> Vec<u8> {
    let mut x = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0x9E37_79B9, |d| d.as_nanos() as u64)
        | 1;
    let mut out: Vec<u8> = (0..64)
        .map(|_| {
            // xorshift64: cheap randomness without a dependency.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    out[0] = 0xFF;
    out.extend_from_slice(b"\r\n\r\n");
    out
}
