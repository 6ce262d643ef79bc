//! The in-process store: the default for one instance, and the local fallback that a Redis
//! deployment keeps fed all the time so that losing Redis never means losing limits.
//!
//! Bounded: two moka caches with a capacity each and a per-entry expiry (the entry's own TTL),
//! LRU eviction so that new counters are always admitted. Bans live in their own cache, so a
//! flood of counter keys (an attacker rotating addresses) can evict old counters but never a ban.
//! Expiry is also checked against the caller's clock on every read, so the logic is exact even
//! between moka's housekeeping passes.
//!
//! Updates run under one mutex: a failure touches several keys (address, network, account,
//! pair) and must see and write them as one step, like the Redis script does. Each update is a
//! few microseconds, so the lock is never held for long; `check` reads without it.

use std::sync::Mutex;
use std::time::{Duration, Instant, UNIX_EPOCH};

use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use moka::Expiry;

use super::keys::{key_account, parse_key, Subject};
use super::policy::{
    self, kind_index, recent_count, recent_insert, Buckets, FailureEffects, FailureInput,
    FailureState, Recent, Settings, KINDS,
};
use super::{BanInfo, DenyReason};
use crate::config::WindowKey;

#[derive(Debug, Clone)]
enum Value {
    Buckets(Buckets),
    Tags(Vec<String>),
    Recent(Recent),
    Known,
    Offences(u32),
    Ban(BanRecord),
}

/// A ban as the memory store keeps it.
#[derive(Debug, Clone)]
struct BanRecord {
    info: BanInfo,
    /// Started here while Redis was unreachable: enforced even when Redis answers again, until
    /// it has been copied there.
    local_only: bool,
}

#[derive(Debug, Clone)]
struct Item {
    value: Value,
    /// Logical expiry on the caller's clock (ms since the epoch).
    until_ms: u64,
    /// The same expiry as a duration from the write, for moka's housekeeping.
    ttl: Duration,
}

struct ByItemTtl;

