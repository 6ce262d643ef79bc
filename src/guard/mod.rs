//! The guard: attack detection in front of the authenticator (DESIGN.md §5).
//!
//! The session runner asks [`Guard::check`] before the authenticator, reports a rejected
//! verdict with [`Guard::failed`] and an accepted one with [`Guard::succeeded`], and holds a
//! [`SessionPermit`] from [`Guard::session`] for the life of a spliced session. Temporary
//! failures (authenticator down, backend refused the master login) are never reported: they say
//! nothing about the password. A [`Decision::Deny`] must be answered exactly like a wrong
//! password, after [`Guard::failure_delay`], and not reported as a failure.
//!
//! What is counted, per configured `[[guard.window]]`: failures per address (IPv4 /32, IPv6 /64
//! by default), per wider network (/24, /48), per account, and per (address, account); plus the
//! distinct usernames failing from one address (spraying). The same wrong password again from
//! the same address for the same account counts once (a phone with a stale password): the last
//! few are remembered as truncated HMAC tags, never as passwords. Every protocol feeds the same
//! counters, so rotating between IMAP, POP3 and SMTP gains an attacker nothing.
//!
//! What a tripped window bans:
//! - `ip` window or spraying: the address; `net` window: the network.
//! - `ip_account` window: only that address for that account, so a NAT's other users go on.
//! - `account` window: the account goes into *protection*: for the ban's duration only
//!   addresses from which it logged in successfully within `known_for` may try it. The real
//!   user, at home or at the office, is never locked out by an attacker elsewhere; a user on a
//!   new network waits out the ban like the attacker.
//!
//! Bans grow with each offence (`ban_initial × ban_factor^(n-1)`, ±`ban_jitter`, capped at
//! `ban_max`), the offence count remembered for `ban_decay`. Allow-listed networks are never
//! counted, denied or banned. An address or network from which many distinct accounts logged
//! in recently (NAT, an office) has its address-level limits raised by `nat_factor`.
//!
//! Stores: [`memory::MemoryStore`] in every instance, and with `store = "redis"` also
//! [`redis::RedisStore`], shared by every instance. With Redis the memory store is still fed on
//! every call, so that if Redis stops answering (error or `redis_timeout`) the local limits
//! take over at once with what this instance has seen: never unlimited. Bans started locally
//! during an outage are enforced by this instance until they have been copied to Redis, which
//! happens as soon as it answers again. The transition is logged once each way, and
//! [`Guard::store_healthy`] and [`Guard::stats`] expose it to the metrics layer.

pub mod keys;
pub mod memory;
pub mod policy;
pub mod redis;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hmac::{KeyInit, Mac};
use rand::Rng as _;
use tracing::{info, warn};

use self::redis::{RedisStore, RedisStoreError};
use crate::config::{ConfigError, GuardConfig, GuardStore, WindowKey};
use crate::identity::LogName;
use crate::secret::Secret;
use keys::{normalize_account, AllowList, Shape, Subject, Tagger};
use memory::{epoch_ms, from_epoch_ms, MemoryStore};
use policy::{jitter_multiplier, FailureInput, NewBan, Settings};

pub use policy::BanReason;

/// Why the guard could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("guard.redis_url: {0}")]
    RedisUrl(String),
    #[error("the guard's hash key must be at least 16 bytes")]
    ShortKey,
    #[error("{0:?} is not a ban key (ip:…, net:…, account:…, ip_account:…)")]
    BadKey(String),
    /// The change was made locally but the shared store could not be reached; the ban stays in
    /// force on the other instances until it expires or the call is repeated.
    #[error("the shared store is unreachable: {0}")]
    StoreUnavailable(String),
}

/// The guard's answer before authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Answer as for a wrong password, after the same delay; do not ask the authenticator.
    Deny {
        reason: DenyReason,
    },
}

impl Decision {
    pub fn is_allowed(self) -> bool {
        self == Self::Allow
    }
}

/// Why [`Guard::check`] denied. For logs and metrics only, never for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    AddressBanned,
    NetworkBanned,
    /// This address is banned for this account only.
    PairBanned,
    /// The account is under attack and this address has no recent success for it.
    AccountProtected,
}

impl DenyReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::AddressBanned => "address_banned",
            Self::NetworkBanned => "network_banned",
            Self::PairBanned => "pair_banned",
            Self::AccountProtected => "account_protected",
        }
    }
}

