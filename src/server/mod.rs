//! Listeners, connection permits, TLS handshakes off the accept path, and graceful shutdown.
//!
//! The accept loop only accepts, takes a permit (over the cap: close at once, no greeting) and
//! spawns; the TLS handshake runs in the connection's own task under one deadline, so a slow
//! client never stalls the loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub mod limiter;
pub mod listen;
pub mod workers;

use crate::authn::Checked;
use crate::backend::Connector;
use crate::config::{Config, ListenerTls, Scheduler};
use crate::identity::IdentityRules;
use crate::metrics::{GaugeGuard, ProtoLabels, RefusedLabels};
use crate::session::{ConnCtx, ListenerCtx, Shared, SharedRef};
use crate::stream::Conn;
use crate::tls::{CertStore, SniResolver};
use crate::Protocol;

fn tls_failed(shared: &Shared, protocol: &'static str) {
    shared
        .metrics
        .tls_failures
        .get_or_create(&ProtoLabels { protocol })
        .inc();
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("authenticator: {0}")]
    Authenticator(String),
    #[error("backend: {0}")]
    Backend(#[from] crate::backend::ConnectError),
    #[error("guard: {0}")]
    Guard(String),
    #[error("dnsbl: {0}")]
    Dnsbl(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started server: listeners bound, ready to [`Server::run`].
pub struct Server {
    shared: SharedRef,
    listeners: Vec<(TcpListener, ListenerCtx)>,
    resolver: Option<Arc<SniResolver>>,
    admin: Option<(TcpListener, Arc<crate::admin::Admin>)>,
}

impl Server {
    /// Loads everything the configuration names and binds every listener.
    ///
    /// # Errors
    /// A [`StartError`] naming what failed.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let secret = config.master_secret()?;
        let guard =
            crate::guard::Guard::new(&config.guard, &crate::guard::derive_hash_key(&secret))
                .map_err(|e| StartError::Guard(e.to_string()))?;
        let admin_token = match &config.admin {
            Some(a) => a.token()?,
            None => None,
        };
        let admin = match &config.admin {
            Some(a) => {
                Some(
                    TcpListener::bind(a.bind)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: a.bind,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let rules = IdentityRules::with_separator(&config.master.separator);
        let inner = crate::authn::build(&config.authenticator)
            .map_err(|e| StartError::Authenticator(e.to_string()))?;
        let authn = Checked::new(
            inner,
            config.authenticator.timeout,
            config.authenticator.max_concurrency,
            rules.clone(),
        );
        let backend = Connector::new(
            &config.backend,
            &config.master.user,
            &config.master.separator,
            secret,
        )?
        .with_helo_name(&config.server.hostname);
        let dnsbl = match &config.dnsbl {
            Some(d) => Some(crate::dnsbl::Dnsbl::new(d.clone()).map_err(StartError::Dnsbl)?),
            None => None,
        };
        let resolver = match &config.tls {
            Some(t) => Some(Arc::new(SniResolver::new(CertStore::load(t)?))),
            None => None,
        };
        let handshake_timeout = config
            .tls
            .as_ref()
            .map(|t| t.handshake_timeout)
            .unwrap_or_default();
        // Per-core runtimes each accept on their own socket of a group (see `listen`).
        let reuse_port = config.server.scheduler == Scheduler::PerCore;
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let acceptor = match (&resolver, l.tls) {
                (Some(r), ListenerTls::Implicit | ListenerTls::Starttls) => {
                    let alpn: Vec<String> = match &l.alpn {
                        Some(a) => a.clone(),
                        None => l
                            .protocol
                            .default_alpn()
                            .iter()
                            .map(|s| (*s).to_owned())
                            .collect(),
                    };
                    Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
                        r.clone(),
                        &alpn,
                    )?))
                }
                _ => None,
            };
            let ctx = ListenerCtx {
                protocol: l.protocol,
                tls: l.tls,
                acceptor,
                allow_plaintext_auth: l.allow_plaintext_auth,
                handshake_timeout,
            };
            for addr in &l.bind {
                let socket =
                    listen::bind(*addr, reuse_port)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: *addr,
                            source,
                        })?;
                listeners.push((socket, ctx.clone()));
            }
        }
        let config_http = config.http.clone();
        let runtimes = config.server.runtimes();
        let sasl = crate::authn::sasl_offer(&config.authenticator);
        let shared = Arc::new(Shared {
            config,
            authn,
            backend,
            rules,
            sasl,
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            learned: crate::backend::learned::Learned::new(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            dnsbl,
            guard,
            http: crate::session::http::HttpState::new(&config_http, runtimes),
        });
        let admin = admin.map(|l| {
            (
                l,
                Arc::new(crate::admin::Admin::new(shared.clone(), admin_token)),
            )
        });
        Ok(Self {
            shared,
            listeners,
            resolver,
            admin,
        })
    }

    /// The bound addresses, in configuration order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// A token that starts a graceful shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// What SIGHUP needs: the certificates and the authenticator's data, reloaded in place so
    /// that established sessions are untouched.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
            resolver: self.resolver.clone(),
        }
    }

    /// Serves until the shutdown token fires, then says goodbye to pre-login sessions and
    /// drains spliced ones for the grace period.
    pub async fn run(self) {
        self.run_on(&[]).await;
    }

    /// [`Server::run`], with every listener also accepted on each of `workers` (per-core
    /// runtimes, see [`workers`]): each gets its own socket for it ([`listen::sibling`]), and the
    /// connections it accepts stay on it.
    pub async fn run_on(self, workers: &[tokio::runtime::Handle]) {
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(self.shared.config.limits.max_connections));
        let limits = &self.shared.config.limits;
        let per_ip = limiter::Limiter::new(limits.per_ip_connections, limits.per_ip_new_per_minute);
        let ids = Arc::new(AtomicU64::new(0));
        let admin_stop = CancellationToken::new();
        if let Some((listener, admin)) = self.admin {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "admin listening");
            }
            tokio::spawn(admin.serve(listener, admin_stop.clone()));
        }
        for (listener, ctx) in self.listeners {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, proto = ctx.protocol.label(), tls = ?ctx.tls, "listening");
            }
            for handle in workers {
                let copy = match listen::sibling(&listener) {
                    Ok(copy) => copy,
                    Err(e) => {
                        warn!(error = %e, "cannot share a listener with a worker runtime");
                        continue;
                    }
                };
                let accepting = {
                    let (ctx, shared, permits, per_ip, tracker, ids) = (
                        ctx.clone(),
                        self.shared.clone(),
                        permits.clone(),
                        per_ip.clone(),
                        tracker.clone(),
                        ids.clone(),
                    );
                    async move {
                        // Registered with the worker's own reactor, so from inside its runtime.
                        match TcpListener::from_std(copy) {
                            Ok(listener) => {
                                accept_loop(listener, ctx, shared, permits, per_ip, tracker, ids)
                                    .await;
                            }
                            Err(e) => warn!(error = %e, "worker runtime cannot listen"),
                        }
                    }
                };
                handle.spawn(tracker.track_future(accepting));
            }
            tracker.spawn(accept_loop(
                listener,
                ctx,
                self.shared.clone(),
                permits.clone(),
                per_ip.clone(),
                tracker.clone(),
                ids.clone(),
            ));
        }
        self.shared.shutdown.cancelled().await;
        info!(grace = ?self.shared.config.server.shutdown_grace, "shutting down");
        tracker.close();
        if tokio::time::timeout(self.shared.config.server.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            warn!("grace period over; closing remaining sessions");
            self.shared.hard_stop.cancel();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait()).await;
        }
        admin_stop.cancel();
        info!("stopped");
    }
}

