//! The guard's contract: every scenario runs against the memory store and against a real
//! redis-server (one private instance per test), through the same public API the session runner
//! uses. Written once; `contract!` instantiates each scenario for both stores.
//!
//! Addresses are documentation ranges (203.0.113.0/24, 198.51.100.0/24, 192.0.2.0/24,
//! 2001:db8::/32); nothing is sent to them, they are only keys.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use portcullis::config::{GuardConfig, GuardStore, WindowConfig, WindowKey};
use portcullis::guard::{BanReason, Decision, DenyReason, Guard, GuardError};
use portcullis::secret::Secret;

const HASH_KEY: &[u8] = b"contract-test-hash-key-0123456789";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Store {
    Memory,
    Redis,
}

/// One scenario's world: the store kind and, for Redis, its server.
struct Env {
    store: Store,
    redis: Option<RedisServer>,
    guards: std::cell::RefCell<Vec<Guard>>,
    outage: bool,
}

impl Env {
    fn new(store: Store) -> Self {
        Self {
            store,
            redis: (store == Store::Redis).then(RedisServer::start),
            guards: Default::default(),
            outage: false,
        }
    }

    /// A guard on this world's store (a second call gives a second instance sharing it).
    fn guard(&self, mut config: GuardConfig) -> Guard {
        if let Some(redis) = &self.redis {
            config.store = GuardStore::Redis;
            config.redis_url = Some(redis.url());
        }
        let guard = Guard::new(&config, HASH_KEY).expect("guard");
        self.guards.borrow_mut().push(guard.clone());
        guard
    }

    /// Takes the shared store away (nothing to take for the memory store).
    fn stop_shared(&mut self) {
        if let Some(redis) = &mut self.redis {
            redis.stop();
            self.outage = true;
        }
    }

    /// Brings it back, empty.
    fn restart_shared(&mut self) {
        if let Some(redis) = &mut self.redis {
            redis.restart();
        }
    }
}

/// A Redis scenario must have been decided by Redis: the local fallback gives the same answers,
/// so without this check a broken Redis path would pass unnoticed.
impl Drop for Env {
    fn drop(&mut self) {
        if self.redis.is_none() || self.outage || std::thread::panicking() {
            return;
        }
        for g in self.guards.borrow().iter() {
            let s = g.stats();
            assert!(
                g.store_healthy() && s.store_errors == 0 && s.fallback_decisions == 0,
                "a Redis scenario fell back to the local store: {s:?}"
            );
        }
    }
}

/// Defaults, with fast store timeouts and no failure delay.
fn config() -> GuardConfig {
    GuardConfig {
        redis_timeout: Duration::from_millis(300),
        redis_retry: Duration::from_millis(100),
        failure_delay: Duration::ZERO,
        failure_jitter: Duration::ZERO,
        ..GuardConfig::default()
    }
}

