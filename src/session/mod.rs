//! One driver per protocol: the phase order of a connection, readable top to bottom.
//! Protocol logic lives in [`crate::proto`]; these only move bytes and call the shared services.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::authn::Checked;
use crate::backend::learned::{Learned, Lookup};
use crate::backend::Connector;
use crate::config::BackendService;
use crate::config::{Config, ListenerTls};
use crate::identity::IdentityRules;
use crate::proto::prelogin::BackendMachine;
use crate::Protocol;

pub mod http;
pub mod imap;
pub mod pop3;
pub mod runner;
pub mod sieve;
pub mod smtp;

/// Services every session shares.
pub struct Shared {
    pub config: Config,
    pub authn: Checked,
    pub backend: Connector,
    pub rules: IdentityRules,
    /// The SASL mechanisms every mail listener offers.
    pub sasl: crate::sasl::Offer,
    /// Fired by SIGTERM: pre-login sessions say goodbye, listeners stop accepting.
    pub shutdown: CancellationToken,
    /// Fired when the shutdown grace period is over: spliced sessions are closed.
    pub hard_stop: CancellationToken,
    /// Capabilities learned from the backend, mirrored in greetings.
    pub learned: Learned,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Connect-time DNSBL checks, if configured.
    pub dnsbl: Option<crate::dnsbl::Dnsbl>,
    /// Attack detection: failure windows, bans, per-account session caps.
    pub guard: crate::guard::Guard,
    /// The HTTP listener's backend client and auth cache.
    pub http: http::HttpState,
}

impl Shared {
    /// The uniform delay before answering any failed or denied login (plus jitter), so that
    /// causes cannot be told apart by timing. Reloadable with the guard's settings.
    pub fn failure_delay(&self) -> Duration {
        self.guard.failure_delay()
    }

    /// Brings the gauges that are read rather than counted up to date (before a scrape).
    pub async fn refresh_gauges(&self) {
        let bans = self.guard.bans().await.len();
        self.metrics
            .guard_bans_active
            .set(i64::try_from(bans).unwrap_or(i64::MAX));
        self.metrics
            .guard_store_up
            .set(i64::from(self.guard.store_healthy()));
    }
}

/// The backend's capabilities for `protocol` as `probe` learns them (see
/// [`crate::backend::learned`]); `None` means use the protocol's defaults.
pub async fn learned_capabilities<B, P>(
    shared: &SharedRef,
    protocol: Protocol,
    probe: P,
) -> Option<Arc<Vec<String>>>
where
    B: BackendMachine + 'static,
    P: Fn(&Connector, BackendService) -> B + Send + 'static,
{
    let service = shared.config.backend.service(protocol)?;
    // The probe runs in its own task, so a session that goes away mid-probe cannot leave the
    // entry marked as probing for ever.
    let start = |shared: SharedRef, ticket| {
        tokio::spawn(async move {
            let machine = probe(&shared.backend, service);
            let values = match shared.backend.probe(service, machine).await {
                Ok(values) => Some(values),
                Err(e) => {
                    tracing::warn!(event = "backend_probe", proto = protocol.label(), error = %e, "could not learn the backend's capabilities; using what is cached or the defaults");
                    None
                }
            };
            shared
                .learned
                .finish(protocol, ticket, values, std::time::Instant::now());
        })
    };
    let waiter = match shared.learned.lookup(protocol, std::time::Instant::now()) {
        Lookup::Fresh(v) => return Some(v),
        Lookup::Stale(v, ticket) => {
            start(shared.clone(), ticket);
            return Some(v);
        }
        Lookup::Defaults => return None,
        Lookup::Probe(waiter, ticket) => {
            start(shared.clone(), ticket);
            waiter
        }
        Lookup::Wait(waiter) => waiter,
    };
    // The probe is bounded by the backend's deadline; this bound only guards against a
    // probe task that never reports.
    let _ = tokio::time::timeout(shared.backend.probe_deadline(), waiter.finished()).await;
    shared.learned.current(protocol)
}

/// What a listener tells each of its sessions.
#[derive(Clone)]
pub struct ListenerCtx {
    pub protocol: Protocol,
    pub tls: ListenerTls,
    /// For STARTTLS (and implicit TLS, used by the accept path).
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub allow_plaintext_auth: bool,
    pub handshake_timeout: Duration,
}

/// Per-connection facts.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    pub session_id: String,
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub accepted: tokio::time::Instant,
}

/// Sessions share these through an `Arc`.
pub type SharedRef = Arc<Shared>;
