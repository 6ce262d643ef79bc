//! The guard's decision cost per login, with the memory store and with Redis on loopback.
//!
//! Not a timed test: it prints figures for `bench/RESULTS.md` ("Guard decision cost").
//! Run with `cargo bench --bench guard` (needs Debian's `redis-server`; it starts its own on a
//! free loopback port). `GUARD_BENCH_LOGINS` changes the number of logins (default 20000).
//!
//! Each login is what the session runner does: `check` before the authenticator, then `failed`
//! (70 %) or `succeeded` (30 %) after it. Logins come from 2000 addresses over 5000 accounts,
//! sequentially on one task, so each figure is the latency one login pays, not throughput.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use portcullis::config::{GuardConfig, GuardStore};
use portcullis::guard::Guard;
use portcullis::secret::Secret;

// The test harness's redis-server, shared as-is (it reaches its sibling as `super::ports`).
#[allow(dead_code)]
#[path = "../tests/common/ports.rs"]
mod ports;
#[allow(dead_code)]
#[path = "../tests/common/redis.rs"]
mod redis_server;

const WARMUP: usize = 1_000;

/// A small deterministic generator, so both stores see the same logins.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn row(&mut self, store: &str, op: &str) -> String {
        let v = &mut self.0;
        v.sort();
        let pct = |p: f64| {
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
        format!(
            "| {store} | {op} | {} | {} | {} | {} | {} |",
            v.len(),
            us(pct(0.50)),
            us(pct(0.90)),
            us(pct(0.99)),
            us(*v.last().unwrap_or(&Duration::ZERO)),
        )
    }
}

async fn run(store: &str, guard: &Guard, logins: usize) -> Vec<String> {
    let mut rng = Lcg(0x5eed);
    let (mut check, mut failed, mut succeeded) =
        (Samples::default(), Samples::default(), Samples::default());
    let mut denied = 0usize;
    for i in 0..WARMUP + logins {
        let client = rng.next() % 2000;
        let ip = IpAddr::V4(Ipv4Addr::new(
            198,
            18 + (client / 1000) as u8,
            (client % 1000 / 4) as u8,
            (client % 4) as u8 + 1,
        ));
        let user = format!("user{}@example.org", rng.next() % 5000);
        let fail = rng.next() % 10 < 7;
        let record = i >= WARMUP;
        let t = Instant::now();
        let decision = guard.check(ip, &user).await;
        if record {
            check.0.push(t.elapsed());
        }
        if !decision.is_allowed() {
            denied += 1;
            continue;
        }
        if fail {
            let password = Secret::from(format!("guess-{}", rng.next() % 50).as_str());
            let t = Instant::now();
            let _ = guard.failed(ip, &user, &password, "imap").await;
            if record {
                failed.0.push(t.elapsed());
            }
        } else {
            let t = Instant::now();
            guard.succeeded(ip, &user).await;
            if record {
                succeeded.0.push(t.elapsed());
            }
        }
    }
    let stats = guard.stats();
    eprintln!(
        "{store}: {denied} logins denied, {} bans started, {} store errors",
        stats.bans_started, stats.store_errors
    );
    vec![
        check.row(store, "check"),
        failed.row(store, "failed"),
        succeeded.row(store, "succeeded"),
    ]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let redis = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores; {redis}")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let logins: usize = std::env::var("GUARD_BENCH_LOGINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let key = b"benchmark-hash-key-0123456789abcdef";
    let memory = Guard::new(&GuardConfig::default(), key).expect("memory guard");
    let redis_server = redis_server::RedisServer::start();
    let redis = Guard::new(
        &GuardConfig {
            store: GuardStore::Redis,
            redis_url: Some(redis_server.url()),
            ..GuardConfig::default()
        },
        key,
    )
    .expect("redis guard");

    println!("machine: {}", machine());
    println!("logins per store: {logins} (after {WARMUP} warm-up logins), latency in µs\n");
    println!("| store | operation | samples | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    for row in run("memory", &memory, logins).await {
        println!("{row}");
    }
    for row in run("redis (loopback)", &redis, logins).await {
        println!("{row}");
    }
    assert!(redis.store_healthy(), "Redis failed during the benchmark");
}
