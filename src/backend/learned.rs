//! What the proxy learned from the backend before any client logged in: the capabilities it
//! mirrors in its own greeting (SMTP `EHLO` keywords, ManageSieve extensions), so clients see
//! what the backend will actually do after login. Learned on first use, refreshed in the
//! background once stale; a backend that cannot be reached leaves the last good answer (or the
//! protocol's defaults) in place and never delays a greeting by more than one probe.
//!
//! Sessions that arrive while the first probe is in flight wait for it (bounded by the probe's
//! own deadline) instead of greeting with the defaults: the first clients after a start or a
//! reload would otherwise see a different `EHLO` from the ones a moment later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::Protocol;

/// How long a learned answer is used before a refresh is started.
pub const FRESH_FOR: Duration = Duration::from_secs(300);
/// How long after a failed probe the next one may start.
const RETRY_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Entry {
    values: Option<Arc<Vec<String>>>,
    learned_at: Option<Instant>,
    last_try: Option<Instant>,
    refreshing: bool,
    /// Counts finished probes; waiters see it change.
    finished: watch::Sender<u64>,
    /// Which entry this is: one made after a [`Learned::clear`] has a new one.
    id: u64,
}

/// Given to the caller elected to probe, handed back with the result: a probe against the
/// backend of before a reload cannot fill in the entry made after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// What a caller should do, from [`Learned::lookup`].
#[derive(Debug)]
pub enum Lookup {
    /// Use these; nothing to do.
    Fresh(Arc<Vec<String>>),
    /// Use these and start a refresh in the background (the caller was chosen to run it).
    Stale(Arc<Vec<String>>, Ticket),
    /// Nothing learned yet and this caller was chosen to start a probe; it then waits for it
    /// like [`Lookup::Wait`].
    Probe(Waiter, Ticket),
    /// Nothing learned yet and the first probe is in flight: wait for it, then read
    /// [`Learned::current`].
    Wait(Waiter),
    /// Nothing learned and the last probe failed recently: use the defaults.
    Defaults,
}

/// Resolves when the probe in flight at the time of the lookup has finished (or the entry was
/// cleared).
#[derive(Debug)]
pub struct Waiter(watch::Receiver<u64>);

impl Waiter {
    pub async fn finished(mut self) {
        // An error means the entry was cleared: nothing more will come from this probe.
        let _ = self.0.changed().await;
    }
}

/// Learned capabilities per protocol.
#[derive(Debug, Default)]
pub struct Learned {
    entries: Mutex<HashMap<Protocol, Entry>>,
    /// Source of [`Entry::id`].
    ids: AtomicU64,
}

impl Learned {
    pub fn new() -> Self {
        Self::default()
    }

    /// Says what to use for `protocol` at `now`, electing at most one caller to probe.
    pub fn lookup(&self, protocol: Protocol, now: Instant) -> Lookup {
        let Ok(mut map) = self.entries.lock() else {
            return Lookup::Defaults;
        };
        let e = map.entry(protocol).or_insert_with(|| Entry {
            values: None,
            learned_at: None,
            last_try: None,
            refreshing: false,
            finished: watch::channel(0).0,
            id: self.ids.fetch_add(1, Ordering::Relaxed),
        });
        let ticket = Ticket(e.id);
        let may_try = !e.refreshing
            && e.last_try
                .is_none_or(|t| now.duration_since(t) >= RETRY_AFTER);
        match (&e.values, e.learned_at) {
            (Some(v), Some(at)) if now.duration_since(at) < FRESH_FOR => Lookup::Fresh(v.clone()),
            (Some(v), _) => {
                let v = v.clone();
                if may_try {
                    e.refreshing = true;
                    e.last_try = Some(now);
                    Lookup::Stale(v, ticket)
                } else {
                    Lookup::Fresh(v)
                }
            }
            (None, _) if may_try => {
                e.refreshing = true;
                e.last_try = Some(now);
                Lookup::Probe(Waiter(e.finished.subscribe()), ticket)
            }
            (None, _) if e.refreshing => Lookup::Wait(Waiter(e.finished.subscribe())),
            (None, _) => Lookup::Defaults,
        }
    }

    /// Records the result of the probe `ticket` was given for (`None`: it failed; keep what we
    /// had). A result from before a [`Learned::clear`] is dropped.
    pub fn finish(
        &self,
        protocol: Protocol,
        ticket: Ticket,
        values: Option<Vec<String>>,
        now: Instant,
    ) {
        let Ok(mut map) = self.entries.lock() else {
            return;
        };
        if let Some(e) = map.get_mut(&protocol).filter(|e| e.id == ticket.0) {
            e.refreshing = false;
            if let Some(v) = values {
                e.values = Some(Arc::new(v));
                e.learned_at = Some(now);
            }
            e.finished.send_modify(|n| *n += 1);
        }
    }

    /// What is learned for `protocol`, without electing anyone to probe.
    pub fn current(&self, protocol: Protocol) -> Option<Arc<Vec<String>>> {
        let map = self.entries.lock().ok()?;
        map.get(&protocol)?.values.clone()
    }

