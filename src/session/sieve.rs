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
        Self {
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
                c.until = Some(Instant::now() + REFRESH);
            }
            None => c.until = Some(Instant::now() + RETRY),
        }
    }
}

/// Probes the backend and stores the answer.
async fn refresh(shared: &SharedRef) {
    let learnt = match shared.config.backend.service(Protocol::ManageSieve) {
        Some(service) => match shared.backend.sieve_capabilities(service).await {
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
        },
        None => None,
    };
    shared.sieve_capabilities.store(learnt);
}

/// The capabilities to greet with now.
async fn capabilities(shared: &SharedRef) -> Arc<Vec<Capability>> {
    let cache = &shared.sieve_capabilities;
    let (caps, until, start_refresh) = {
        let mut c = cache.lock();
        let stale = c.until.is_some_and(|u| Instant::now() >= u);
        let start = stale && !c.refreshing;
        if start {
            c.refreshing = true;
        }
        (c.capabilities.clone(), c.until, start)
    };
    if start_refresh {
        let shared = shared.clone();
        tokio::spawn(async move { refresh(&shared).await });
    }
    if until.is_some() {
        return caps;
    }
    let _first = cache.first.lock().await;
    if cache.lock().until.is_none() {
        refresh(shared).await;
    }
    let caps = cache.lock().capabilities.clone();
    caps
}

/// Runs one ManageSieve connection to its end.
pub async fn run(
    shared: SharedRef,
    listener: ListenerCtx,
    ctx: ConnCtx,
    conn: Conn,
    tls: Option<TlsInfo>,
) {
    let capabilities = capabilities(&shared).await;
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