fn window(key: WindowKey, secs: u64, max: u32) -> WindowConfig {
    WindowConfig {
        key,
        period: Duration::from_secs(secs),
        max,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn pw(i: usize) -> Secret {
    Secret::from(format!("wrong-password-{i}").as_str())
}

fn denied(reason: DenyReason) -> Decision {
    Decision::Deny { reason }
}

fn seconds(b: &portcullis::guard::BanInfo) -> f64 {
    b.until
        .duration_since(b.since)
        .expect("until after since")
        .as_secs_f64()
}

/// Polls `f` every 20 ms until it holds or `limit` passes; returns the time it took.
async fn within<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn one_ip_guessing_one_account(env: Env) {
    let g = env.guard(config());
    let attacker = ip("203.0.113.10");
    for i in 0..5 {
        assert_eq!(
            g.check(attacker, "alice@example.org").await,
            Decision::Allow
        );
        let o = g
            .failed(attacker, "alice@example.org", &pw(i), "imap")
            .await;
        assert!(
            o.counted && !o.repeat && !o.ban_started(),
            "failure {i}: {o:?}"
        );
    }
    // Case and stray spaces do not make another account.
    let o = g
        .failed(attacker, " Alice@Example.ORG", &pw(5), "imap")
        .await;
    assert_eq!(o.bans.len(), 1, "{o:?}");
    let ban = &o.bans[0];
    assert_eq!(ban.key, "ip_account:203.0.113.10 alice@example.org");
    assert_eq!(ban.kind, WindowKey::IpAccount);
    assert_eq!(ban.offences, 1);
    assert_eq!(ban.account.as_deref(), Some("alice@example.org"));
    assert!((240.0..=360.0).contains(&seconds(ban)), "{ban:?}");
    assert_eq!(
        g.check(attacker, "alice@example.org").await,
        denied(DenyReason::PairBanned)
    );
    // Only this pair: the address's other users and alice elsewhere go on.
    assert_eq!(g.check(attacker, "bob@example.org").await, Decision::Allow);
    assert_eq!(
        g.check(ip("203.0.113.11"), "alice@example.org").await,
        Decision::Allow
    );
    let bans = g.bans().await;
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(bans[0].key, ban.key);
    assert_eq!(bans[0].protocol.as_deref(), Some("imap"));
    assert_eq!(bans[0].reason, ban.reason);
}

async fn bans_grow_with_each_offence(env: Env) {
    let g = env.guard(GuardConfig {
        windows: vec![window(WindowKey::IpAccount, 600, 2)],
        ban_initial: Duration::from_millis(600),
        ban_factor: 2.0,
        ban_jitter: 0.2,
        ..config()
    });
    let a = ip("203.0.113.20");
    let mut n = 0;
    let mut offend = || {
        let g = g.clone();
        n += 3;
        let start = n;
        async move {
            let mut last = None;
            for i in start..start + 3 {
                last = Some(g.failed(a, "carol", &pw(i), "pop3").await);
            }
            last.expect("three failures")
        }
    };
    let first = offend().await;
    assert_eq!(first.bans.len(), 1, "{first:?}");
    assert_eq!(first.bans[0].offences, 1);
    let d1 = seconds(&first.bans[0]);
    assert!((0.48..=0.72).contains(&d1), "{d1}");
    assert!(!g.check(a, "carol").await.is_allowed());
    let expired = within(Duration::from_secs(3), || {
        let g = g.clone();
        async move { g.check(a, "carol").await.is_allowed() }
    })
    .await;
    assert!(expired.is_some(), "the first ban never ended");
    let second = offend().await;
    assert_eq!(second.bans.len(), 1, "{second:?}");
    assert_eq!(second.bans[0].offences, 2);
    let d2 = seconds(&second.bans[0]);
    assert!((0.96..=1.44).contains(&d2), "{d2}");
}

async fn same_wrong_password_fifty_times(env: Env) {
    let g = env.guard(config());
    let phone = ip("198.51.100.30");
    let stale = Secret::from("last-years-password");
    for i in 0..50 {
        let o = g.failed(phone, "bob@example.org", &stale, "imap").await;
        assert!(!o.ban_started(), "attempt {i}: {o:?}");
        assert_eq!(o.repeat, i > 0, "attempt {i}");
        assert_eq!(g.check(phone, "bob@example.org").await, Decision::Allow);
    }
    assert!(g.bans().await.is_empty());
    // The stale password counted once: five new wrong ones make six, which trips 5 per 10m.
    for i in 0..4 {
        assert!(!g
            .failed(phone, "bob@example.org", &pw(i), "imap")
            .await
            .ban_started());
    }
    let o = g.failed(phone, "bob@example.org", &pw(4), "imap").await;
    assert!(o.ban_started(), "{o:?}");
    let stats = g.stats();
    assert_eq!(stats.repeats_ignored, 49);
    assert_eq!(stats.failures_counted, 6);
}

async fn one_ip_spraying_30_usernames(env: Env) {
    let g = env.guard(GuardConfig {
        windows: vec![
            window(WindowKey::Ip, 600, 50),
            window(WindowKey::IpAccount, 600, 5),
        ],
        spray_max_users: 10,
        ..config()
    });
    let sprayer = ip("203.0.113.40");
    let mut banned_at = None;
    for i in 0..30 {
        let user = format!("user{i}@example.org");
        if !g.check(sprayer, &user).await.is_allowed() {
            continue;
        }
        let o = g
            .failed(sprayer, &user, &Secret::from("Summer2026!"), "imap")
            .await;
        if o.ban_started() {
            assert_eq!(o.bans[0].key, "ip:203.0.113.40");
            assert!(
                matches!(o.bans[0].reason, BanReason::Spray { max: 10, .. }),
                "{o:?}"
            );
            assert_eq!(o.bans[0].account, None);
            banned_at = Some(i);
        }
    }
    assert_eq!(
        banned_at,
        Some(10),
        "the 11th distinct username starts the ban"
    );
    assert_eq!(
        g.check(sprayer, "someone-else").await,
        denied(DenyReason::AddressBanned)
    );
    assert_eq!(
        g.check(ip("203.0.113.41"), "user0@example.org").await,
        Decision::Allow
    );
    assert_eq!(g.stats().failures_counted, 11);
}

async fn ipv6_attacker_rotating_inside_one_64(env: Env) {
    let g = env.guard(config());
    let addr = |i: usize| ip(&format!("2001:db8:1:2:{:x}:{:x}::1", i * 7919 % 65536, i));
    // One account from ever-new addresses of the /64: one pair.
    for i in 0..6 {
        assert!(g.check(addr(i), "alice").await.is_allowed());
        let o = g.failed(addr(i), "alice", &pw(i), "imap").await;
        assert_eq!(o.ban_started(), i == 5, "failure {i}: {o:?}");
    }
    assert_eq!(
        g.check(addr(100), "alice").await,
        denied(DenyReason::PairBanned)
    );
    // Many accounts from ever-new addresses of the /64: one address.
    for i in 6..11 {
        let o = g.failed(addr(i), &format!("user{i}"), &pw(i), "imap").await;
        assert_eq!(o.ban_started(), i == 10, "failure {i}: {o:?}");
        if i == 10 {
            assert_eq!(o.bans[0].key, "ip:2001:db8:1:2::/64");
        }
    }
    assert_eq!(
        g.check(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), "anyone")
            .await,
        denied(DenyReason::AddressBanned)
    );
    assert_eq!(
        g.check(ip("2001:db8:1:3::1"), "alice").await,
        Decision::Allow
    );
}

async fn nat_with_many_successful_users(env: Env) {
    let g = env.guard(config());
    let office = ip("198.51.100.7");
    for i in 0..20 {
        g.succeeded(office, &format!("staff{i}@example.org")).await;
    }
    // 30 failures by 15 users, two typos each: over the plain address limit (10 per 10m) and
    // spray limit (10 users), within the NAT-tolerant ones (x4).
    for i in 0..30 {
        let user = format!("staff{}@example.org", i % 15);
        assert!(g.check(office, &user).await.is_allowed(), "failure {i}");
        let o = g.failed(office, &user, &pw(i), "imap").await;
        assert!(!o.ban_started(), "failure {i}: {o:?}");
    }
    assert!(g.bans().await.is_empty());
    // The same failures from an address nobody logged in from: banned at the 11th.
    let elsewhere = ip("198.18.0.8");
    let mut banned_at = None;
    for i in 0..30 {
        let user = format!("staff{}@example.org", i % 15);
        if g.failed(elsewhere, &user, &pw(i), "imap")
            .await
            .ban_started()
        {
            banned_at = Some(i);
            break;
        }
    }
    assert_eq!(banned_at, Some(10));
}

async fn rotating_protocols_is_one_attacker(env: Env) {
    let g = env.guard(config());
    let attacker = ip("203.0.113.60");
    let protocols = ["imap", "pop3", "submission"];
    for i in 0..11 {
        let proto = protocols[i % 3];
        let o = g
            .failed(attacker, &format!("victim{i}"), &pw(i), proto)
            .await;
        assert_eq!(o.ban_started(), i == 10, "failure {i} over {proto}: {o:?}");
        if o.ban_started() {
            assert_eq!(o.bans[0].key, "ip:203.0.113.60");
            assert_eq!(o.bans[0].protocol.as_deref(), Some("pop3"));
            assert!(matches!(
                o.bans[0].reason,
                BanReason::Window {
                    kind: WindowKey::Ip,
                    max: 10,
                    ..
                }
            ));
        }
    }
    // The ban is not per protocol: check has no protocol to escape by.
    assert_eq!(
        g.check(attacker, "victim0").await,
        denied(DenyReason::AddressBanned)
    );
}

async fn banned_ip_with_the_right_password(env: Env) {
    let g = env.guard(GuardConfig {
        failure_delay: Duration::from_millis(300),
        failure_jitter: Duration::from_millis(50),
        ..config()
    });
    let attacker = ip("203.0.113.70");
    for i in 0..11 {
        let _ = g.failed(attacker, &format!("u{i}"), &pw(i), "imap").await;
    }
    // The owner's right password comes from the banned address: the guard refuses before the
    // authenticator, so the password is never even looked at, and the caller answers with the
    // same reply after the same delay as for a wrong one.
    for user in ["dave@example.org", "u0", "nobody"] {
        assert_eq!(
            g.check(attacker, user).await,
            denied(DenyReason::AddressBanned)
        );
    }
    for _ in 0..50 {
        let d = g.failure_delay();
        assert!(d >= Duration::from_millis(300) && d <= Duration::from_millis(350));
    }
}

async fn shared_store_stopped_mid_run(mut env: Env) {
    let redis = env.store == Store::Redis;
    let g = env.guard(config());
    let a = ip("203.0.113.80");
    for i in 0..4 {
        assert!(!g.failed(a, "erin", &pw(i), "imap").await.ban_started());
    }
    // With Redis: a ban that only the shared counts justify (half the failures went through
    // another instance) is remembered locally by the instance that started it.
    let c = ip("203.0.113.82");
    if redis {
        let other = env.guard(config());
        for i in 0..5 {
            let _ = other.failed(c, &format!("c{i}"), &pw(i), "imap").await;
        }
        for i in 5..11 {
            let o = g.failed(c, &format!("c{i}"), &pw(i), "imap").await;
            assert_eq!(o.ban_started(), i == 10, "failure {i}: {o:?}");
        }
    }
    env.stop_shared();
    if redis {
        assert_eq!(g.check(c, "c0").await, denied(DenyReason::AddressBanned));
    }
    // The local store was fed all along: the 6th failure still starts the ban on time.
    assert!(!g.failed(a, "erin", &pw(4), "imap").await.ban_started());
    let o = g.failed(a, "erin", &pw(5), "imap").await;
    assert!(o.ban_started(), "{o:?}");
    assert_eq!(g.check(a, "erin").await, denied(DenyReason::PairBanned));
    // A new attacker during the outage meets the local limits, not none.
    let b = ip("203.0.113.81");
    let mut banned_at = None;
    for i in 0..20 {
        if g.failed(b, &format!("x{i}"), &pw(i), "pop3")
            .await
            .ban_started()
        {
            banned_at = Some(i);
            break;
        }
    }
    assert_eq!(banned_at, Some(10));
    assert_eq!(g.check(b, "x0").await, denied(DenyReason::AddressBanned));
    assert_eq!(g.store_healthy(), !redis);
    if redis {
        let s = g.stats();
        assert!(s.store_errors >= 1 && s.fallback_decisions >= 1, "{s:?}");
    }
    assert_eq!(g.bans().await.len(), if redis { 3 } else { 2 });

    env.restart_shared();
    let healthy = within(Duration::from_secs(5), || {
        let g = g.clone();
        async move {
            let _ = g.check(ip("192.0.2.200"), "probe").await;
            g.store_healthy()
        }
    })
    .await;
    assert!(healthy.is_some(), "the guard never saw the store come back");
    // Bans started during the outage are still enforced, and reach the other instances.
    assert_eq!(g.check(b, "x0").await, denied(DenyReason::AddressBanned));
    if redis {
        let other = env.guard(config());
        let seen = within(Duration::from_secs(2), || {
            let other = other.clone();
            async move { !other.check(b, "x0").await.is_allowed() }
        })
        .await;
        assert!(seen.is_some(), "the outage's bans never reached Redis");
        assert_eq!(other.check(a, "erin").await, denied(DenyReason::PairBanned));
    }
}

async fn allow_listed_network_never_banned(env: Env) {
    let g = env.guard(GuardConfig {
        allow: vec!["192.0.2.0/24".into(), "2001:db8:ffff::/48".into()],
        ..config()
    });
    for trusted in [ip("192.0.2.5"), ip("2001:db8:ffff:1::5")] {
        for i in 0..100 {
            let o = g
                .failed(trusted, &format!("u{}", i % 7), &pw(i), "imap")
                .await;
            assert!(!o.counted && !o.ban_started(), "{o:?}");
        }
        assert_eq!(g.check(trusted, "u0").await, Decision::Allow);
    }
    assert!(g.bans().await.is_empty());
    let outside = ip("192.0.3.5");
    let mut banned = false;
    for i in 0..11 {
        banned |= g
            .failed(outside, &format!("u{i}"), &pw(i), "imap")
            .await
            .ban_started();
    }
    assert!(banned);
}

async fn account_attack_spares_known_addresses(env: Env) {
    let g = env.guard(config());
    let home = ip("203.0.113.90");
    g.succeeded(home, "frank@example.org").await;
    // A botnet: one guess from each of 21 networks trips the account window (20 per 10m).
    let mut protected = false;
    for i in 0..21 {
        let bot = ip(&format!("198.18.{i}.1"));
        let o = g.failed(bot, "frank@example.org", &pw(i), "imap").await;
        if o.ban_started() {
            assert_eq!(o.bans[0].key, "account:frank@example.org");
            protected = true;
        }
    }
    assert!(protected);
    assert_eq!(g.check(home, "frank@example.org").await, Decision::Allow);
    assert_eq!(
        g.check(ip("198.18.99.1"), "frank@example.org").await,
        denied(DenyReason::AccountProtected)
    );
    assert_eq!(
        g.check(ip("198.18.99.1"), "grace@example.org").await,
        Decision::Allow
    );
    assert_eq!(g.lift_account("Frank@example.org").await.unwrap(), 1);
    assert_eq!(
        g.check(ip("198.18.99.1"), "frank@example.org").await,
        Decision::Allow
    );
}

async fn bans_api_lists_and_lifts(env: Env) {
    let g = env.guard(config());
    let a = ip("203.0.113.100");
    for i in 0..11 {
        let _ = g.failed(a, &format!("u{i}"), &pw(i), "imap").await;
    }
    let b = ip("203.0.113.101");
    for i in 0..6 {
        let _ = g.failed(b, "henry", &pw(i), "imap").await;
    }
    let keys: Vec<String> = g.bans().await.into_iter().map(|b| b.key).collect();
    assert_eq!(keys, ["ip:203.0.113.100", "ip_account:203.0.113.101 henry"]);
    assert!(g.lift("ip:203.0.113.100").await.unwrap());
    assert!(!g.lift("ip:203.0.113.100").await.unwrap());
    assert_eq!(g.check(a, "u0").await, Decision::Allow);
    // Lifting forgot the counters too: one more failure is not a ban.
    assert!(!g.failed(a, "u99", &pw(99), "imap").await.ban_started());
    assert!(matches!(g.lift("bogus").await, Err(GuardError::BadKey(_))));
    assert_eq!(g.lift_account("henry").await.unwrap(), 1);
    assert_eq!(g.check(b, "henry").await, Decision::Allow);
    assert!(g.bans().await.is_empty());
}

async fn reload_changes_limits(env: Env) {
    let g = env.guard(config());
    let a = ip("203.0.113.110");
    assert!(!g.failed(a, "ivy", &pw(0), "imap").await.ban_started());
    g.reload(&GuardConfig {
        windows: vec![window(WindowKey::IpAccount, 600, 1)],
        ..config()
    })
    .unwrap();
    assert!(g.failed(a, "ivy", &pw(1), "imap").await.ban_started());
    let bad = GuardConfig {
        windows: vec![window(WindowKey::Ip, 600, 0)],
        ..config()
    };
    assert!(g.reload(&bad).is_err());
}

async fn succeeded_login_forgets_the_pairs_failures(env: Env) {
    let g = env.guard(config());
    let a = ip("198.51.100.120");
    // Two rounds: the address window (10 per 10m) still counts every failure.
    for round in 0..2 {
        for i in 0..5 {
            let o = g.failed(a, "judy", &pw(round * 10 + i), "imap").await;
            assert!(!o.ban_started(), "round {round}, failure {i}: {o:?}");
        }
        g.succeeded(a, "judy").await;
    }
}

macro_rules! contract {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Env::new(super::Store::Memory)).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Env::new(super::Store::Redis)).await;
                }
            )*
        }
    };
}

