//! The guard's decisions as pure functions over plain state: no I/O, no clock (time is an
//! argument, in milliseconds since the Unix epoch), no randomness (jitter is an argument).
//!
//! The memory store loads the entries of one login attempt, calls [`on_failure`], and writes
//! them back. The Redis store runs the same rules inside `failed.lua`; the contract tests in
//! `tests/guard.rs` hold the two to the same behaviour. Change one, change the other.
//!
//! Windows are two-bucket sliding counters: the count of the current fixed bucket plus the
//! previous bucket's count weighted by how much of it still lies inside the window. That is
//! three integers per window and key (a log of timestamps would be up to `max` of them), and
//! it is the standard approximation (error bounded by one bucket's share of the previous count).

use std::time::Duration;

use crate::config::{GuardConfig, WindowKey};

/// Every window key kind, in the order used by arrays indexed with [`kind_index`].
pub const KINDS: [WindowKey; 4] = [
    WindowKey::Ip,
    WindowKey::Net,
    WindowKey::Account,
    WindowKey::IpAccount,
];

/// Position of `kind` in [`KINDS`] (also its number in the Lua scripts, minus one).
pub fn kind_index(kind: WindowKey) -> usize {
    match kind {
        WindowKey::Ip => 0,
        WindowKey::Net => 1,
        WindowKey::Account => 2,
        WindowKey::IpAccount => 3,
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One configured window, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub kind: WindowKey,
    pub period_ms: u64,
    pub max: u32,
}

/// The decision settings, derived from `[guard]` and swapped whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub windows: Vec<Window>,
    pub password_repeat: usize,
    pub spray_window_ms: u64,
    pub spray_max_users: u32,
    pub ban_initial_ms: u64,
    pub ban_factor: f64,
    pub ban_max_ms: u64,
    pub ban_jitter: f64,
    pub ban_decay_ms: u64,
    pub nat_window_ms: u64,
    pub nat_successes: u32,
    pub nat_factor: f64,
    pub known_for_ms: u64,
}

impl Settings {
    pub fn from_config(c: &GuardConfig) -> Self {
        Self {
            windows: c
                .windows
                .iter()
                .map(|w| Window {
                    kind: w.key,
                    period_ms: ms(w.period).max(1),
                    max: w.max,
                })
                .collect(),
            password_repeat: c.password_repeat,
            spray_window_ms: ms(c.spray_window).max(1),
            spray_max_users: c.spray_max_users,
            ban_initial_ms: ms(c.ban_initial).max(1),
            ban_factor: c.ban_factor,
            ban_max_ms: ms(c.ban_max).max(1),
            ban_jitter: c.ban_jitter,
            ban_decay_ms: ms(c.ban_decay).max(1),
            nat_window_ms: ms(c.nat_window).max(1),
            nat_successes: c.nat_successes,
            nat_factor: c.nat_factor,
            known_for_ms: ms(c.known_for).max(1),
        }
    }

    /// How long window counters of any kind must live: two of the longest period, since the
    /// previous bucket still weighs in.
    pub fn window_ttl_ms(&self) -> u64 {
        self.windows
            .iter()
            .map(|w| w.period_ms)
            .max()
            .unwrap_or(1)
            .saturating_mul(2)
    }

    /// How long remembered wrong-password tags live: as long as the longest window can
    /// still count the failure they stand for.
    pub fn repeat_ttl_ms(&self) -> u64 {
        self.windows.iter().map(|w| w.period_ms).max().unwrap_or(1)
    }

    /// Most distinct usernames a spray set needs to hold to see its limit exceeded.
    pub fn spray_cap(&self) -> usize {
        limit(self.spray_max_users, self.nat_factor) as usize + 1
    }

    /// The factor an address or network with `successes` distinct recent accounts gets.
    pub fn nat_multiplier(&self, successes: usize) -> f64 {
        if successes >= self.nat_successes as usize {
            self.nat_factor
        } else {
            1.0
        }
    }
}

/// `max` scaled by a tolerance factor: the count a window may reach without tripping.
pub fn limit(max: u32, factor: f64) -> f64 {
    (f64::from(max) * factor).floor()
}

/// A two-bucket sliding counter for one window of one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Index of the current bucket: `now / period`.
    pub idx: u64,
    pub cur: u32,
    pub prev: u32,
}

impl Bucket {
    /// Moves the buckets forward to `now`.
    fn roll(&mut self, now_ms: u64, period_ms: u64) {
        let idx = now_ms / period_ms;
        if self.cur == 0 && self.prev == 0 {
            self.idx = idx;
        } else if idx == self.idx + 1 {
            self.prev = self.cur;
            self.cur = 0;
            self.idx = idx;
        } else if idx > self.idx + 1 {
            self.prev = 0;
            self.cur = 0;
            self.idx = idx;
        }
        // idx <= self.idx: the clock stepped back; count into the bucket we have.
    }

