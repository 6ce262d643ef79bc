//! `loadgen`: the load generator behind `bench/compare.sh`.
//!
//! - `login`: N clients each loop connect → (TLS) → login → a small command → logout for T
//!   seconds; logins/s, login and session latency percentiles, errors. IMAP, POP3, SMTP, and
//!   HTTP (two `GET`s with Basic auth on one keep-alive connection).
//! - `fetch` / `append`: log in once per connection, then FETCH a large message repeatedly, or
//!   APPEND one (and expunge it again); MiB/s. `retr` and `send` do the same over POP3 (`RETR`)
//!   and SMTP submission (`MAIL`, `RCPT`, `DATA`).
//! - `idle`: open N authenticated IMAP connections in IDLE and hold them; the watched processes'
//!   RSS growth per connection.
//! - `authhttp`: the nginx `auth_http` answerer both proxies ask (see `authhttp.rs`).
//! - `httpbackend`: a minimal HTTP backend for the HTTP cells (see `httpbackend.rs`).
//! - `smtpsink`: the SMTP server Dovecot's submission relays to; discards bodies (see
//!   `smtpsink.rs`).
//! - `free-ports`: prints free loopback TCP ports for the script.
//!
//! Every run prints one JSON object on stdout. With `--pids`, the CPU time (utime + stime from
//! /proc/PID/stat) and RSS of those processes (the proxy's) are read before and after, so the
//! proxy's own cost per login and per MiB is reported independently of the backend.

mod authhttp;
mod client;
mod dotend;
mod httpbackend;
mod httpserve;
mod procstat;
mod smtpsink;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use tokio_rustls::TlsConnector;

use client::{Conn, Proto};

#[derive(Parser)]
#[command(about = "Load generator for Portcullis, nginx mail and direct Dovecot")]
struct Cli {
    /// Tokio worker threads of the generator (it shares the machine with what it measures).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Login(LoginArgs),
    Fetch(ThroughputArgs),
    Append(ThroughputArgs),
    /// POP3 `RETR 1` repeated (a mailbox download); the message is placed over IMAP first.
    Retr(ThroughputArgs),
    /// SMTP submission of a large message repeated (`MAIL`, `RCPT`, `DATA`) on one session.
    Send(ThroughputArgs),
    Idle(IdleArgs),
    Authhttp(AuthHttpArgs),
    /// A minimal HTTP backend for the HTTP cells (see `httpbackend.rs`); prints its port.
    Httpbackend(HttpBackendArgs),
    /// The SMTP relay target for Dovecot's submission service; prints its port.
    Smtpsink {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    FreePorts {
        count: usize,
    },
}

#[derive(Args, Clone)]
struct Target {
    /// Free-form label copied into the JSON (e.g. `nginx`, `portcullis`, `direct`).
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long, value_enum, default_value = "imap")]
    proto: Proto,
    #[arg(long)]
    addr: SocketAddr,
    /// Implicit TLS (TLS 1.3, full handshake every time: no resumption).
    #[arg(long)]
    tls: bool,
    /// Users are `<prefix><i>` for i in 0..users, all with `--password`.
    #[arg(long, default_value = "user")]
    user_prefix: String,
    #[arg(long, default_value_t = 100)]
    users: usize,
    #[arg(long, default_value = "benchpass")]
    password: String,
    /// Comma-separated pids whose CPU time and RSS are measured (the proxy's processes).
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
}

#[derive(Args)]
struct LoginArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, short = 'c', default_value_t = 16)]
    concurrency: usize,
    /// Seconds to run.
    #[arg(long, short = 't', default_value_t = 10.0)]
    duration: f64,
    /// Also sample the watched processes' RSS every this many seconds (leak check).
    #[arg(long)]
    rss_every: Option<f64>,
}

#[derive(Args)]
struct ThroughputArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, short = 'c', default_value_t = 1)]
    concurrency: usize,
    #[arg(long, short = 't', default_value_t = 10.0)]
    duration: f64,
    /// Message size in KiB.
    #[arg(long, default_value_t = 4096)]
    size_kib: usize,
    /// `retr` only: a cleartext IMAP address of the same backend, to place the message with.
    #[arg(long)]
    prep_addr: Option<SocketAddr>,
}

/// What a throughput run repeats.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Fetch,
    Append,
    Retr,
    Send,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    target: Target,
    /// Connections to open and hold.
    #[arg(long, short = 'n', default_value_t = 1000)]
    connections: usize,
    /// Logins in flight while opening.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Seconds to hold them after the last one is open (RSS is read at the end).
    #[arg(long, default_value_t = 2.0)]
    hold: f64,
}