contract!(
    one_ip_guessing_one_account,
    bans_grow_with_each_offence,
    same_wrong_password_fifty_times,
    one_ip_spraying_30_usernames,
    ipv6_attacker_rotating_inside_one_64,
    nat_with_many_successful_users,
    rotating_protocols_is_one_attacker,
    banned_ip_with_the_right_password,
    shared_store_stopped_mid_run,
    allow_listed_network_never_banned,
    account_attack_spares_known_addresses,
    bans_api_lists_and_lifts,
    reload_changes_limits,
    succeeded_login_forgets_the_pairs_failures,
);

/// Only a shared store has a second instance to enforce a ban.
#[tokio::test]
async fn two_instances_sharing_redis() {
    let env = Env::new(Store::Redis);
    let (one, two) = (env.guard(config()), env.guard(config()));
    let a = ip("203.0.113.130");
    for i in 0..6 {
        let _ = one.failed(a, "kim", &pw(i), "imap").await;
    }
    let took = within(Duration::from_secs(1), || {
        let two = two.clone();
        async move { two.check(a, "kim").await == denied(DenyReason::PairBanned) }
    })
    .await;
    assert!(
        took.is_some(),
        "a ban through one instance was not enforced by the other within 1 s"
    );
    // Failures spread over instances add up.
    let b = ip("203.0.113.131");
    for i in 0..10 {
        let g = if i % 2 == 0 { &one } else { &two };
        assert!(!g
            .failed(b, &format!("v{i}"), &pw(i), "imap")
            .await
            .ban_started());
    }
    assert!(two.failed(b, "v10", &pw(10), "pop3").await.ban_started());
    assert_eq!(one.check(b, "v0").await, denied(DenyReason::AddressBanned));
    // The bans API sees and lifts across instances.
    assert_eq!(two.bans().await.len(), 2);
    assert!(two.lift("ip_account:203.0.113.130 kim").await.unwrap());
    assert_eq!(one.check(a, "kim").await, Decision::Allow);
}