/// What [`Guard::failed`] did with a failure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Whether any counter moved (not for a repeated password or an allow-listed address).
    pub counted: bool,
    /// The same wrong password was among the last few for this (address, account).
    pub repeat: bool,
    /// Bans this failure started.
    pub bans: Vec<BanInfo>,
}

impl Outcome {
    pub fn ban_started(&self) -> bool {
        !self.bans.is_empty()
    }
}

/// A ban in force.
#[derive(Debug, Clone, PartialEq)]
pub struct BanInfo {
    /// What is banned, and the argument of [`Guard::lift`]: `ip:203.0.113.7`,
    /// `net:203.0.113.0/24`, `account:alice@example.org`, `ip_account:203.0.113.7 alice@…`.
    pub key: String,
    pub kind: WindowKey,
    /// The account whose failure started it (not for network or spraying bans).
    pub account: Option<String>,
    pub reason: BanReason,
    /// Offences of this key within `ban_decay`, this one included.
    pub offences: u32,
    pub since: SystemTime,
    pub until: SystemTime,
    /// Protocol of the failure that started it.
    pub protocol: Option<String>,
}

pub(crate) fn ban_info(s: &Subject, ban: &NewBan, protocol: &str, now_ms: u64) -> BanInfo {
    let account = match (ban.kind, &ban.reason) {
        (WindowKey::Net, _) | (_, BanReason::Spray { .. }) => None,
        _ => Some(s.account.clone()),
    };
    BanInfo {
        key: s.key(ban.kind),
        kind: ban.kind,
        account,
        reason: ban.reason.clone(),
        offences: ban.offences,
        since: from_epoch_ms(now_ms),
        until: from_epoch_ms(now_ms.saturating_add(ban.duration_ms)),
        protocol: Some(protocol.to_owned()),
    }
}

/// Counters for the metrics layer (monotonic since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardStats {
    pub checks: u64,
    pub denied: u64,
    pub failures_counted: u64,
    pub repeats_ignored: u64,
    pub bans_started: u64,
    pub sessions_refused: u64,
    /// Redis calls that failed or timed out.
    pub store_errors: u64,
    /// Decisions made by the local store because Redis was unreachable.
    pub fallback_decisions: u64,
}

#[derive(Debug, Default)]
struct Counters {
    checks: AtomicU64,
    denied: AtomicU64,
    failures_counted: AtomicU64,
    repeats_ignored: AtomicU64,
    bans_started: AtomicU64,
    sessions_refused: AtomicU64,
    store_errors: AtomicU64,
    fallback_decisions: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The settings SIGHUP may change.
#[derive(Debug)]
struct Live {
    settings: Settings,
    allow: AllowList,
    shape: Shape,
    account_sessions: u32,
    failure_delay: Duration,
    failure_jitter: Duration,
    redis_retry_ms: u64,
}

impl Live {
    fn new(c: &GuardConfig) -> Result<Self, GuardError> {
        c.validate()?;
        let allow = AllowList::parse(&c.allow).map_err(|(i, m)| ConfigError::Invalid {
            key: format!("guard.allow[{i}]"),
            message: m,
        })?;
        Ok(Self {
            settings: Settings::from_config(c),
            allow,
            shape: Shape::from_config(c),
            account_sessions: c.account_sessions,
            failure_delay: c.failure_delay,
            failure_jitter: c.failure_jitter,
            redis_retry_ms: u64::try_from(c.redis_retry.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// The settings fixed at start (they shape the stores).
#[derive(Debug, PartialEq)]
struct Fixed {
    store: GuardStore,
    redis_url: Option<String>,
    redis_timeout: Duration,
    key_prefix: String,
    memory_max_keys: u64,
}

impl Fixed {
    fn new(c: &GuardConfig) -> Self {
        Self {
            store: c.store,
            redis_url: c.redis_url.clone(),
            redis_timeout: c.redis_timeout,
            key_prefix: c.key_prefix.clone(),
            memory_max_keys: c.memory_max_keys,
        }
    }
}

struct Inner {
    live: ArcSwap<Live>,
    fixed: Fixed,
    tagger: Tagger,
    local: MemoryStore,
    remote: Option<RedisStore>,
    healthy: AtomicBool,
    next_probe_ms: AtomicU64,
    replaying: AtomicBool,
    stats: Counters,
    sessions: Mutex<HashMap<String, u32>>,
}

/// The guard; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Guard(Arc<Inner>);

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("store", &self.0.fixed.store)
            .field("healthy", &self.store_healthy())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    epoch_ms(SystemTime::now())
}

/// The guard's hash key derived from a secret every instance shares (the master secret), so
/// that instances sharing a Redis compute the same password tags, and the tags change when the
/// secret does.
pub fn derive_hash_key(secret: &Secret) -> zeroize::Zeroizing<Vec<u8>> {
    let mac =
        <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.expose()).map(|mut m| {
            m.update(b"portcullis guard tag key v1");
            m.finalize().into_bytes().to_vec()
        });
    // HMAC takes keys of any length, so the error arm is unreachable; an all-zero key would
    // still be a working (if guessable) key rather than a crash.
    zeroize::Zeroizing::new(mac.unwrap_or_else(|_| vec![0; 32]))
}

/// Held for the life of one spliced session; gives the account's slot back on drop.
pub struct SessionPermit {
    inner: Arc<Inner>,
    account: String,
}

impl std::fmt::Debug for SessionPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPermit")
            .field("account", &LogName(self.account.as_bytes()).to_string())
            .finish()
    }
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        let mut map = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.account);
            }
        }
    }
}