/// Reloads certificates and the users file from a (re-read) configuration.
pub struct Reloader {
    shared: SharedRef,
    resolver: Option<Arc<SniResolver>>,
}

impl Reloader {
    /// Re-reads `config`'s certificates and asks the authenticator to reload its data. On any
    /// error the running state is kept.
    ///
    /// # Errors
    /// What failed to load.
    pub fn reload(&self, config: &Config) -> Result<(), String> {
        if let (Some(resolver), Some(tls)) = (&self.resolver, &config.tls) {
            resolver.replace(CertStore::load(tls).map_err(|e| e.to_string())?);
        }
        self.shared.authn.reload().map_err(|e| e.to_string())?;
        self.shared
            .guard
            .reload(&config.guard)
            .map_err(|e| format!("guard: {e}"))?;
        self.shared.learned.clear();
        Ok(())
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: ListenerCtx,
    shared: SharedRef,
    permits: Arc<Semaphore>,
    per_ip: Arc<limiter::Limiter>,
    tracker: TaskTracker,
    ids: Arc<AtomicU64>,
) {
    let local = listener.local_addr().ok();
    let salt: u32 = rand::random();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shared.shutdown.cancelled() => return,
        };
        let (tcp, client) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let protocol = ctx.protocol.label();
        let refused = |reason: &'static str| {
            shared
                .metrics
                .connections_refused
                .get_or_create(&RefusedLabels { protocol, reason })
                .inc();
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(peer = %client, "connection cap reached; closing without greeting");
            refused("global_cap");
            drop(tcp);
            continue;
        };
        let slot = match per_ip.admit(client.ip(), std::time::Instant::now()) {
            Ok(slot) => slot,
            Err(why) => {
                debug!(peer = %client, cap = ?why, "per-IP connection cap reached; closing without greeting");
                refused(why.label());
                drop(tcp);
                continue;
            }
        };
        shared
            .metrics
            .connections
            .get_or_create(&ProtoLabels { protocol })
            .inc();
        let _ = tcp.set_nodelay(true);
        let n = ids.fetch_add(1, Ordering::Relaxed);
        let conn_ctx = ConnCtx {
            session_id: format!("{salt:08x}{n:08x}"),
            client,
            local: local.unwrap_or(client),
            accepted: tokio::time::Instant::now(),
        };
        let shared = shared.clone();
        let ctx = ctx.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let _slot = slot;
            let _active = GaugeGuard::new(
                &shared
                    .metrics
                    .connections_active
                    .get_or_create(&ProtoLabels { protocol }),
            );
            if let Some(dnsbl) = shared
                .dnsbl
                .as_ref()
                .filter(|_| !shared.guard.allowlisted(client.ip()))
            {
                // Boxed: the task would otherwise keep the lookup's state for the whole session.
                let listing = Box::pin(dnsbl.check(client.ip(), &shared.metrics)).await;
                if let Some(listing) = listing {
                    info!(event = "dnsbl", peer = %client, score = listing.score, zones = ?listing.zones, "client listed; closing without greeting");
                    shared
                        .metrics
                        .connections_refused
                        .get_or_create(&RefusedLabels {
                            protocol,
                            reason: "dnsbl",
                        })
                        .inc();
                    return;
                }
            }
            let (conn, tls) = match (ctx.tls, &ctx.acceptor) {
                (ListenerTls::Implicit, Some(acceptor)) => {
                    // Boxed here and below: a spawned task keeps the size of its largest state
                    // for its whole life, so the handshake and every other protocol's session
                    // would otherwise be paid by each idle connection.
                    let accept = Box::pin(acceptor.accept(tcp));
                    match tokio::time::timeout(ctx.handshake_timeout, accept).await {
                        Ok(Ok(stream)) => {
                            let info = crate::tls::tls_info(stream.get_ref().1);
                            (Conn::Server(Box::new(stream)), Some(info))
                        }
                        Ok(Err(e)) => {
                            debug!(peer = %client, error = %e, "TLS handshake failed");
                            tls_failed(&shared, protocol);
                            return;
                        }
                        Err(_) => {
                            debug!(peer = %client, "TLS handshake timed out");
                            tls_failed(&shared, protocol);
                            return;
                        }
                    }
                }
                _ => (Conn::Plain(tcp), None),
            };
            // Configuration validation admits only implemented protocols.
            match ctx.protocol {
                Protocol::Imap => {
                    Box::pin(crate::session::imap::run(shared, ctx, conn_ctx, conn, tls)).await;
                }
                Protocol::Pop3 => {
                    Box::pin(crate::session::pop3::run(shared, ctx, conn_ctx, conn, tls)).await;
                }
                Protocol::Submission => {
                    Box::pin(crate::session::smtp::run(shared, ctx, conn_ctx, conn, tls)).await;
                }
                Protocol::ManageSieve => {
                    Box::pin(crate::session::sieve::run(shared, ctx, conn_ctx, conn, tls)).await;
                }
                Protocol::Http => {
                    Box::pin(crate::session::http::run(shared, ctx, conn_ctx, conn, tls)).await;
                }
            }
        });
    }
}
