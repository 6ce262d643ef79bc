//! What the proxy learned from the backend before any client logged in: the capabilities it
//! mirrors in its own greeting (SMTP `EHLO` keywords, ManageSieve extensions), so clients see
//! what the backend will actually do after login. Learned on first use, refreshed in the
//! background once stale; a backend that cannot be reached leaves the last good answer (or the
//! protocol's defaults) in place and never delays a greeting by more than one probe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Protocol;

/// How long a learned answer is used before a refresh is started.
pub const FRESH_FOR: Duration = Duration::from_secs(300);
/// How long after a failed probe the next one may start.
const RETRY_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Entry {
    values: Option<Arc<Vec<String>>>,
    learned_at: Option<Instant>,
    last_try: Option<Instant>,
    refreshing: bool,
}

/// What a caller should do, from [`Learned::lookup`].
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Use these; nothing to do.
    Fresh(Arc<Vec<String>>),
    /// Use these and start a refresh in the background (the caller was chosen to run it).
    Stale(Arc<Vec<String>>),
    /// Nothing learned yet and this caller was chosen to probe now.
    Probe,
    /// Nothing learned and a probe is running or recently failed: use the defaults.
    Defaults,
}

/// Learned capabilities per protocol.
#[derive(Debug, Default)]
pub struct Learned {
    entries: Mutex<HashMap<Protocol, Entry>>,
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
        let e = map.entry(protocol).or_insert(Entry {
            values: None,
            learned_at: None,
            last_try: None,
            refreshing: false,
        });
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
                    Lookup::Stale(v)
                } else {
                    Lookup::Fresh(v)
                }
            }
            (None, _) if may_try => {
                e.refreshing = true;
                e.last_try = Some(now);
                Lookup::Probe
            }
            (None, _) => Lookup::Defaults,
        }
    }

    /// Records a probe's result (`None`: it failed; keep what we had).
    pub fn finish(&self, protocol: Protocol, values: Option<Vec<String>>, now: Instant) {
        let Ok(mut map) = self.entries.lock() else {
            return;
        };
        if let Some(e) = map.get_mut(&protocol) {
            e.refreshing = false;
            if let Some(v) = values {
                e.values = Some(Arc::new(v));
                e.learned_at = Some(now);
            }
        }
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
        assert!(matches!(l.lookup(Protocol::Submission, t0), Lookup::Probe));
        assert!(matches!(
            l.lookup(Protocol::Submission, t0),
            Lookup::Defaults
        ));
        l.finish(Protocol::Submission, Some(vec!["SIZE 1".into()]), t0);
        assert!(matches!(l.lookup(Protocol::Submission, t0), Lookup::Fresh(v) if v[0] == "SIZE 1"));
        let later = t0 + FRESH_FOR + Duration::from_secs(1);
        assert!(matches!(
            l.lookup(Protocol::Submission, later),
            Lookup::Stale(_)
        ));
        assert!(matches!(
            l.lookup(Protocol::Submission, later),
            Lookup::Fresh(_)
        ));
        l.finish(Protocol::Submission, None, later);
        // A failed refresh keeps the old values and waits before trying again.
        assert!(matches!(
            l.lookup(Protocol::Submission, later),
            Lookup::Fresh(_)
        ));
        let retry = later + RETRY_AFTER;
        assert!(matches!(
            l.lookup(Protocol::Submission, retry),
            Lookup::Stale(_)
        ));
    }

    #[test]
    fn failed_first_probe_uses_defaults_until_retry() {
        let l = Learned::new();
        let t0 = Instant::now();
        assert!(matches!(l.lookup(Protocol::ManageSieve, t0), Lookup::Probe));
        l.finish(Protocol::ManageSieve, None, t0);
        assert!(matches!(
            l.lookup(Protocol::ManageSieve, t0),
            Lookup::Defaults
        ));
        assert!(matches!(
            l.lookup(Protocol::ManageSieve, t0 + RETRY_AFTER),
            Lookup::Probe
        ));
        l.clear();
        assert!(matches!(l.lookup(Protocol::ManageSieve, t0), Lookup::Probe));
    }
}
