//! Requests per second through Portcullis's HTTP listener with Basic auth, against the same
//! backend reached directly, on the same machine in the same run.
//!
//! Not a timed test: it prints figures for `bench/RESULTS.md` ("HTTP with Basic auth").
//! Run with `cargo bench --bench http`. `HTTP_BENCH_SECS` (default 5) sets the length of each run,
//! `HTTP_BENCH_CONNS` (default 16) the keep-alive connections of the load generator,
//! `HTTP_BENCH_ROUNDS` (default 3) how many interleaved rounds the medians are taken over.
//!
//! The backend is a minimal hyper HTTP/1.1 server in this process that answers `200 ok` when the
//! `Authorization` header is the master Basic for the canonical account (and counts the rest);
//! the load generator is hyper's HTTP/1.1 client, `GET /jmap/session` in a loop on each
//! connection. Portcullis is the release binary with a generated config: cleartext HTTP listener
//! on loopback (TLS cost is the same with or without the proxy's auth work and is left out), the
//! `file` authenticator, memory guard. Variants:
//!
//! - `direct`: the load generator sends the master Basic straight to the backend;
//! - `argon2, cache off`: the demo users' Argon2id hash (m=19 MiB, t=2) verified on every request;
//! - `argon2, cache 30s`: the same with `http.auth_cache_ttl = "30s"`;
//! - `sha512-crypt 1000 rounds, cache off`: a cheap hash, so the proxy's own cost shows;
//! - `anonymous path`: no credentials at all (`/.well-known/…`), the forwarding cost alone.

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[allow(dead_code)]
#[path = "../tests/common/ports.rs"]
mod ports;