impl Guard {
    /// Builds the guard. Connects nothing: with `store = "redis"` the connection is made on first
    /// use, so the proxy starts (on its local limits) while Redis is down.
    ///
    /// `hash_key` keys the password and username tags; instances sharing a Redis must use the
    /// same one (see [`derive_hash_key`]).
    ///
    /// # Errors
    /// An invalid `[guard]` section, an unparsable Redis URL, or a hash key under 16 bytes.
    pub fn new(config: &GuardConfig, hash_key: &[u8]) -> Result<Self, GuardError> {
        if hash_key.len() < 16 {
            return Err(GuardError::ShortKey);
        }
        let live = Live::new(config)?;
        let remote = match (config.store, &config.redis_url) {
            (GuardStore::Redis, Some(url)) => Some(
                RedisStore::new(url, &config.key_prefix, config.redis_timeout)
                    .map_err(|e| GuardError::RedisUrl(e.to_string()))?,
            ),
            _ => None,
        };
        Ok(Self(Arc::new(Inner {
            live: ArcSwap::from_pointee(live),
            fixed: Fixed::new(config),
            tagger: Tagger::new(hash_key),
            local: MemoryStore::new(config.memory_max_keys),
            remote,
            healthy: AtomicBool::new(true),
            next_probe_ms: AtomicU64::new(0),
            replaying: AtomicBool::new(false),
            stats: Counters::default(),
            sessions: Mutex::new(HashMap::new()),
        })))
    }

    /// Applies a reloaded `[guard]` section; connections and counters are kept. `store`,
    /// `redis_url`, `redis_timeout`, `key_prefix` and `memory_max_keys` need a restart: a change
    /// to them is logged and otherwise ignored.
    ///
    /// # Errors
    /// An invalid section; the running settings are then kept.
    pub fn reload(&self, config: &GuardConfig) -> Result<(), GuardError> {
        let live = Live::new(config)?;
        if Fixed::new(config) != self.0.fixed {
            warn!(
                event = "guard_reload",
                "guard.store, redis_url, redis_timeout, key_prefix and memory_max_keys take effect only after a restart"
            );
        }
        self.0.live.store(Arc::new(live));
        Ok(())
    }

