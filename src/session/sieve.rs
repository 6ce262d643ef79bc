//! ManageSieve: the pre-login machine (greeting with the backend's capabilities), the master
//! login and the order-preserving `UNAUTHENTICATE` filters, plugged into the shared runner.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use super::runner::{self, Plug};
use super::{ConnCtx, ListenerCtx, SharedRef};
use crate::authn::TlsInfo;
use crate::config::ListenerTls;
use crate::proto::sieve::{
    default_capabilities, splice_filters, Capability, SieveOptions, SievePreAuth,
};
use crate::stream::Conn;
use crate::Protocol;

/// Learnt capabilities are asked for again after this long (in the background).
const REFRESH: Duration = Duration::from_secs(5 * 60);
/// After a failed probe, the next try waits this long (clients meanwhile get what is cached).
const RETRY: Duration = Duration::from_secs(30);

/// The backend's ManageSieve capabilities, as every greeting shows them.
///
/// Learnt by a probe on first use (the first client waits for it, at most the backend connect
/// timeout), refreshed in the background when older than five minutes, and the default list
/// ([`default_capabilities`]) while the backend has never been reached. The accept loop never
/// waits for any of this: only connection tasks do.
#[derive(Debug)]
pub struct SieveCapabilities {
    refresh: Duration,
    retry: Duration,
    cached: Mutex<Cached>,
    /// One first probe at a time; the others wait for its answer.
    first: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Cached {
    capabilities: Arc<Vec<Capability>>,
    /// When to ask again; `None` before the first probe finished.
    until: Option<Instant>,
    refreshing: bool,
}

impl Default for SieveCapabilities {
    fn default() -> Self {
        Self::new()
    }
}

impl SieveCapabilities {
    pub fn new() -> Self {
        Self::with_periods(REFRESH, RETRY)
    }

    /// A cache that asks again `refresh` after learning and `retry` after failing.
    pub fn with_periods(refresh: Duration, retry: Duration) -> Self {
        Self {
            refresh,
            retry,
            cached: Mutex::new(Cached {
                capabilities: Arc::new(default_capabilities()),
                until: None,
                refreshing: false,
            }),
            first: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a probe's result; a failure keeps what was known (or the defaults).
    fn store(&self, learnt: Option<Vec<Capability>>) {
        let mut c = self.lock();
        c.refreshing = false;
        match learnt {
            Some(caps) => {
                c.capabilities = Arc::new(caps);
                c.until = Some(Instant::now() + self.refresh);
            }
            None => c.until = Some(Instant::now() + self.retry),
        }
    }

    /// The capabilities to greet with now. `probe` asks the backend (`None` if it could not):
    /// awaited on first use, spawned when the cached list is due for a refresh, not called
    /// otherwise.
    pub async fn current<P, F>(self: &Arc<Self>, probe: P) -> Arc<Vec<Capability>>
    where
        P: FnOnce() -> F,
        F: std::future::Future<Output = Option<Vec<Capability>>> + Send + 'static,
    {
        let (caps, known, refresh) = {
            let mut c = self.lock();
            let due = c.until.is_some_and(|u| Instant::now() >= u);
            let refresh = due && !c.refreshing;
            if refresh {
                c.refreshing = true;
            }
            (c.capabilities.clone(), c.until.is_some(), refresh)
        };
        if refresh {
            let me = self.clone();
            let learnt = probe();
            tokio::spawn(async move { me.store(learnt.await) });
            return caps;
        }
        if known {
            return caps;
        }
        let _first = self.first.lock().await;
        if self.lock().until.is_none() {
            self.store(probe().await);
        }
        let caps = self.lock().capabilities.clone();
        caps
    }
}

/// Asks the backend for its capabilities.
async fn probe(shared: SharedRef) -> Option<Vec<Capability>> {
    let service = shared.config.backend.service(Protocol::ManageSieve)?;
    match shared.backend.sieve_capabilities(service).await {
        Ok(caps) => {
            debug!(
                count = caps.len(),
                "learnt the backend's ManageSieve capabilities"
            );
            Some(caps)
        }
        Err(e) => {
            warn!(error = %e, "could not learn the backend's ManageSieve capabilities; using what is cached");
            None
        }
    }
}

/// Runs one ManageSieve connection to its end.
pub async fn run(
    shared: SharedRef,
    listener: ListenerCtx,
    ctx: ConnCtx,
    conn: Conn,
    tls: Option<TlsInfo>,
) {
    let learn = shared.clone();
    let capabilities = shared
        .sieve_capabilities
        .current(move || probe(learn))
        .await;
    let l = &shared.config.limits;
    let machine = SievePreAuth::new(SieveOptions {
        tls: conn.is_tls(),
        starttls: listener.tls == ListenerTls::Starttls,
        allow_plaintext_auth: listener.allow_plaintext_auth,
        rules: shared.rules.clone(),
        max_auth_failures: l.max_auth_failures,
        max_protocol_errors: l.max_protocol_errors,
        capabilities: capabilities.as_ref().clone(),
    });
    let plug = Plug {
        protocol: Protocol::ManageSieve,
        machine,
        backend: |c: &crate::backend::Connector, account: &str, service| {
            c.sieve_machine(account, service)
        },
        filters: splice_filters,
    };
    runner::run(shared, listener, ctx, conn, tls, plug).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn caps(name: &str) -> Vec<Capability> {
        vec![(name.to_owned(), None)]
    }

    /// Lets a spawned refresh finish.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn learns_once_refreshes_in_the_background_and_falls_back() {
        let (refresh, retry) = (Duration::from_millis(1500), Duration::from_millis(1000));
        let cache = Arc::new(SieveCapabilities::with_periods(refresh, retry));
        let calls = Arc::new(AtomicUsize::new(0));
        let probe = |answer: Option<Vec<Capability>>| {
            let calls = calls.clone();
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                answer
            }
        };
        // The backend cannot be reached at first: the defaults, asked again after `retry`.
        assert_eq!(*cache.current(probe(None)).await, default_capabilities());
        assert_eq!(
            *cache.current(probe(Some(caps("A")))).await,
            default_capabilities()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(retry).await;
        // Due: the old list now, the new one once the background probe is done.
        assert_eq!(
            *cache.current(probe(Some(caps("A")))).await,
            default_capabilities()
        );
        settle().await;
        assert_eq!(*cache.current(probe(Some(caps("B")))).await, caps("A"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // A learnt list lasts `refresh`; a failed refresh keeps it.
        tokio::time::sleep(refresh).await;
        assert_eq!(*cache.current(probe(None)).await, caps("A"));
        settle().await;
        assert_eq!(*cache.current(probe(None)).await, caps("A"));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_first_uses_share_one_probe() {
        let cache = Arc::new(SieveCapabilities::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .current(move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Some(caps("X"))
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(*t.await.unwrap(), caps("X"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
