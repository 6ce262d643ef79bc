//! One driver per protocol: the phase order of a connection, readable top to bottom.
//! Protocol logic lives in [`crate::proto`]; these only move bytes and call the shared services.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tokio_util::sync::CancellationToken;

use crate::authn::Checked;
use crate::backend::Connector;
use crate::config::{Config, ListenerTls};
use crate::identity::IdentityRules;
use crate::Protocol;

pub mod imap;
pub mod pop3;
pub mod runner;
pub mod sieve;

/// Services every session shares.
pub struct Shared {
    pub config: Config,
    pub authn: Checked,
    pub backend: Connector,
    pub rules: IdentityRules,
    /// What ManageSieve greetings advertise, learnt from the backend.
    pub sieve_capabilities: Arc<sieve::SieveCapabilities>,
    /// Fired by SIGTERM: pre-login sessions say goodbye, listeners stop accepting.
    pub shutdown: CancellationToken,
    /// Fired when the shutdown grace period is over: spliced sessions are closed.
    pub hard_stop: CancellationToken,
}

impl Shared {
    /// The uniform delay before answering any failed login (plus jitter), so that causes cannot
    /// be told apart by timing.
    pub fn failure_delay(&self) -> Duration {
        let g = &self.config.guard;
        let jitter_ms = g.failure_jitter.as_millis() as u64;
        let jitter = if jitter_ms == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter_ms)
        };
        g.failure_delay + Duration::from_millis(jitter)
    }
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