    /// Counts one failure at `now` and returns the window's estimate afterwards.
    pub fn add(&mut self, now_ms: u64, period_ms: u64) -> f64 {
        self.roll(now_ms, period_ms);
        self.cur = self.cur.saturating_add(1);
        self.estimate(now_ms, period_ms)
    }

    /// Failures within the last `period` at `now`, estimated.
    pub fn estimate(&self, now_ms: u64, period_ms: u64) -> f64 {
        let mut b = *self;
        b.roll(now_ms, period_ms);
        let into = (now_ms % period_ms) as f64 / period_ms as f64;
        let weight = if b.idx == now_ms / period_ms {
            1.0 - into
        } else {
            // Clock stepped back: the previous bucket counts whole.
            1.0
        };
        f64::from(b.prev) * weight + f64::from(b.cur)
    }
}

/// The buckets of one key entity, one per window period (windows of the same kind and period
/// share one counter).
pub type Buckets = Vec<(u64, Bucket)>;

fn bucket_for(buckets: &mut Buckets, period_ms: u64) -> &mut Bucket {
    let pos = match buckets.iter().position(|(p, _)| *p == period_ms) {
        Some(pos) => pos,
        None => {
            buckets.push((period_ms, Bucket::default()));
            buckets.len() - 1
        }
    };
    &mut buckets[pos].1
}

/// A set of tags seen recently (distinct failed usernames; distinct successful accounts),
/// each with the time it was last seen, bounded to `cap` newest entries.
pub type Recent = Vec<(u64, String)>;

/// Adds `tag` at `now`, forgets entries older than `window`, keeps the `cap` newest, and returns
/// how many distinct tags remain. Ties in age break by tag, as in a Redis sorted set.
pub fn recent_insert(
    set: &mut Recent,
    tag: &str,
    now_ms: u64,
    window_ms: u64,
    cap: usize,
) -> usize {
    let horizon = now_ms.saturating_sub(window_ms);
    set.retain(|(at, t)| *at > horizon && t != tag);
    set.push((now_ms, tag.to_owned()));
    set.sort();
    if set.len() > cap {
        let excess = set.len() - cap;
        set.drain(..excess);
    }
    set.len()
}

/// How many tags of `set` are still inside `window` at `now`.
pub fn recent_count(set: &Recent, now_ms: u64, window_ms: u64) -> usize {
    let horizon = now_ms.saturating_sub(window_ms);
    set.iter().filter(|(at, _)| *at > horizon).count()
}

/// The multiplier spreading a ban's duration by ±`jitter`, from a uniform sample `u` in [0, 1).
pub fn jitter_multiplier(jitter: f64, u: f64) -> f64 {
    1.0 + jitter * (2.0 * u.clamp(0.0, 1.0) - 1.0)
}

/// Duration of the `offences`-th ban (1 for the first): `initial × factor^(offences-1)`,
/// capped at `max`, times the jitter multiplier, capped at `max` again, at least 1 ms.
pub fn ban_duration_ms(settings: &Settings, offences: u32, jitter_mult: f64) -> u64 {
    let max = settings.ban_max_ms as f64;
    let exp = f64::from(offences.max(1) - 1);
    let base = (settings.ban_initial_ms as f64 * settings.ban_factor.powf(exp)).min(max);
    let d = (base * jitter_mult).min(max).floor();
    if d.is_finite() && d >= 1.0 {
        d as u64
    } else {
        1
    }
}

/// Why a ban started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BanReason {
    /// A failure window of this key kind exceeded its limit.
    Window {
        kind: WindowKey,
        period_ms: u64,
        max: u32,
    },
    /// Too many distinct failed usernames from one address.
    Spray { window_ms: u64, max: u32 },
    /// Set through the API or replayed from another store without a known cause.
    Imposed,
}

impl BanReason {
    /// The compact form both stores keep (`window:ip:600000:10`, `spray:600000:10`).
    pub fn encode(&self) -> String {
        match self {
            Self::Window {
                kind,
                period_ms,
                max,
            } => format!("window:{}:{period_ms}:{max}", kind.label()),
            Self::Spray { window_ms, max } => format!("spray:{window_ms}:{max}"),
            Self::Imposed => "imposed".into(),
        }
    }