const SECRET: &str = "bench-master-secret";
const ACCOUNT: &str = "alice@example.org";
const CHEAP_HASH: &str = "$6$rounds=1000$OdP6fvLsbyyF1UL7$ocnoAkjIWVgSsDTvumgMxESb8.El31ECTD8/F0epYblrKNprdmu07IMOQsQ0NR6hJEaXINum4bI88BTI0U0G3/";

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The backend: 200 for the master Basic of a known account or an anonymous path, else 401.
async fn backend(listener: TcpListener, refused: Arc<AtomicU64>) {
    let ok: Arc<[String]> = Arc::from(vec![
        basic(&format!("{ACCOUNT}%proxy@example.org"), SECRET),
        basic("cheap@example.org%proxy@example.org", SECRET),
    ]);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let ok = ok.clone();
        let refused = refused.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let good = req.uri().path().starts_with("/.well-known/")
                    || req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| ok.iter().any(|o| o == v));
                if !good {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                async move {
                    let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                    if !good {
                        *r.status_mut() = StatusCode::UNAUTHORIZED;
                    }
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// One load-generator run: `conns` keep-alive connections for `secs`; returns (ok, failed).
async fn load(
    addr: SocketAddr,
    path: &str,
    auth: Option<String>,
    conns: u64,
    secs: u64,
) -> (u64, u64) {
    let end = Instant::now() + Duration::from_secs(secs);
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (ok, bad, auth, path) = (ok.clone(), bad.clone(), auth.clone(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let Ok(tcp) = TcpStream::connect(addr).await else {
                    bad.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let Ok((mut send, conn)) =
                    hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
                        .await
                else {
                    bad.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                tokio::spawn(conn);
                while Instant::now() < end {
                    let mut req = Request::get(path.as_str()).header("host", "localhost");
                    if let Some(a) = &auth {
                        req = req.header("authorization", a.as_str());
                    }
                    let Ok(req) = req.body(Empty::new()) else {
                        return;
                    };
                    match send.send_request(req).await {
                        Ok(resp) => {
                            let good = resp.status() == StatusCode::OK;
                            let _ = resp.into_body().collect().await;
                            if good {
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                bad.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            bad.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed))
}

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let mut s = String::new();
    if std::fs::File::open(format!("/proc/{pid}/stat"))
        .and_then(|mut f| f.read_to_string(&mut s))
        .is_err()
    {
        return 0;
    }
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

struct Proxy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(backend_port: u16, cache: &str) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("master.secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let demo = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/users.toml"),
    )
    .expect("users.toml");
    let users = dir.path().join("users.toml");
    std::fs::write(
        &users,
        format!("{demo}\n[[user]]\naccount = \"cheap@example.org\"\npassword = \"{CHEAP_HASH}\"\n"),
    )
    .expect("users");
    let port = ports::free_port();
    let config = format!(
        r#"
[[listener]]
protocol = "http"
bind = ["127.0.0.1:{port}"]
tls = "none"

[backend]
host = "127.0.0.1"
http = {{ port = {backend_port}, tls = "none" }}

[master]
user = "proxy@example.org"
secret_file = "{secret}"

[authenticator]
kind = "file"
users_file = "{users}"
timeout = "30s"
max_concurrency = 64

[limits]
per_ip_connections = 10000
per_ip_new_per_minute = 100000

[http]
auth_cache_ttl = "{cache}"
"#,
        secret = secret.display(),
        users = users.display(),
    );
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config).expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "portcullis=info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start portcullis");
    assert!(
        ports::wait_for_port(port, Duration::from_secs(10)),
        "portcullis did not start"
    );
    Proxy {
        child,
        port,
        _dir: dir,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let secs = env_or("HTTP_BENCH_SECS", 5);
    let conns = env_or("HTTP_BENCH_CONNS", 16);
    let rounds = env_or("HTTP_BENCH_ROUNDS", 3);
    // The backend gets its own single-threaded runtime on its own thread, the load generator
    // another: everything shares the machine's cores with the proxy, as it would in production.
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let backend_port = std_listener.local_addr().expect("addr").port();
    let refused = Arc::new(AtomicU64::new(0));
    {
        let refused = refused.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                backend(listener, refused).await;
            });
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let direct_addr: SocketAddr = ([127, 0, 0, 1], backend_port).into();
    let off = start_proxy(backend_port, "0s");
    let on = start_proxy(backend_port, "30s");
    let master = basic(&format!("{ACCOUNT}%proxy@example.org"), SECRET);
    let user = basic("alice", "alice-password");
    let cheap = basic("cheap@example.org", "bench-password");
    type Variant<'a> = (&'a str, SocketAddr, &'a str, Option<String>, Option<u32>);
    let variants: Vec<Variant> = vec![
        (
            "direct to backend",
            direct_addr,
            "/jmap/session",
            Some(master),
            None,
        ),
        (
            "Portcullis, argon2id, cache off",
            ([127, 0, 0, 1], off.port).into(),
            "/jmap/session",
            Some(user.clone()),
            Some(off.child.id()),
        ),
        (
            "Portcullis, argon2id, cache 30s",
            ([127, 0, 0, 1], on.port).into(),
            "/jmap/session",
            Some(user),
            Some(on.child.id()),
        ),
        (
            "Portcullis, sha512-crypt 1000 rounds, cache off",
            ([127, 0, 0, 1], off.port).into(),
            "/jmap/session",
            Some(cheap),
            Some(off.child.id()),
        ),
        (
            "Portcullis, anonymous path (no auth)",
            ([127, 0, 0, 1], off.port).into(),
            "/.well-known/jmap",
            None,
            Some(off.child.id()),
        ),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut failures = vec![0u64; variants.len()];
    // Ticks per second: Linux's USER_HZ is 100 on every architecture we run on.
    let hz = 100.0;
    for round in 0..rounds {
        for (i, (name, addr, path, auth, pid)) in variants.iter().enumerate() {
            let before = pid.map(cpu_ticks).unwrap_or(0);
            let started = Instant::now();
            let (ok, bad) = rt.block_on(load(*addr, path, auth.clone(), conns, secs));
            let elapsed = started.elapsed().as_secs_f64();
            let used = pid.map(cpu_ticks).unwrap_or(0).saturating_sub(before);
            let rate = ok as f64 / elapsed;
            rates[i].push(rate);
            if ok > 0 && pid.is_some() {
                cpu[i].push(used as f64 / hz / ok as f64 * 1e6);
            }
            failures[i] += bad;
            eprintln!("round {round}: {name}: {rate:.0} req/s ({ok} ok, {bad} failed)");
        }
    }
    println!(
        "\n{conns} keep-alive connections, {secs} s per run, median of {rounds} interleaved rounds\n"
    );
    println!("| path | requests/s | vs direct | proxy CPU µs/request | failed |");
    println!("|---|---|---|---|---|");
    let direct = median(rates[0].clone()).max(1.0);
    for (i, (name, ..)) in variants.iter().enumerate() {
        let r = median(rates[i].clone());
        let c = if cpu[i].is_empty() {
            "—".to_owned()
        } else {
            format!("{:.0}", median(cpu[i].clone()))
        };
        println!(
            "| {name} | {r:.0} | {:.1} % | {c} | {} |",
            r / direct * 100.0,
            failures[i]
        );
    }
    println!(
        "\nbackend saw {} requests without the expected master Basic",
        refused.load(Ordering::Relaxed)
    );
}