/// Redis holds tags, never passwords or usernames in failure lists, and every key but the ban
/// index expires.
#[tokio::test]
async fn redis_keys_hold_no_passwords_and_expire() {
    let env = Env::new(Store::Redis);
    let g = env.guard(config());
    let a = ip("203.0.113.140");
    let secret = "correct-horse-battery-staple";
    for i in 0..11 {
        let _ = g
            .failed(
                a,
                &format!("user{i}"),
                &Secret::from(format!("{secret}{i}").as_str()),
                "imap",
            )
            .await;
    }
    g.succeeded(ip("203.0.113.141"), "user1").await;
    let redis = env.redis.as_ref().expect("redis");
    let keys = redis.cli(&["--scan"]);
    assert!(!keys.trim().is_empty());
    for key in keys.lines() {
        assert!(key.starts_with("portcullis:{guard}:"), "{key}");
        let dump = match redis.cli(&["TYPE", key]).trim() {
            "list" => redis.cli(&["LRANGE", key, "0", "-1"]),
            "hash" => redis.cli(&["HGETALL", key]),
            "zset" => redis.cli(&["ZRANGE", key, "0", "-1"]),
            "string" => redis.cli(&["GET", key]),
            other => panic!("{key}: unexpected type {other}"),
        };
        assert!(
            !dump.contains(secret) && !key.contains(secret),
            "{key}: {dump}"
        );
        let ttl: i64 = redis.cli(&["PTTL", key]).trim().parse().expect("pttl");
        if key.ends_with(":bans") {
            continue;
        }
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
    }
}

