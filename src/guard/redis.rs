//! The shared store: every instance's counters and bans in one Redis, so that an attacker who
//! spreads attempts over instances is still one attacker and a ban made through one instance is
//! enforced by all (each `check` reads Redis, so at once; the issue asks for within a second).
//!
//! Every decision or update is one Lua script (`*.lua` beside this file), sent as EVALSHA by
//! `redis::Script` (which loads it on NOSCRIPT), so concurrent instances never interleave inside
//! one login's reads and writes. Time inside the scripts is Redis' `TIME`, not each instance's
//! clock.
//!
//! Keys: `<key_prefix>{guard}:<kind>:<entity>`. A failure updates the address, network, account
//! and pair counters in one script, so all of them must live in one cluster slot; the `{guard}`
//! hash tag puts every guard key in the same slot. Sharding the guard over a cluster is thus not
//! possible, and not needed: its data set is small and expires on its own. `bans.lua` and
//! `lift.lua` build ban keys from the index's members rather than receiving them as KEYS, which
//! a standalone or Sentinel Redis allows and the single slot keeps correct.
//!
//! Needs Redis 6.2 or later (`LPOS`; scripts replicated by their effects, so `TIME` may precede
//! writes).
//!
//! The connection is made lazily on first use, so the proxy starts while Redis is down; errors
//! and timeouts are returned to the facade, which falls back to the memory store.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, Value};
use tokio::sync::OnceCell;

use super::keys::Subject;
use super::memory::{epoch_ms, from_epoch_ms};
use super::policy::{kind_index, BanReason, FailureInput, NewBan, Settings, KINDS};
use super::{BanInfo, DenyReason};
use crate::config::WindowKey;

struct Scripts {
    check: Script,
    failed: Script,
    succeeded: Script,
    bans: Script,
    lift: Script,
    impose: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            check: Script::new(include_str!("check.lua")),
            failed: Script::new(include_str!("failed.lua")),
            succeeded: Script::new(include_str!("succeeded.lua")),
            bans: Script::new(include_str!("bans.lua")),
            lift: Script::new(include_str!("lift.lua")),
            impose: Script::new(include_str!("impose.lua")),
        }
    }
}

/// What went wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis answered something unexpected: {0}")]
    Reply(String),
}

type Result<T> = std::result::Result<T, RedisStoreError>;

/// Effects of one failure as Redis decided them.
#[derive(Debug, Clone)]
pub struct RemoteFailure {
    pub repeat: bool,
    pub bans: Vec<BanInfo>,
}