#[derive(Args)]
struct AuthHttpArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long, default_value = "benchpass")]
    password: String,
    #[arg(long, default_value = "master")]
    master: String,
    #[arg(long)]
    master_secret: String,
    #[arg(long)]
    imap_port: u16,
    #[arg(long, default_value_t = 0)]
    pop3_port: u16,
    #[arg(long, default_value_t = 0)]
    smtp_port: u16,
}

#[derive(Args)]
struct HttpBackendArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long, default_value = "benchpass")]
    password: String,
    #[arg(long, default_value = "master")]
    master: String,
    #[arg(long)]
    master_secret: String,
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    let out = runtime.block_on(async move {
        match cli.cmd {
            Cmd::Login(a) => login(a).await,
            Cmd::Fetch(a) => throughput(a, Transfer::Fetch).await,
            Cmd::Append(a) => throughput(a, Transfer::Append).await,
            Cmd::Retr(a) => throughput(a, Transfer::Retr).await,
            Cmd::Send(a) => throughput(a, Transfer::Send).await,
            Cmd::Idle(a) => idle(a).await,
            Cmd::Httpbackend(a) => {
                let listener = httpserve::bind(a.listen).await;
                let settings = httpbackend::Settings {
                    password: a.password,
                    master: a.master,
                    master_secret: a.master_secret,
                };
                if let Err(e) = httpbackend::serve(listener, settings).await {
                    eprintln!("httpbackend: {e}");
                    std::process::exit(1);
                }
                Value::Null
            }
            Cmd::Smtpsink { listen } => {
                if let Err(e) = smtpsink::serve(httpserve::bind(listen).await).await {
                    eprintln!("smtpsink: {e}");
                    std::process::exit(1);
                }
                Value::Null
            }
            Cmd::Authhttp(a) => {
                let listener = httpserve::bind(a.listen).await;
                let settings = authhttp::Settings {
                    password: a.password,
                    master: a.master,
                    master_secret: a.master_secret,
                    imap_port: a.imap_port,
                    pop3_port: a.pop3_port,
                    smtp_port: a.smtp_port,
                };
                if let Err(e) = authhttp::serve(listener, settings).await {
                    eprintln!("authhttp: {e}");
                    std::process::exit(1);
                }
                Value::Null
            }
            Cmd::FreePorts { count } => {
                let listeners: Vec<_> = (0..count)
                    .map(|_| {
                        std::net::TcpListener::bind("127.0.0.1:0")
                            .unwrap_or_else(|e| panic!("bind: {e}"))
                    })
                    .collect();
                let ports: Vec<String> = listeners
                    .iter()
                    .map(|l| {
                        l.local_addr()
                            .map(|a| a.port().to_string())
                            .unwrap_or_default()
                    })
                    .collect();
                println!("{}", ports.join(" "));
                Value::Null
            }
        }
    });
    if !out.is_null() {
        println!("{out}");
    }
}

fn base_json(mode: &str, t: &Target) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("mode".into(), json!(mode));
    m.insert("label".into(), json!(t.label));
    m.insert("proto".into(), json!(t.proto.name()));
    m.insert("addr".into(), json!(t.addr.to_string()));
    m.insert("tls".into(), json!(t.tls));
    m
}

fn connector(t: &Target) -> Option<TlsConnector> {
    t.tls.then(client::tls_connector)
}