/// A Redis that accepts but never answers costs each login at most `redis_timeout`, and only
/// one login per `redis_retry`; the local limits decide meanwhile.
#[tokio::test]
async fn hung_redis_times_out_to_local_limits() {
    let mut env = Env::new(Store::Redis);
    let g = env.guard(GuardConfig {
        redis_timeout: Duration::from_millis(200),
        redis_retry: Duration::from_millis(500),
        ..config()
    });
    let a = ip("203.0.113.150");
    assert!(!g.failed(a, "liam", &pw(0), "imap").await.ban_started());
    let redis = env.redis.as_ref().expect("redis");
    redis.pause();
    env.outage = true;
    let start = Instant::now();
    let mut slow = 0;
    for i in 1..6 {
        let t = Instant::now();
        let o = g.failed(a, "liam", &pw(i), "imap").await;
        assert!(
            t.elapsed() < Duration::from_millis(700),
            "failure {i} took {:?}",
            t.elapsed()
        );
        if t.elapsed() >= Duration::from_millis(150) {
            slow += 1;
        }
        assert_eq!(o.ban_started(), i == 5, "failure {i}: {o:?}");
    }
    assert!(
        slow <= 2,
        "{slow} logins waited for the timeout within {:?}",
        start.elapsed()
    );
    assert_eq!(g.check(a, "liam").await, denied(DenyReason::PairBanned));
    assert!(!g.store_healthy());
    env.redis.as_ref().expect("redis").resume();
    let back = within(Duration::from_secs(5), || {
        let g = g.clone();
        async move {
            let _ = g.check(ip("192.0.2.201"), "probe").await;
            g.store_healthy()
        }
    })
    .await;
    assert!(back.is_some(), "the guard never trusted Redis again");
    // The ban started during the hang was copied to Redis.
    let other = env.guard(config());
    let seen = within(Duration::from_secs(2), || {
        let other = other.clone();
        async move { !other.check(a, "liam").await.is_allowed() }
    })
    .await;
    assert!(seen.is_some());
}