/// The Redis store.
pub struct RedisStore {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    base: String,
    timeout: Duration,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Parses `url`; connects nothing yet.
    ///
    /// # Errors
    /// A URL the redis crate does not accept.
    pub fn new(url: &str, key_prefix: &str, timeout: Duration) -> Result<Self> {
        Ok(Self {
            client: redis::Client::open(url)?,
            conn: OnceCell::new(),
            base: format!("{key_prefix}{{guard}}:"),
            timeout,
            scripts: Scripts::new(),
        })
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.base)
    }

    async fn conn(&self) -> Result<ConnectionManager> {
        let timeout = self.timeout;
        let client = self.client.clone();
        self.conn
            .get_or_try_init(|| async move {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_lazy_with_config(client, config)
            })
            .await
            .cloned()
            .map_err(RedisStoreError::from)
    }

    /// Runs one script invocation under the store's deadline.
    async fn run<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T> {
        let mut conn = self.conn().await?;
        match tokio::time::timeout(self.timeout, inv.invoke_async::<T>(&mut conn)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RedisStoreError::Timeout(self.timeout)),
        }
    }

    /// See [`super::memory::MemoryStore::check`].
    pub async fn check(&self, s: &Subject) -> Result<Option<DenyReason>> {
        let mut inv = self.scripts.check.prepare_invoke();
        inv.key(self.key(&format!("ban:{}", s.key(WindowKey::Ip))))
            .key(self.key(&format!("ban:{}", s.key(WindowKey::Net))))
            .key(self.key(&format!("ban:{}", s.key(WindowKey::IpAccount))))
            .key(self.key(&format!("ban:{}", s.key(WindowKey::Account))))
            .key(self.key(&format!("known:{}", s.pair())));
        let code: i64 = self.run(&inv).await?;
        Ok(match code {
            0 => None,
            1 => Some(DenyReason::AddressBanned),
            2 => Some(DenyReason::NetworkBanned),
            3 => Some(DenyReason::PairBanned),
            4 => Some(DenyReason::AccountProtected),
            other => return Err(RedisStoreError::Reply(format!("check returned {other}"))),
        })
    }

    /// See [`super::memory::MemoryStore::failed`].
    pub async fn failed(
        &self,
        s: &Subject,
        settings: &Settings,
        input: &FailureInput<'_>,
        protocol: &str,
        jitter_mult: f64,
    ) -> Result<RemoteFailure> {
        let pair = s.pair();
        let keys = KINDS.map(|k| s.key(k));
        let mut inv = self.scripts.failed.prepare_invoke();
        inv.key(self.key(&format!("rep:{pair}")));
        for k in &keys {
            inv.key(self.key(&format!("w:{k}")));
        }
        inv.key(self.key(&format!("spray:{}", s.ip)))
            .key(self.key(&format!("nat:ip:{}", s.ip)))
            .key(self.key(&format!("nat:net:{}", s.net)));
        for k in &keys {
            inv.key(self.key(&format!("ban:{k}")));
        }
        for k in &keys {
            inv.key(self.key(&format!("off:{k}")));
        }
        inv.key(self.key("bans"));
        inv.arg(input.password_tag)
            .arg(settings.password_repeat)
            .arg(settings.repeat_ttl_ms())
            .arg(input.account_tag)
            .arg(settings.spray_window_ms)
            .arg(settings.spray_max_users)
            .arg(settings.spray_cap())
            .arg(settings.nat_window_ms)
            .arg(settings.nat_successes)
            .arg(settings.nat_factor.to_string())
            .arg(settings.ban_initial_ms)
            .arg(settings.ban_factor.to_string())
            .arg(settings.ban_max_ms)
            .arg(jitter_mult.to_string())
            .arg(settings.ban_decay_ms)
            .arg(settings.window_ttl_ms())
            .arg(&s.account)
            .arg(protocol);
        for k in &keys {
            inv.arg(k);
        }
        inv.arg(settings.windows.len());
        for w in &settings.windows {
            inv.arg(kind_index(w.kind) + 1).arg(w.period_ms).arg(w.max);
        }
        let reply: Vec<Value> = self.run(&inv).await?;
        parse_failed(&reply, s, protocol)
    }

    /// See [`super::memory::MemoryStore::succeeded`].
    pub async fn succeeded(
        &self,
        s: &Subject,
        settings: &Settings,
        account_tag: &str,
    ) -> Result<()> {
        let pair = s.pair();
        let mut inv = self.scripts.succeeded.prepare_invoke();
        inv.key(self.key(&format!("nat:ip:{}", s.ip)))
            .key(self.key(&format!("nat:net:{}", s.net)))
            .key(self.key(&format!("known:{pair}")))
            .key(self.key(&format!("w:{}", s.key(WindowKey::IpAccount))))
            .key(self.key(&format!("rep:{pair}")))
            .arg(account_tag)
            .arg(settings.nat_window_ms)
            .arg(settings.nat_successes)
            .arg(settings.known_for_ms);
        let _: i64 = self.run(&inv).await?;
        Ok(())
    }

    /// Bans in force, sorted by key.
    pub async fn bans(&self) -> Result<Vec<BanInfo>> {
        let mut inv = self.scripts.bans.prepare_invoke();
        inv.key(self.key("bans")).arg(&self.base);
        let reply: Vec<Value> = self.run(&inv).await?;
        let fields: Vec<String> = reply.iter().skip(1).map(text).collect();
        let mut out: Vec<BanInfo> = fields
            .chunks_exact(7)
            .filter_map(|f| {
                let (kind, _) = super::keys::parse_key(&f[0])?;
                Some(BanInfo {
                    key: f[0].clone(),
                    kind,
                    account: (!f[1].is_empty()).then(|| f[1].clone()),
                    reason: BanReason::decode(&f[2]),
                    offences: f[3].parse().unwrap_or(1),
                    since: from_epoch_ms(f[4].parse().unwrap_or(0)),
                    until: from_epoch_ms(f[5].parse().unwrap_or(0)),
                    protocol: (!f[6].is_empty()).then(|| f[6].clone()),
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Lifts the ban on `key`; returns whether one was in force.
    pub async fn lift(&self, key: &str) -> Result<bool> {
        let mut inv = self.scripts.lift.prepare_invoke();
        inv.key(self.key("bans"))
            .arg(&self.base)
            .arg("key")
            .arg(key);
        let n: i64 = self.run(&inv).await?;
        Ok(n > 0)
    }

    /// Lifts every ban about `account`; returns how many were in force.
    pub async fn lift_account(&self, account: &str) -> Result<usize> {
        let mut inv = self.scripts.lift.prepare_invoke();
        inv.key(self.key("bans"))
            .arg(&self.base)
            .arg("account")
            .arg(account);
        let n: i64 = self.run(&inv).await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Copies a ban decided elsewhere (started locally while Redis was unreachable).
    pub async fn impose(&self, info: &BanInfo, now_ms: u64) -> Result<()> {
        let remaining = epoch_ms(info.until).saturating_sub(now_ms);
        if remaining == 0 {
            return Ok(());
        }
        let mut inv = self.scripts.impose.prepare_invoke();
        inv.key(self.key(&format!("ban:{}", info.key)))
            .key(self.key("bans"))
            .arg(&info.key)
            .arg(info.account.as_deref().unwrap_or(""))
            .arg(info.reason.encode())
            .arg(info.offences)
            .arg(epoch_ms(info.since))
            .arg(remaining)
            .arg(info.protocol.as_deref().unwrap_or(""));
        let _: i64 = self.run(&inv).await?;
        Ok(())
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

fn int(v: Option<&Value>) -> Result<u64> {
    match v {
        Some(Value::Int(i)) => u64::try_from(*i).map_err(|_| RedisStoreError::Reply(i.to_string())),
        other => Err(RedisStoreError::Reply(format!(
            "expected an integer, got {other:?}"
        ))),
    }
}

fn parse_failed(reply: &[Value], s: &Subject, protocol: &str) -> Result<RemoteFailure> {
    let repeat = int(reply.first())? == 1;
    // One ban per kind at most, each four values: a longer claim is not a reply of our script
    // (and is never used to size anything).
    let count = int(reply.get(1))?;
    if count > KINDS.len() as u64 || reply.len() < 3 + 4 * count as usize {
        return Err(RedisStoreError::Reply(format!(
            "{count} bans in a reply of {} values",
            reply.len()
        )));
    }
    let count = count as usize;
    let now = int(reply.get(2))?;
    let mut bans = Vec::new();
    for i in 0..count {
        let at = 3 + i * 4;
        let k = int(reply.get(at))? as usize;
        let kind = *k
            .checked_sub(1)
            .and_then(|i| KINDS.get(i))
            .ok_or_else(|| RedisStoreError::Reply(format!("kind {k}")))?;
        let reason = BanReason::decode(&reply.get(at + 3).map(text).unwrap_or_default());
        let ban = NewBan {
            kind,
            offences: u32::try_from(int(reply.get(at + 1))?).unwrap_or(u32::MAX),
            duration_ms: int(reply.get(at + 2))?,
            reason,
        };
        bans.push(super::ban_info(s, &ban, protocol, now));
    }
    Ok(RemoteFailure { repeat, bans })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject {
        Subject {
            ip: "203.0.113.7".into(),
            net: "203.0.113.0/24".into(),
            account: "alice".into(),
        }
    }

    /// A reply claiming more bans than there are kinds, or more than it holds, is refused
    /// before anything is sized by it (a huge count would abort the process).
    #[test]
    fn a_failed_reply_with_an_impossible_count_is_refused() {
        let s = subject();
        for count in [i64::MAX, 1 << 40, KINDS.len() as i64 + 1, 1] {
            let reply = [Value::Int(0), Value::Int(count), Value::Int(1_000)];
            assert!(
                parse_failed(&reply, &s, "imap").is_err(),
                "count {count} accepted"
            );
        }
        let none = [Value::Int(1), Value::Int(0), Value::Int(1_000)];
        let parsed = parse_failed(&none, &s, "imap").unwrap();
        assert!(parsed.repeat && parsed.bans.is_empty());
    }
}