fn user(t: &Target, i: usize) -> String {
    format!("{}{}", t.user_prefix, i % t.users.max(1))
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn lat_json(mut v: Vec<u32>) -> Value {
    v.sort_unstable();
    json!({
        "p50": percentile(&v, 0.50),
        "p90": percentile(&v, 0.90),
        "p99": percentile(&v, 0.99),
        "max": v.last().copied().unwrap_or(0),
    })
}

async fn login(a: LoginArgs) -> Value {
    let t = Arc::new(a.target);
    let tls = connector(&t);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let before = procstat::sample(&t.pids);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..a.concurrency {
        let (t, tls, stop, errors, first_error) = (
            t.clone(),
            tls.clone(),
            stop.clone(),
            errors.clone(),
            first_error.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut login_us = Vec::new();
            let mut session_us = Vec::new();
            let mut i = worker;
            while !stop.load(Ordering::Relaxed) {
                let u = user(&t, i);
                i += a.concurrency;
                let t0 = Instant::now();
                let result = async {
                    let mut c = Conn::connect(t.addr, tls.as_ref()).await?;
                    c.login(t.proto, &u, &t.password).await?;
                    let logged_in = t0.elapsed();
                    if t.proto == Proto::Http {
                        c.http_get(client::HTTP_PATH, &u, &t.password).await?;
                    } else {
                        c.small_command(t.proto).await?;
                    }
                    c.logout(t.proto).await?;
                    Ok::<_, std::io::Error>(logged_in)
                };
                match tokio::time::timeout(Duration::from_secs(30), result).await {
                    Ok(Ok(logged_in)) => {
                        login_us.push(logged_in.as_micros() as u32);
                        session_us.push(t0.elapsed().as_micros() as u32);
                    }
                    other => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let msg = match other {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timeout".to_string(),
                        };
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(msg);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (login_us, session_us)
        }));
    }
    let mut rss_samples = Vec::new();
    let deadline = start + Duration::from_secs_f64(a.duration);
    if let Some(every) = a.rss_every {
        while Instant::now() < deadline {
            let next = (Instant::now() + Duration::from_secs_f64(every)).min(deadline);
            tokio::time::sleep_until(next.into()).await;
            rss_samples.push(json!([
                start.elapsed().as_secs_f64().round(),
                procstat::sample(&t.pids).rss_kib
            ]));
        }
    } else {
        tokio::time::sleep_until(deadline.into()).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut login_us, mut session_us) = (Vec::new(), Vec::new());
    for task in tasks {
        if let Ok((l, s)) = task.await {
            login_us.extend(l);
            session_us.extend(s);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = procstat::sample(&t.pids);
    let n = login_us.len();
    let mut m = base_json("login", &t);
    m.insert("concurrency".into(), json!(a.concurrency));
    m.insert("seconds".into(), json!(elapsed));
    m.insert("logins".into(), json!(n));
    m.insert("errors".into(), json!(errors.load(Ordering::Relaxed)));
    if let Some(e) = first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        m.insert("first_error".into(), json!(e));
    }
    m.insert("logins_per_s".into(), json!(n as f64 / elapsed));
    m.insert("login_latency_us".into(), lat_json(login_us));
    m.insert("session_latency_us".into(), lat_json(session_us));
    if !t.pids.is_empty() {
        let cpu_us = after.cpu_us.saturating_sub(before.cpu_us);
        m.insert("proxy_cpu_s".into(), json!(cpu_us as f64 / 1e6));
        m.insert(
            "proxy_cpu_us_per_login".into(),
            json!(if n > 0 { cpu_us as f64 / n as f64 } else { 0.0 }),
        );
        m.insert("proxy_rss_kib_before".into(), json!(before.rss_kib));
        m.insert("proxy_rss_kib_after".into(), json!(after.rss_kib));
        if !rss_samples.is_empty() {
            m.insert("proxy_rss_kib_samples".into(), json!(rss_samples));
        }
    }
    Value::Object(m)
}

/// A message of about `size` bytes: headers and 76-character lines.
fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: bench@example.org\r\nTo: user@example.org\r\nSubject: bench\r\nMessage-ID: <bench@example.org>\r\n\r\n".to_vec();
    let line: Vec<u8> = (0..76u8).map(|i| b'A' + (i % 26)).chain(*b"\r\n").collect();
    while m.len() + line.len() <= size {
        m.extend_from_slice(&line);
    }
    m
}

async fn throughput(a: ThroughputArgs, kind: Transfer) -> Value {
    let t = Arc::new(a.target);
    let tls = connector(&t);
    let msg = Arc::new(message(a.size_kib * 1024));
    let append = kind == Transfer::Append;
    let mode = match kind {
        Transfer::Fetch => "fetch",
        Transfer::Append => "append",
        Transfer::Retr => "retr",
        Transfer::Send => "send",
    };
    if matches!(kind, Transfer::Fetch | Transfer::Retr) {
        // One message of the wanted size in the first user's INBOX, for every connection to
        // FETCH (over the target) or RETR (placed over the backend's cleartext IMAP).
        let (prep_addr, prep_tls) = match kind {
            Transfer::Retr => match a.prep_addr {
                Some(addr) => (addr, None),
                None => {
                    return json!({"mode": mode, "label": t.label, "error": "retr needs --prep-addr"})
                }
            },
            _ => (t.addr, tls.clone()),
        };
        let prep = async {
            let mut c = Conn::connect(prep_addr, prep_tls.as_ref()).await?;
            c.login(Proto::Imap, &user(&t, 0), &t.password).await?;
            let exists = c.imap("SELECT INBOX").await?.unwrap_or(0);
            if exists != 1 {
                if exists > 1 {
                    c.imap("STORE 1:* +FLAGS.SILENT (\\Deleted)").await?;
                    c.imap("EXPUNGE").await?;
                }
                c.imap_append("INBOX", &msg).await?;
            }
            c.logout(Proto::Imap).await
        };
        if let Err(e) = prep.await {
            return json!({"mode": mode, "label": t.label, "error": format!("prepare: {e}")});
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // Log everyone in first, then measure only the transfer.
    let ready = Arc::new(tokio::sync::Barrier::new(a.concurrency + 1));
    for worker in 0..a.concurrency {
        let (t, tls, stop, bytes, ops, msg, ready) = (
            t.clone(),
            tls.clone(),
            stop.clone(),
            bytes.clone(),
            ops.clone(),
            msg.clone(),
            ready.clone(),
        );
        let proto = match kind {
            Transfer::Retr => Proto::Pop3,
            Transfer::Send => Proto::Smtp,
            Transfer::Fetch | Transfer::Append => Proto::Imap,
        };
        tasks.push(tokio::spawn(async move {
            let setup = async {
                let mut c = Conn::connect(t.addr, tls.as_ref()).await?;
                let u = if append {
                    user(&t, worker + 1)
                } else {
                    user(&t, 0)
                };
                c.login(proto, &u, &t.password).await?;
                match kind {
                    Transfer::Append => {
                        let _ = c.imap("CREATE Bench").await;
                        c.imap("SELECT Bench").await?;
                    }
                    Transfer::Fetch => {
                        c.imap("EXAMINE INBOX").await?;
                    }
                    Transfer::Retr | Transfer::Send => {}
                }
                Ok::<_, std::io::Error>(c)
            };
            let setup = setup.await;
            ready.wait().await;
            let mut c = setup?;
            while !stop.load(Ordering::Relaxed) {
                match kind {
                    Transfer::Append => {
                        c.imap_append("Bench", &msg).await?;
                        bytes.fetch_add(msg.len() as u64, Ordering::Relaxed);
                        c.imap("STORE 1:* +FLAGS.SILENT (\\Deleted)").await?;
                        c.imap("EXPUNGE").await?;
                    }
                    Transfer::Fetch => {
                        c.received = 0;
                        c.imap("FETCH 1 BODY.PEEK[]").await?;
                        bytes.fetch_add(c.received, Ordering::Relaxed);
                    }
                    Transfer::Retr => {
                        c.received = 0;
                        c.pop3_retr(1).await?;
                        bytes.fetch_add(c.received, Ordering::Relaxed);
                    }
                    Transfer::Send => {
                        c.smtp_send(&msg).await?;
                        bytes.fetch_add(msg.len() as u64, Ordering::Relaxed);
                    }
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
            c.logout(proto).await
        }));
    }
    ready.wait().await;
    let before = procstat::sample(&t.pids);
    let (b0, start) = (bytes.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    let (b1, elapsed) = (bytes.load(Ordering::Relaxed), start.elapsed().as_secs_f64());
    let after = procstat::sample(&t.pids);
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let mib = (b1 - b0) as f64 / (1024.0 * 1024.0);
    let mut m = base_json(mode, &t);
    m.insert("concurrency".into(), json!(a.concurrency));
    m.insert("size_kib".into(), json!(a.size_kib));
    m.insert("seconds".into(), json!(elapsed));
    m.insert("mib".into(), json!(mib));
    m.insert("mib_per_s".into(), json!(mib / elapsed));
    m.insert("ops".into(), json!(ops.load(Ordering::Relaxed)));
    m.insert("errors".into(), json!(errors.len()));
    if let Some(e) = errors.first() {
        m.insert("first_error".into(), json!(e));
    }
    if !t.pids.is_empty() {
        let cpu_us = after.cpu_us.saturating_sub(before.cpu_us);
        m.insert("proxy_cpu_s".into(), json!(cpu_us as f64 / 1e6));
        m.insert(
            "proxy_cpu_us_per_mib".into(),
            json!(if mib > 0.0 { cpu_us as f64 / mib } else { 0.0 }),
        );
    }
    Value::Object(m)
}

async fn idle(a: IdleArgs) -> Value {
    let t = Arc::new(a.target);
    let tls = connector(&t);
    let before = procstat::sample(&t.pids);
    let sem = Arc::new(tokio::sync::Semaphore::new(a.parallel.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..a.connections {
        let (t, tls, sem) = (t.clone(), tls.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let mut c = Conn::connect(t.addr, tls.as_ref()).await?;
            c.login(Proto::Imap, &user(&t, i), &t.password).await?;
            c.imap("SELECT INBOX").await?;
            c.imap_idle().await?;
            Ok::<_, std::io::Error>(c)
        }));
    }
    let mut conns = Vec::new();
    let mut errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let opened_in = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    let after = procstat::sample(&t.pids);
    let n = conns.len();
    drop(conns);
    let mut m = base_json("idle", &t);
    m.insert("connections".into(), json!(n));
    m.insert("errors".into(), json!(errors.len()));
    if let Some(e) = errors.first() {
        m.insert("first_error".into(), json!(e));
    }
    m.insert("open_seconds".into(), json!(opened_in));
    if !t.pids.is_empty() {
        m.insert("proxy_rss_kib_before".into(), json!(before.rss_kib));
        m.insert("proxy_rss_kib_after".into(), json!(after.rss_kib));
        let per = if n > 0 {
            (after.rss_kib as f64 - before.rss_kib as f64) / n as f64
        } else {
            0.0
        };
        m.insert("proxy_kib_per_connection".into(), json!(per));
    }
    Value::Object(m)
}