    /// Reads [`BanReason::encode`]'s form; anything else is [`BanReason::Imposed`].
    pub fn decode(text: &str) -> Self {
        let parts: Vec<&str> = text.split(':').collect();
        let kind = |s: &str| KINDS.iter().copied().find(|k| k.label() == s);
        match parts.as_slice() {
            ["window", k, p, m] => match (kind(k), p.parse(), m.parse()) {
                (Some(kind), Ok(period_ms), Ok(max)) => Self::Window {
                    kind,
                    period_ms,
                    max,
                },
                _ => Self::Imposed,
            },
            ["spray", w, m] => match (w.parse(), m.parse()) {
                (Ok(window_ms), Ok(max)) => Self::Spray { window_ms, max },
                _ => Self::Imposed,
            },
            _ => Self::Imposed,
        }
    }
}

impl std::fmt::Display for BanReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let human = |ms: u64| humantime_fmt(Duration::from_millis(ms));
        match self {
            Self::Window {
                kind,
                period_ms,
                max,
            } => write!(
                f,
                "more than {max} failures per {} ({} window)",
                human(*period_ms),
                kind.label()
            ),
            Self::Spray { window_ms, max } => write!(
                f,
                "more than {max} distinct usernames per {} (spraying)",
                human(*window_ms)
            ),
            Self::Imposed => f.write_str("imposed"),
        }
    }
}

fn humantime_fmt(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else if d.subsec_millis() == 0 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Everything one failure reads and writes, loaded by a store. Arrays are indexed by
/// [`kind_index`].
#[derive(Debug, Clone, Default)]
pub struct FailureState {
    /// Tags of the last wrong passwords of this (address, account), newest first.
    pub repeat: Vec<String>,
    /// The window buckets of the address, network, account and pair.
    pub buckets: [Buckets; 4],
    /// Distinct failed usernames from this address.
    pub spray: Recent,
    /// Distinct accounts that recently logged in from this address / network.
    pub nat_ip: usize,
    pub nat_net: usize,
    /// Whether a ban of each kind is in force already (not started again, not counted again).
    pub banned: [bool; 4],
    /// Offences remembered for each kind's entity.
    pub offences: [u32; 4],
}

/// What one failure's tags are.
#[derive(Debug, Clone)]
pub struct FailureInput<'a> {
    /// The wrong password's tag.
    pub password_tag: &'a str,
    /// The normalised account's tag (a member of the spray set).
    pub account_tag: &'a str,
}

/// A ban [`on_failure`] started.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBan {
    pub kind: WindowKey,
    pub offences: u32,
    pub duration_ms: u64,
    pub reason: BanReason,
}

/// What [`on_failure`] decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FailureEffects {
    /// The password was one of the last few wrong ones: nothing was counted.
    pub repeat: bool,
    pub bans: Vec<NewBan>,
}