    /// The shared store if it should be asked now: always while healthy; while not, one
    /// caller per `redis_retry` probes it and the others go straight to the local store.
    fn remote_now(&self) -> Option<&RedisStore> {
        let remote = self.0.remote.as_ref()?;
        if self.0.healthy.load(Ordering::Acquire) {
            return Some(remote);
        }
        let now = now_ms();
        let next = self.0.next_probe_ms.load(Ordering::Acquire);
        let retry = self.0.live.load().redis_retry_ms;
        (now >= next
            && self
                .0
                .next_probe_ms
                .compare_exchange(
                    next,
                    now.saturating_add(retry),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok())
        .then_some(remote)
    }

    /// Notes the result of a shared-store call, logging each change of health once.
    fn record<T>(&self, result: Result<T, RedisStoreError>) -> Option<T> {
        match result {
            Ok(v) => {
                if !self.0.healthy.swap(true, Ordering::AcqRel) {
                    info!(
                        event = "guard_store",
                        healthy = true,
                        "redis answers again: the guard uses the shared store"
                    );
                    self.replay_local_bans();
                }
                Some(v)
            }
            Err(e) => {
                bump(&self.0.stats.store_errors);
                let retry = self.0.live.load().redis_retry_ms;
                self.0
                    .next_probe_ms
                    .store(now_ms().saturating_add(retry), Ordering::Release);
                if self.0.healthy.swap(false, Ordering::AcqRel) {
                    warn!(event = "guard_store", healthy = false, error = %e, "redis unreachable: the guard enforces this instance's local limits until it answers");
                }
                None
            }
        }
    }

    /// Copies bans started locally during an outage to Redis, in the background.
    fn replay_local_bans(&self) {
        if self.0.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        let guard = self.clone();
        tokio::spawn(async move {
            let now = now_ms();
            for ban in guard.0.local.local_only_bans(now) {
                let Some(remote) = guard.0.remote.as_ref() else {
                    break;
                };
                let result = remote.impose(&ban, now_ms()).await;
                if guard.record(result).is_none() {
                    break;
                }
                guard.0.local.mark_shared(&ban.key, now_ms());
            }
            guard.0.replaying.store(false, Ordering::Release);
        });
    }

    /// Whether `ip` is in `guard.allow` (never counted, denied or banned; DNSBL is skipped too).
    pub fn allowlisted(&self, ip: IpAddr) -> bool {
        self.0.live.load().allow.contains(ip)
    }

    /// Before the authenticator: may this attempt be checked at all?
    ///
    /// Allow-listed addresses are always allowed. Otherwise denied when the address, network or
    /// (address, account) pair is banned, or the account is under protection and this address
    /// has no recent success for it.
    pub async fn check(&self, ip: IpAddr, username: &str) -> Decision {
        bump(&self.0.stats.checks);
        let live = self.0.live.load();
        if live.allow.contains(ip) {
            return Decision::Allow;
        }
        let s = Subject::new(ip, username, live.shape);
        let now = now_ms();
        let deny = if self.0.remote.is_some() {
            let shared = match self.remote_now() {
                Some(remote) => self.record(remote.check(&s).await),
                None => None,
            };
            match shared {
                Some(d) => d.or_else(|| self.0.local.check_local_only(&s, now)),
                None => {
                    bump(&self.0.stats.fallback_decisions);
                    self.0.local.check(&s, now)
                }
            }
        } else {
            self.0.local.check(&s, now)
        };
        match deny {
            None => Decision::Allow,
            Some(reason) => {
                bump(&self.0.stats.denied);
                Decision::Deny { reason }
            }
        }
    }

    /// After the authenticator rejected `password` for `username` (never for a temporary
    /// failure, nor for an attempt [`Guard::check`] denied). `protocol` is recorded with any ban
    /// it starts; it does not separate counters.
    pub async fn failed(
        &self,
        ip: IpAddr,
        username: &str,
        password: &Secret,
        protocol: &str,
    ) -> Outcome {
        let live = self.0.live.load();
        if live.allow.contains(ip) {
            return Outcome::default();
        }
        let s = Subject::new(ip, username, live.shape);
        let password_tag = self.0.tagger.password(&s, password.expose());
        let account_tag = self.0.tagger.account(&s.account);
        let input = FailureInput {
            password_tag: &password_tag,
            account_tag: &account_tag,
        };
        let jitter = jitter_multiplier(live.settings.ban_jitter, rand::rng().random::<f64>());
        let shared = match self.remote_now() {
            Some(remote) => self.record(
                remote
                    .failed(&s, &live.settings, &input, protocol, jitter)
                    .await,
            ),
            None => None,
        };
        let fell_back = self.0.remote.is_some() && shared.is_none();
        let (effects, local_bans) = self.0.local.failed(
            &s,
            &live.settings,
            &input,
            protocol,
            now_ms(),
            jitter,
            fell_back,
        );
        let (repeat, bans) = match shared {
            Some(r) => {
                // Kept locally too, so that this instance still enforces them if Redis goes.
                let now = now_ms();
                for b in &r.bans {
                    self.0.local.impose(b, now, false);
                }
                (r.repeat, r.bans)
            }
            None => {
                if fell_back {
                    bump(&self.0.stats.fallback_decisions);
                }
                (effects.repeat, local_bans)
            }
        };
        if repeat {
            bump(&self.0.stats.repeats_ignored);
        } else {
            bump(&self.0.stats.failures_counted);
        }
        for b in &bans {
            bump(&self.0.stats.bans_started);
            let seconds = b.until.duration_since(b.since).map_or(0, |d| d.as_secs());
            info!(event = "ban", key = %LogName(b.key.as_bytes()), reason = %b.reason, offences = b.offences, seconds, protocol, local_only = fell_back, "ban started");
        }
        Outcome {
            counted: !repeat,
            repeat,
            bans,
        }
    }

    /// After the authenticator accepted `account` (the canonical account, or the username as
    /// given: both are normalised the same way). Feeds the NAT tolerance of the address and
    /// network, keeps the pair known while the account is under protection, and forgets the
    /// pair's failures.
    pub async fn succeeded(&self, ip: IpAddr, account: &str) {
        let live = self.0.live.load();
        if live.allow.contains(ip) {
            return;
        }
        let s = Subject::new(ip, account, live.shape);
        let tag = self.0.tagger.account(&s.account);
        if let Some(remote) = self.remote_now() {
            let result = remote.succeeded(&s, &live.settings, &tag).await;
            self.record(result);
        }
        self.0.local.succeeded(&s, &live.settings, &tag, now_ms());
    }

    /// A slot for one more session of `account` on this instance, or `None` at
    /// `account_sessions`. Counted per instance, not shared through Redis: a session lives on
    /// one instance, and a shared count would leak slots whenever an instance dies.
    pub fn session(&self, account: &str) -> Option<SessionPermit> {
        let max = self.0.live.load().account_sessions;
        let account = normalize_account(account);
        let mut map = self
            .0
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(account.clone()).or_insert(0);
        if *n >= max {
            bump(&self.0.stats.sessions_refused);
            return None;
        }
        *n += 1;
        Some(SessionPermit {
            inner: self.0.clone(),
            account,
        })
    }

    /// The delay before answering any failed or denied login: `failure_delay` plus up to
    /// `failure_jitter`, the same whatever the cause.
    pub fn failure_delay(&self) -> Duration {
        let live = self.0.live.load();
        let jitter = u64::try_from(live.failure_jitter.as_millis()).unwrap_or(0);
        let extra = if jitter == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter)
        };
        live.failure_delay + Duration::from_millis(extra)
    }

    /// Bans in force, sorted by key: the shared store's (plus local ones not yet copied there),
    /// or this instance's while Redis is unreachable.
    pub async fn bans(&self) -> Vec<BanInfo> {
        let now = now_ms();
        if self.0.remote.is_none() {
            return self.0.local.bans(now);
        }
        let shared = match self.remote_now() {
            Some(remote) => self.record(remote.bans().await),
            None => None,
        };
        match shared {
            Some(mut bans) => {
                for b in self.0.local.local_only_bans(now) {
                    if !bans.iter().any(|s| s.key == b.key) {
                        bans.push(b);
                    }
                }
                bans.sort_by(|a, b| a.key.cmp(&b.key));
                bans
            }
            None => self.0.local.bans(now),
        }
    }

    /// The result of an operator's call on the shared store (tried even while it is marked
    /// unreachable: an operator wants to know), noting its health either way.
    fn shared_result<T>(
        &self,
        result: Option<Result<T, RedisStoreError>>,
    ) -> Result<Option<T>, GuardError> {
        match result {
            None => Ok(None),
            Some(Ok(v)) => {
                self.record::<()>(Ok(()));
                Ok(Some(v))
            }
            Some(Err(e)) => {
                let message = e.to_string();
                self.record::<()>(Err(e));
                Err(GuardError::StoreUnavailable(message))
            }
        }
    }

    /// Lifts the ban on `key` (as in [`BanInfo::key`]) everywhere, and forgets its offences and
    /// counters. Returns whether a ban was in force.
    ///
    /// # Errors
    /// [`GuardError::BadKey`]; [`GuardError::StoreUnavailable`] when Redis could not be
    /// reached (the local ban is lifted all the same).
    pub async fn lift(&self, key: &str) -> Result<bool, GuardError> {
        let key = key.trim();
        if keys::parse_key(key).is_none() {
            return Err(GuardError::BadKey(key.to_owned()));
        }
        let local = self.0.local.lift(key, now_ms());
        let shared = match self.0.remote.as_ref() {
            Some(remote) => Some(remote.lift(key).await),
            None => None,
        };
        Ok(self.shared_result(shared)?.unwrap_or(false) || local)
    }

    /// Lifts every ban about `account`: its protection, its (address, account) bans, and address
    /// bans a failure for it started. Returns how many were in force.
    ///
    /// # Errors
    /// [`GuardError::StoreUnavailable`] as for [`Guard::lift`].
    pub async fn lift_account(&self, account: &str) -> Result<usize, GuardError> {
        let account = normalize_account(account);
        let local = self.0.local.lift_account(&account, now_ms());
        let shared = match self.0.remote.as_ref() {
            Some(remote) => Some(remote.lift_account(&account).await),
            None => None,
        };
        Ok(self.shared_result(shared)?.unwrap_or(0).max(local))
    }

    /// False while the shared store is unreachable (always true for `store = "memory"`).
    pub fn store_healthy(&self) -> bool {
        self.0.remote.is_none() || self.0.healthy.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> GuardStats {
        let c = &self.0.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GuardStats {
            checks: get(&c.checks),
            denied: get(&c.denied),
            failures_counted: get(&c.failures_counted),
            repeats_ignored: get(&c.repeats_ignored),
            bans_started: get(&c.bans_started),
            sessions_refused: get(&c.sessions_refused),
            store_errors: get(&c.store_errors),
            fallback_decisions: get(&c.fallback_decisions),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(c: &GuardConfig) -> Guard {
        Guard::new(c, b"0123456789abcdef0123").unwrap()
    }

    #[test]
    fn short_keys_and_bad_configs_are_refused() {
        assert!(matches!(
            Guard::new(&GuardConfig::default(), b"short"),
            Err(GuardError::ShortKey)
        ));
        let c = GuardConfig {
            allow: vec!["10.0.0.0/8".into(), "nonsense".into()],
            ..GuardConfig::default()
        };
        let e = Guard::new(&c, b"0123456789abcdef").unwrap_err().to_string();
        assert!(e.starts_with("guard.allow[1]:"), "{e}");
    }

    #[test]
    fn session_permits_cap_per_account() {
        let c = GuardConfig {
            account_sessions: 2,
            ..GuardConfig::default()
        };
        let g = guard(&c);
        let a = g.session("Alice").unwrap();
        let _b = g.session("alice ").unwrap();
        assert!(g.session("ALICE").is_none());
        assert!(g.session("bob").is_some());
        drop(a);
        assert!(g.session("alice").is_some());
        assert_eq!(g.stats().sessions_refused, 1);
        assert!(g.0.sessions.lock().unwrap().len() <= 1);
    }

    #[tokio::test]
    async fn reload_applies_new_limits() {
        let g = guard(&GuardConfig::default());
        let ip: IpAddr = "203.0.113.4".parse().unwrap();
        let mut c = GuardConfig {
            windows: vec![crate::config::WindowConfig {
                key: WindowKey::IpAccount,
                period: Duration::from_secs(60),
                max: 1,
            }],
            ..GuardConfig::default()
        };
        g.reload(&c).unwrap();
        assert!(!g
            .failed(ip, "alice", &Secret::from("a"), "imap")
            .await
            .ban_started());
        assert!(g
            .failed(ip, "alice", &Secret::from("b"), "imap")
            .await
            .ban_started());
        c.windows[0].max = 0;
        assert!(g.reload(&c).is_err());
    }

    #[test]
    fn failure_delay_stays_in_its_range() {
        let c = GuardConfig {
            failure_delay: Duration::from_millis(100),
            failure_jitter: Duration::from_millis(10),
            ..GuardConfig::default()
        };
        let g = guard(&c);
        for _ in 0..100 {
            let d = g.failure_delay();
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(110));
        }
    }

    #[test]
    fn derived_keys_depend_on_the_secret() {
        let a = derive_hash_key(&Secret::from("one"));
        let b = derive_hash_key(&Secret::from("two"));
        assert_eq!(a.len(), 32);
        assert_ne!(*a, *b);
    }
}