    /// Forgets everything (SIGHUP: the backend may have changed).
    pub fn clear(&self) {
        if let Ok(mut map) = self.entries.lock() {
            map.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_prober_then_fresh_then_stale_refresh() {
        let l = Learned::new();
        let t0 = Instant::now();
        let Lookup::Probe(_, ticket) = l.lookup(Protocol::Submission, t0) else {
            panic!("first caller probes");
        };
        assert!(matches!(
            l.lookup(Protocol::Submission, t0),
            Lookup::Wait(_)
        ));
        assert!(l.current(Protocol::Submission).is_none());
        l.finish(
            Protocol::Submission,
            ticket,
            Some(vec!["SIZE 1".into()]),
            t0,
        );
        assert_eq!(l.current(Protocol::Submission).unwrap()[0], "SIZE 1");
        assert!(matches!(l.lookup(Protocol::Submission, t0), Lookup::Fresh(v) if v[0] == "SIZE 1"));
        let later = t0 + FRESH_FOR + Duration::from_secs(1);
        let Lookup::Stale(_, ticket) = l.lookup(Protocol::Submission, later) else {
            panic!("stale: one caller refreshes");
        };
        assert!(matches!(
            l.lookup(Protocol::Submission, later),
            Lookup::Fresh(_)
        ));
        l.finish(Protocol::Submission, ticket, None, later);
        // A failed refresh keeps the old values and waits before trying again.
        assert!(matches!(
            l.lookup(Protocol::Submission, later),
            Lookup::Fresh(_)
        ));
        let retry = later + RETRY_AFTER;
        assert!(matches!(
            l.lookup(Protocol::Submission, retry),
            Lookup::Stale(..)
        ));
    }

    #[test]
    fn failed_first_probe_uses_defaults_until_retry() {
        let l = Learned::new();
        let t0 = Instant::now();
        let Lookup::Probe(_, ticket) = l.lookup(Protocol::ManageSieve, t0) else {
            panic!("first caller probes");
        };
        l.finish(Protocol::ManageSieve, ticket, None, t0);
        assert!(matches!(
            l.lookup(Protocol::ManageSieve, t0),
            Lookup::Defaults
        ));
        assert!(matches!(
            l.lookup(Protocol::ManageSieve, t0 + RETRY_AFTER),
            Lookup::Probe(..)
        ));
        l.clear();
        assert!(matches!(
            l.lookup(Protocol::ManageSieve, t0),
            Lookup::Probe(..)
        ));
    }

    #[tokio::test]
    async fn waiters_wake_when_the_first_probe_finishes_or_is_cleared() {
        let l = Arc::new(Learned::new());
        let t0 = Instant::now();
        let Lookup::Probe(prober, ticket) = l.lookup(Protocol::Submission, t0) else {
            panic!("first caller probes");
        };
        let Lookup::Wait(waiter) = l.lookup(Protocol::Submission, t0) else {
            panic!("second caller waits");
        };
        let woke = tokio::spawn(async move {
            waiter.finished().await;
        });
        tokio::task::yield_now().await;
        assert!(!woke.is_finished(), "no probe has finished yet");
        l.finish(
            Protocol::Submission,
            ticket,
            Some(vec!["PIPELINING".into()]),
            t0,
        );
        tokio::time::timeout(Duration::from_secs(5), woke)
            .await
            .expect("waiter woke")
            .unwrap();
        // A waiter subscribed before the finish sees it even if it polls afterwards.
        tokio::time::timeout(Duration::from_secs(5), prober.finished())
            .await
            .expect("prober's waiter woke");
        assert_eq!(l.current(Protocol::Submission).unwrap()[0], "PIPELINING");

        let Lookup::Probe(_, before) = l.lookup(Protocol::ManageSieve, t0) else {
            panic!("first caller probes");
        };
        let Lookup::Wait(waiter) = l.lookup(Protocol::ManageSieve, t0) else {
            panic!("second caller waits");
        };
        l.clear();
        tokio::time::timeout(Duration::from_secs(5), waiter.finished())
            .await
            .expect("a clear releases waiters");
        assert!(l.current(Protocol::ManageSieve).is_none());
        // The probe of before the clear reports while the next one runs: it is not taken.
        let Lookup::Probe(_, after) = l.lookup(Protocol::ManageSieve, t0) else {
            panic!("first caller after the clear probes");
        };
        l.finish(Protocol::ManageSieve, before, Some(vec!["OLD".into()]), t0);
        assert!(l.current(Protocol::ManageSieve).is_none());
        assert!(matches!(
            l.lookup(Protocol::ManageSieve, t0),
            Lookup::Wait(_)
        ));
        l.finish(Protocol::ManageSieve, after, Some(vec!["NEW".into()]), t0);
        assert_eq!(l.current(Protocol::ManageSieve).unwrap()[0], "NEW");
    }
}