/// Counts one rejected login into `state` and decides which bans start.
///
/// Order: a repeated wrong password is ignored by every counter; otherwise every window and the
/// spray set count it; each key kind whose limit is exceeded (the `ip` and `net` limits and the
/// spray limit scaled by the NAT factor) starts one ban, unless one is in force. A ban clears the
/// counters of the entity it bans, so that after it ends the next ban needs `max` new failures
/// again — while the offence count, kept for `ban_decay`, makes that next ban longer.
pub fn on_failure(
    state: &mut FailureState,
    settings: &Settings,
    input: &FailureInput<'_>,
    now_ms: u64,
    jitter_mult: f64,
) -> FailureEffects {
    if settings.password_repeat > 0 {
        if state.repeat.iter().any(|t| t == input.password_tag) {
            return FailureEffects {
                repeat: true,
                bans: Vec::new(),
            };
        }
        state.repeat.insert(0, input.password_tag.to_owned());
        state.repeat.truncate(settings.password_repeat);
    }
    let factor = |kind: WindowKey| match kind {
        WindowKey::Ip => settings.nat_multiplier(state.nat_ip),
        WindowKey::Net => settings.nat_multiplier(state.nat_net),
        WindowKey::Account | WindowKey::IpAccount => 1.0,
    };
    let mut tripped: [Option<BanReason>; 4] = Default::default();
    for w in &settings.windows {
        let f = factor(w.kind);
        let i = kind_index(w.kind);
        let estimate = bucket_for(&mut state.buckets[i], w.period_ms).add(now_ms, w.period_ms);
        if estimate > limit(w.max, f) && tripped[i].is_none() {
            tripped[i] = Some(BanReason::Window {
                kind: w.kind,
                period_ms: w.period_ms,
                max: w.max,
            });
        }
    }
    let users = recent_insert(
        &mut state.spray,
        input.account_tag,
        now_ms,
        settings.spray_window_ms,
        settings.spray_cap(),
    );
    let ip = kind_index(WindowKey::Ip);
    if users as f64 > limit(settings.spray_max_users, factor(WindowKey::Ip))
        && tripped[ip].is_none()
    {
        tripped[ip] = Some(BanReason::Spray {
            window_ms: settings.spray_window_ms,
            max: settings.spray_max_users,
        });
    }
    let mut bans = Vec::new();
    for (i, reason) in tripped.into_iter().enumerate() {
        let Some(reason) = reason else { continue };
        if state.banned[i] {
            continue;
        }
        let offences = state.offences[i].saturating_add(1);
        state.offences[i] = offences;
        state.banned[i] = true;
        state.buckets[i].clear();
        if i == ip {
            state.spray.clear();
        }
        bans.push(NewBan {
            kind: KINDS[i],
            offences,
            duration_ms: ban_duration_ms(settings, offences, jitter_mult),
            reason,
        });
    }
    FailureEffects {
        repeat: false,
        bans,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings() -> Settings {
        Settings::from_config(&GuardConfig::default())
    }

    const T0: u64 = 1_800_000_000_000;

    fn fail(
        state: &mut FailureState,
        s: &Settings,
        pw: &str,
        user: &str,
        now: u64,
    ) -> FailureEffects {
        on_failure(
            state,
            s,
            &FailureInput {
                password_tag: pw,
                account_tag: user,
            },
            now,
            1.0,
        )
    }

    #[test]
    fn bucket_slides() {
        let p = 1000;
        let mut b = Bucket::default();
        for _ in 0..10 {
            b.add(T0, p);
        }
        assert_eq!(b.estimate(T0, p), 10.0);
        // Half-way through the next bucket, half of the previous one still counts.
        assert_eq!(b.estimate(T0 + p + p / 2, p), 5.0);
        // Two buckets later nothing counts.
        assert_eq!(b.estimate(T0 + 2 * p, p), 0.0);
        assert_eq!(b.add(T0 + 3 * p, p), 1.0);
    }

    #[test]
    fn ban_durations_grow_and_cap() {
        let s = settings();
        assert_eq!(ban_duration_ms(&s, 1, 1.0), 300_000);
        assert_eq!(ban_duration_ms(&s, 2, 1.0), 600_000);
        assert_eq!(ban_duration_ms(&s, 3, 1.0), 1_200_000);
        assert_eq!(ban_duration_ms(&s, 60, 1.0), 86_400_000);
        assert_eq!(ban_duration_ms(&s, u32::MAX, 1.2), 86_400_000);
        assert_eq!(ban_duration_ms(&s, 1, jitter_multiplier(0.2, 0.0)), 240_000);
        assert_eq!(ban_duration_ms(&s, 1, jitter_multiplier(0.2, 1.0)), 360_000);
    }

    #[test]
    fn repeat_password_counts_once() {
        let s = settings();
        let mut st = FailureState::default();
        for _ in 0..50 {
            let e = fail(&mut st, &s, "tag-a", "alice", T0);
            assert!(e.bans.is_empty());
        }
        assert_eq!(
            st.buckets[kind_index(WindowKey::IpAccount)][0].1.cur,
            1,
            "{st:?}"
        );
        assert!(fail(&mut st, &s, "tag-a", "alice", T0).repeat);
        assert!(!fail(&mut st, &s, "tag-b", "alice", T0).repeat);
    }

    #[test]
    fn pair_window_bans_the_pair_first() {
        let s = settings();
        let mut st = FailureState::default();
        for i in 0..5 {
            assert!(fail(&mut st, &s, &format!("pw{i}"), "alice", T0)
                .bans
                .is_empty());
        }
        let e = fail(&mut st, &s, "pw5", "alice", T0);
        assert_eq!(e.bans.len(), 1);
        assert_eq!(e.bans[0].kind, WindowKey::IpAccount);
        assert_eq!(e.bans[0].offences, 1);
        assert!(st.buckets[kind_index(WindowKey::IpAccount)].is_empty());
        // The address window kept counting.
        assert_eq!(st.buckets[0][0].1.cur, 6);
    }

    #[test]
    fn spray_bans_the_address() {
        let mut s = settings();
        // One state stands for one subject here, so only the network window can stay.
        s.windows.retain(|w| w.kind == WindowKey::Net);
        let mut st = FailureState::default();
        for i in 0..10 {
            assert!(fail(&mut st, &s, &format!("p{i}"), &format!("u{i}"), T0)
                .bans
                .is_empty());
        }
        let e = fail(&mut st, &s, "p10", "u10", T0);
        assert_eq!(e.bans.len(), 1);
        assert!(matches!(e.bans[0].reason, BanReason::Spray { .. }));
        assert!(st.spray.is_empty());
    }

    #[test]
    fn nat_factor_raises_address_limits() {
        let s = settings();
        let mut st = FailureState {
            nat_ip: 5,
            nat_net: 5,
            ..Default::default()
        };
        for i in 0..40 {
            let e = fail(
                &mut st,
                &s,
                &format!("p{i}"),
                &format!("u{}", i % 20),
                T0 + i,
            );
            assert!(
                e.bans.iter().all(|b| b.kind != WindowKey::Ip),
                "failure {i}: {e:?}"
            );
        }
        let e = fail(&mut st, &s, "p40", "u0", T0 + 41);
        assert!(e.bans.iter().any(|b| b.kind == WindowKey::Ip), "{e:?}");
    }

    #[test]
    fn already_banned_kind_is_not_banned_again() {
        let s = settings();
        let mut st = FailureState {
            banned: [false, false, false, true],
            ..Default::default()
        };
        for i in 0..6 {
            assert!(fail(&mut st, &s, &format!("p{i}"), "alice", T0)
                .bans
                .is_empty());
        }
    }

    #[test]
    fn reasons_round_trip() {
        for r in [
            BanReason::Window {
                kind: WindowKey::IpAccount,
                period_ms: 600_000,
                max: 5,
            },
            BanReason::Spray {
                window_ms: 600_000,
                max: 10,
            },
            BanReason::Imposed,
        ] {
            assert_eq!(BanReason::decode(&r.encode()), r);
        }
        assert_eq!(BanReason::decode("garbage"), BanReason::Imposed);
        assert_eq!(
            BanReason::Window {
                kind: WindowKey::Ip,
                period_ms: 600_000,
                max: 10
            }
            .to_string(),
            "more than 10 failures per 10m (ip window)"
        );
    }

    proptest! {
        #[test]
        fn ban_duration_is_monotone_capped_and_jittered(
            initial in 1u64..10_000_000, factor in 1.0f64..10.0, max_mult in 1u64..1000,
            jitter in 0.0f64..0.99, u in 0.0f64..1.0, n in 1u32..200,
        ) {
            let mut s = settings();
            s.ban_initial_ms = initial;
            s.ban_factor = factor;
            s.ban_max_ms = initial.saturating_mul(max_mult);
            s.ban_jitter = jitter;
            let m = jitter_multiplier(jitter, u);
            let d = ban_duration_ms(&s, n, m);
            let next = ban_duration_ms(&s, n + 1, m);
            prop_assert!(d <= s.ban_max_ms);
            prop_assert!(d >= 1);
            prop_assert!(next >= d);
            let unjittered = ban_duration_ms(&s, n, 1.0) as f64;
            prop_assert!(d as f64 <= unjittered * (1.0 + jitter) + 1.0);
            prop_assert!(d as f64 >= (unjittered * (1.0 - jitter)).floor() - 1.0);
        }

        #[test]
        fn bucket_estimate_is_bounded_by_recent_failures(
            steps in proptest::collection::vec(0u64..3000, 1..100), period in 1u64..5000,
        ) {
            let mut b = Bucket::default();
            let mut now = T0;
            let mut times = Vec::new();
            for step in steps {
                now += step;
                times.push(now);
                let est = b.add(now, period);
                let in_two = times.iter().filter(|&&t| t + 2 * period > now).count() as f64;
                prop_assert!(est >= f64::from(b.cur));
                prop_assert!(est <= in_two + 1e-9, "est {est} > {in_two}");
            }
        }

        #[test]
        fn recent_set_is_bounded_and_distinct(
            tags in proptest::collection::vec(0u8..40, 1..200), cap in 1usize..30,
        ) {
            let mut set = Recent::new();
            for (i, t) in tags.iter().enumerate() {
                let n = recent_insert(&mut set, &t.to_string(), T0 + i as u64, 1_000_000, cap);
                prop_assert!(n <= cap);
                let mut seen: Vec<&String> = set.iter().map(|(_, t)| t).collect();
                seen.sort();
                seen.dedup();
                prop_assert_eq!(seen.len(), set.len());
            }
        }

        #[test]
        fn repeat_ring_stays_bounded(pws in proptest::collection::vec(0u8..20, 1..100), n in 0usize..8) {
            let mut s = settings();
            s.password_repeat = n;
            let mut st = FailureState::default();
            for p in pws {
                let _ = fail(&mut st, &s, &p.to_string(), "alice", T0);
                prop_assert!(st.repeat.len() <= n);
            }
        }
    }
}