impl Expiry<String, Item> for ByItemTtl {
    fn expire_after_create(&self, _key: &String, value: &Item, _at: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Item,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

fn cache(capacity: u64) -> Cache<String, Item> {
    Cache::builder()
        .max_capacity(capacity)
        .eviction_policy(EvictionPolicy::lru())
        .expire_after(ByItemTtl)
        .build()
}

/// The memory store.
pub struct MemoryStore {
    counters: Cache<String, Item>,
    bans: Cache<String, Item>,
    update: Mutex<()>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("counters", &self.counters.entry_count())
            .field("bans", &self.bans.entry_count())
            .finish()
    }
}

/// Milliseconds since the epoch of a `SystemTime` (0 before it).
pub(crate) fn epoch_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn from_epoch_ms(ms: u64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Whether inserting `tag` into `set` now can wait: the set already counts `cap` accounts (or
/// `tag` itself), each seen within the last `slack`.
fn recent_is_fresh(set: &Recent, tag: &str, now_ms: u64, slack_ms: u64, cap: usize) -> bool {
    let recent = now_ms.saturating_sub(slack_ms);
    if set.iter().any(|(at, t)| t == tag && *at > recent) {
        return true;
    }
    set.len() >= cap && set.iter().all(|(at, _)| *at > recent)
}

impl MemoryStore {
    /// A store holding at most `max_keys` counter entries and a tenth of that (at least 1000)
    /// bans and offence records.
    pub fn new(max_keys: u64) -> Self {
        Self {
            counters: cache(max_keys),
            bans: cache((max_keys / 10).max(1000)),
            update: Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data lives in the caches, not in the mutex; a panic elsewhere while
        // holding it leaves nothing half-written that matters more than a lost count.
        self.update
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(cache: &Cache<String, Item>, key: &str, now_ms: u64) -> Option<Value> {
        cache
            .get(key)
            .filter(|item| item.until_ms > now_ms)
            .map(|item| item.value)
    }

    fn put(cache: &Cache<String, Item>, key: String, value: Value, now_ms: u64, ttl_ms: u64) {
        let ttl_ms = ttl_ms.max(1);
        cache.insert(
            key,
            Item {
                value,
                until_ms: now_ms.saturating_add(ttl_ms),
                ttl: Duration::from_millis(ttl_ms),
            },
        );
    }

    fn ban(&self, key: &str, now_ms: u64) -> Option<BanRecord> {
        match Self::get(&self.bans, &format!("ban:{key}"), now_ms)? {
            Value::Ban(b) => Some(b),
            _ => None,
        }
    }

    fn known(&self, pair: &str, now_ms: u64) -> bool {
        matches!(
            Self::get(&self.counters, &format!("known:{pair}"), now_ms),
            Some(Value::Known)
        )
    }

    fn deny(&self, s: &Subject, now_ms: u64, only_local: bool) -> Option<DenyReason> {
        let banned = |kind| {
            self.ban(&s.key(kind), now_ms)
                .is_some_and(|b| b.local_only || !only_local)
        };
        if banned(WindowKey::Ip) {
            Some(DenyReason::AddressBanned)
        } else if banned(WindowKey::Net) {
            Some(DenyReason::NetworkBanned)
        } else if banned(WindowKey::IpAccount) {
            Some(DenyReason::PairBanned)
        } else if banned(WindowKey::Account) && !self.known(&s.pair(), now_ms) {
            Some(DenyReason::AccountProtected)
        } else {
            None
        }
    }

    /// Whether `s` may try to authenticate: not if its address, network or pair is banned, nor
    /// if its account is under attack and this address has not logged in to it recently.
    pub fn check(&self, s: &Subject, now_ms: u64) -> Option<DenyReason> {
        self.deny(s, now_ms, false)
    }

    /// Like [`MemoryStore::check`] but only with bans started here while Redis was unreachable.
    pub fn check_local_only(&self, s: &Subject, now_ms: u64) -> Option<DenyReason> {
        self.deny(s, now_ms, true)
    }

    fn load_buckets(&self, key: &str, now_ms: u64) -> Buckets {
        match Self::get(&self.counters, key, now_ms) {
            Some(Value::Buckets(b)) => b,
            _ => Vec::new(),
        }
    }

    fn load_recent(&self, key: &str, now_ms: u64) -> Recent {
        match Self::get(&self.counters, key, now_ms) {
            Some(Value::Recent(r)) => r,
            _ => Vec::new(),
        }
    }

    /// Counts one rejected login and starts the bans it calls for (see [`policy::on_failure`]).
    /// `local_only` marks those bans as started while Redis was unreachable.
    #[allow(clippy::too_many_arguments)]
    pub fn failed(
        &self,
        s: &Subject,
        settings: &Settings,
        input: &FailureInput<'_>,
        protocol: &str,
        now_ms: u64,
        jitter_mult: f64,
        local_only: bool,
    ) -> (FailureEffects, Vec<BanInfo>) {
        let _lock = self.lock();
        let pair = s.pair();
        let keys: [String; 4] = KINDS.map(|k| s.key(k));
        let mut state = FailureState {
            repeat: match Self::get(&self.counters, &format!("rep:{pair}"), now_ms) {
                Some(Value::Tags(t)) => t,
                _ => Vec::new(),
            },
            buckets: keys
                .clone()
                .map(|k| self.load_buckets(&format!("w:{k}"), now_ms)),
            spray: self.load_recent(&format!("spray:{}", s.ip), now_ms),
            nat_ip: recent_count(
                &self.load_recent(&format!("nat:ip:{}", s.ip), now_ms),
                now_ms,
                settings.nat_window_ms,
            ),
            nat_net: recent_count(
                &self.load_recent(&format!("nat:net:{}", s.net), now_ms),
                now_ms,
                settings.nat_window_ms,
            ),
            banned: keys.clone().map(|k| self.ban(&k, now_ms).is_some()),
            offences: keys.clone().map(|k| {
                match Self::get(&self.bans, &format!("off:{k}"), now_ms) {
                    Some(Value::Offences(n)) => n,
                    _ => 0,
                }
            }),
        };
        let effects = policy::on_failure(&mut state, settings, input, now_ms, jitter_mult);
        if effects.repeat {
            // Touch the ring so a stale phone keeps being recognised.
            Self::put(
                &self.counters,
                format!("rep:{pair}"),
                Value::Tags(state.repeat),
                now_ms,
                settings.repeat_ttl_ms(),
            );
            return (effects, Vec::new());
        }
        if settings.password_repeat > 0 {
            Self::put(
                &self.counters,
                format!("rep:{pair}"),
                Value::Tags(state.repeat),
                now_ms,
                settings.repeat_ttl_ms(),
            );
        }
        let window_ttl = settings.window_ttl_ms();
        for (key, buckets) in keys.iter().zip(state.buckets) {
            let wkey = format!("w:{key}");
            if buckets.is_empty() {
                self.counters.invalidate(&wkey);
            } else {
                Self::put(
                    &self.counters,
                    wkey,
                    Value::Buckets(buckets),
                    now_ms,
                    window_ttl,
                );
            }
        }
        let spray_key = format!("spray:{}", s.ip);
        if state.spray.is_empty() {
            self.counters.invalidate(&spray_key);
        } else {
            Self::put(
                &self.counters,
                spray_key,
                Value::Recent(state.spray),
                now_ms,
                settings.spray_window_ms,
            );
        }
        let mut started = Vec::new();
        for ban in &effects.bans {
            let key = &keys[kind_index(ban.kind)];
            let info = super::ban_info(s, ban, protocol, now_ms);
            Self::put(
                &self.bans,
                format!("off:{key}"),
                Value::Offences(ban.offences),
                now_ms,
                settings.ban_decay_ms.max(ban.duration_ms),
            );
            Self::put(
                &self.bans,
                format!("ban:{key}"),
                Value::Ban(BanRecord {
                    info: info.clone(),
                    local_only,
                }),
                now_ms,
                ban.duration_ms,
            );
            started.push(info);
        }
        (effects, started)
    }

    /// Records an accepted login: feeds the NAT tolerance of its address and network, marks the
    /// pair known (it may still log in while its account is under attack), and forgets the
    /// pair's failures and remembered wrong passwords — the user got it right.
    pub fn succeeded(&self, s: &Subject, settings: &Settings, account_tag: &str, now_ms: u64) {
        let _lock = self.lock();
        let cap = settings.nat_successes as usize;
        // Rewriting an entry is the expensive part of a login here; an entry that would come out
        // the same for the next `slack` is left alone (a login every second from a busy office
        // then writes about once a minute). Entries may so expire up to `slack` early.
        let slack = settings.nat_window_ms / 60;
        for key in [format!("nat:ip:{}", s.ip), format!("nat:net:{}", s.net)] {
            let mut set = self.load_recent(&key, now_ms);
            if recent_is_fresh(&set, account_tag, now_ms, slack, cap) {
                continue;
            }
            recent_insert(&mut set, account_tag, now_ms, settings.nat_window_ms, cap);
            Self::put(
                &self.counters,
                key,
                Value::Recent(set),
                now_ms,
                settings.nat_window_ms,
            );
        }
        let pair = s.pair();
        let known = format!("known:{pair}");
        let refreshed_lately = self.counters.get(&known).is_some_and(|item| {
            matches!(item.value, Value::Known)
                && item.until_ms
                    > now_ms.saturating_add(settings.known_for_ms - settings.known_for_ms / 100)
        });
        if !refreshed_lately {
            Self::put(
                &self.counters,
                known,
                Value::Known,
                now_ms,
                settings.known_for_ms,
            );
        }
        self.counters
            .invalidate(&format!("w:{}", s.key(WindowKey::IpAccount)));
        self.counters.invalidate(&format!("rep:{pair}"));
    }

    fn all_bans(&self, now_ms: u64) -> Vec<BanRecord> {
        let mut out: Vec<BanRecord> = self
            .bans
            .iter()
            .filter(|(k, item)| k.starts_with("ban:") && item.until_ms > now_ms)
            .filter_map(|(_, item)| match item.value {
                Value::Ban(b) => Some(b),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.info.key.cmp(&b.info.key));
        out
    }

    /// Bans in force, sorted by key.
    pub fn bans(&self, now_ms: u64) -> Vec<BanInfo> {
        self.all_bans(now_ms).into_iter().map(|b| b.info).collect()
    }

    /// Bans started here while Redis was unreachable and not yet copied there.
    pub fn local_only_bans(&self, now_ms: u64) -> Vec<BanInfo> {
        self.all_bans(now_ms)
            .into_iter()
            .filter(|b| b.local_only)
            .map(|b| b.info)
            .collect()
    }

    /// Marks a local-only ban as copied to Redis.
    pub fn mark_shared(&self, key: &str, now_ms: u64) {
        let _lock = self.lock();
        let bkey = format!("ban:{key}");
        if let Some(item) = self.bans.get(&bkey).filter(|i| i.until_ms > now_ms) {
            if let Value::Ban(mut b) = item.value {
                b.local_only = false;
                Self::put(
                    &self.bans,
                    bkey,
                    Value::Ban(b),
                    now_ms,
                    item.until_ms - now_ms,
                );
            }
        }
    }

    /// Enforces a ban decided elsewhere (replayed from Redis, or set through the API).
    pub fn impose(&self, info: &BanInfo, now_ms: u64, local_only: bool) {
        let until = epoch_ms(info.until);
        if until <= now_ms || parse_key(&info.key).is_none() {
            return;
        }
        let _lock = self.lock();
        let bkey = format!("ban:{}", info.key);
        let longer = self
            .ban(&info.key, now_ms)
            .is_none_or(|b| epoch_ms(b.info.until) < until);
        if longer {
            Self::put(
                &self.bans,
                bkey,
                Value::Ban(BanRecord {
                    info: info.clone(),
                    local_only,
                }),
                now_ms,
                until - now_ms,
            );
        }
    }

    fn lift_locked(&self, key: &str, now_ms: u64) -> bool {
        let bkey = format!("ban:{key}");
        let existed = self.ban(key, now_ms).is_some();
        self.bans.invalidate(&bkey);
        self.bans.invalidate(&format!("off:{key}"));
        self.counters.invalidate(&format!("w:{key}"));
        if let Some((WindowKey::Ip, ip)) = parse_key(key) {
            self.counters.invalidate(&format!("spray:{ip}"));
        }
        existed
    }

    /// Lifts the ban on `key` and forgets its offences and counters (an operator's "this was a
    /// mistake"). Returns whether a ban was in force.
    pub fn lift(&self, key: &str, now_ms: u64) -> bool {
        let _lock = self.lock();
        self.lift_locked(key, now_ms)
    }

    /// Lifts every ban about `account`: its protection, its pairs, and address bans that a
    /// failure for this account started. Returns how many were in force.
    pub fn lift_account(&self, account: &str, now_ms: u64) -> usize {
        let _lock = self.lock();
        let mut lifted = 0;
        for b in self.all_bans(now_ms) {
            let about = key_account(&b.info.key) == Some(account)
                || b.info.account.as_deref() == Some(account);
            if about && self.lift_locked(&b.info.key, now_ms) {
                lifted += 1;
            }
        }
        // Offences and counters of the account and its pairs without a ban in force.
        self.lift_locked(&format!("account:{account}"), now_ms);
        lifted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GuardConfig;
    use crate::guard::keys::Shape;

    const T0: u64 = 1_800_000_000_000;

    fn subject(ip: &str, user: &str) -> Subject {
        Subject::new(
            ip.parse().unwrap(),
            user,
            Shape {
                ipv4: 32,
                ipv6: 64,
                net4: 24,
                net6: 48,
            },
        )
    }

    fn fail(m: &MemoryStore, s: &Subject, pw: &str, now: u64) -> Vec<BanInfo> {
        fail_with(
            m,
            &Settings::from_config(&GuardConfig::default()),
            s,
            pw,
            now,
        )
    }

    fn fail_with(
        m: &MemoryStore,
        settings: &Settings,
        s: &Subject,
        pw: &str,
        now: u64,
    ) -> Vec<BanInfo> {
        let input = FailureInput {
            password_tag: pw,
            account_tag: &s.account,
        };
        m.failed(s, settings, &input, "imap", now, 1.0, false).1
    }

    #[test]
    fn pair_ban_expires_and_grows() {
        let m = MemoryStore::new(10_000);
        let mut settings = Settings::from_config(&GuardConfig::default());
        settings.windows.retain(|w| w.kind == WindowKey::IpAccount);
        let s = subject("203.0.113.9", "alice");
        for i in 0..5 {
            assert!(fail_with(&m, &settings, &s, &format!("p{i}"), T0).is_empty());
        }
        let bans = fail_with(&m, &settings, &s, "p5", T0);
        assert_eq!(bans.len(), 1);
        assert_eq!(bans[0].key, "ip_account:203.0.113.9 alice");
        assert_eq!(bans[0].offences, 1);
        assert_eq!(m.check(&s, T0), Some(DenyReason::PairBanned));
        assert_eq!(m.check(&subject("203.0.113.9", "bob"), T0), None);
        let after = T0 + 300_001;
        assert_eq!(m.check(&s, after), None);
        for i in 6..11 {
            assert!(fail_with(&m, &settings, &s, &format!("p{i}"), after).is_empty());
        }
        let bans = fail_with(&m, &settings, &s, "p11", after);
        assert_eq!(bans.len(), 1);
        assert_eq!(bans[0].offences, 2);
        assert_eq!(
            epoch_ms(bans[0].until) - epoch_ms(bans[0].since),
            600_000,
            "the second offence doubles"
        );
    }

    #[test]
    fn address_window_counts_every_account() {
        let m = MemoryStore::new(10_000);
        for i in 0..10 {
            let s = subject("203.0.113.9", &format!("user{}", i % 3));
            assert!(fail(&m, &s, &format!("p{i}"), T0).is_empty());
        }
        let bans = fail(&m, &subject("203.0.113.9", "user0"), "p10", T0);
        assert_eq!(bans.len(), 1);
        assert_eq!(bans[0].kind, WindowKey::Ip);
        assert_eq!(
            m.check(&subject("203.0.113.9", "anyone"), T0),
            Some(DenyReason::AddressBanned)
        );
    }

    #[test]
    fn account_protection_spares_known_addresses() {
        let m = MemoryStore::new(10_000);
        let settings = Settings::from_config(&GuardConfig::default());
        let home = subject("198.51.100.20", "alice");
        m.succeeded(&home, &settings, "tag", T0);
        for i in 0..21u32 {
            let s = subject(&format!("192.0.{}.{}", i / 200, i % 200 + 1), "alice");
            let _ = fail(&m, &s, &format!("p{i}"), T0);
        }
        assert_eq!(m.check(&home, T0), None);
        assert_eq!(
            m.check(&subject("203.0.113.1", "alice"), T0),
            Some(DenyReason::AccountProtected)
        );
        assert_eq!(m.lift_account("alice", T0), 1);
        assert_eq!(m.check(&subject("203.0.113.1", "alice"), T0), None);
    }

    #[test]
    fn bounded_by_capacity() {
        let m = MemoryStore::new(1_000);
        for i in 0..20_000u32 {
            let s = subject(&std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string(), "u");
            let _ = fail(&m, &s, "p", T0);
        }
        m.counters.run_pending_tasks();
        assert!(
            m.counters.entry_count() <= 1_000,
            "{}",
            m.counters.entry_count()
        );
    }
}
