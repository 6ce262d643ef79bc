//! The connection script every protocol shares: greet → pre-login loop (STARTTLS and the
//! protocol's own commands) → authenticator → backend master login → splice → audit. The
//! protocol supplies its pre-login machine, its backend login machine and its splice filters.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn, Instrument};

use super::{ConnCtx, ListenerCtx, SharedRef};
use crate::authn::{AuthRequest, TlsInfo, Verdict};
use crate::backend::{ClientFacts, Connector};
use crate::config::BackendService;
use crate::identity::LogName;
use crate::proto::prelogin::{BackendMachine, Close, Event, Failure, PreLogin};
use crate::splice::{Downstream, Upstream};
use crate::stream::Conn;
use crate::Protocol;

/// What a protocol plugs into the runner.
pub struct Plug<M, B, F> {
    pub protocol: Protocol,
    /// The pre-login machine for this connection.
    pub machine: M,
    /// Builds the backend master-login machine for a canonical account.
    pub backend: B,
    /// Builds the splice filters.
    pub filters: F,
}

/// Why a session ended before login.
#[derive(Debug)]
enum Exit {
    Io,
    Timeout,
    Closed(#[allow(dead_code)] Close),
}

/// Runs one connection to its end.
pub async fn run<M, BM, B, U, D, F>(
    shared: SharedRef,
    listener: ListenerCtx,
    ctx: ConnCtx,
    conn: Conn,
    tls: Option<TlsInfo>,
    plug: Plug<M, B, F>,
) where
    M: PreLogin,
    BM: BackendMachine,
    B: Fn(&Connector, &str, BackendService) -> BM,
    U: Upstream,
    D: Downstream,
    F: FnOnce() -> (U, D),
{
    let span = tracing::info_span!("session", proto = plug.protocol.label(), peer = %ctx.client, session = %ctx.session_id);
    drive(shared, listener, ctx, conn, tls, plug)
        .instrument(span)
        .await;
}

async fn drive<M, BM, B, U, D, F>(
    shared: SharedRef,
    listener: ListenerCtx,
    ctx: ConnCtx,
    mut conn: Conn,
    mut tls: Option<TlsInfo>,
    plug: Plug<M, B, F>,
) where
    M: PreLogin,
    BM: BackendMachine,
    B: Fn(&Connector, &str, BackendService) -> BM,
    U: Upstream,
    D: Downstream,
    F: FnOnce() -> (U, D),
{
    let l = &shared.config.limits;
    let Plug {
        protocol,
        mut machine,
        backend: make_backend,
        filters,
    } = plug;
    machine.greet();
    let deadline = ctx.accepted + l.preauth_deadline;
    let mut buf = vec![0u8; 4096];

    let exit = loop {
        let event = machine.advance();
        let out = machine.take_output();
        if !out.is_empty() && conn.write_all(&out).await.is_err() {
            break Exit::Io;
        }
        match event {
            Event::NeedInput => {
                let idle = tokio::time::sleep(l.preauth_idle);
                tokio::select! {
                    r = conn.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break Exit::Io,
                        Ok(n) => machine.feed(&buf[..n]),
                    },
                    () = idle => {
                        machine.timed_out();
                        let _ = conn.write_all(&machine.take_output()).await;
                        break Exit::Timeout;
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        machine.timed_out();
                        let _ = conn.write_all(&machine.take_output()).await;
                        break Exit::Timeout;
                    }
                    () = shared.shutdown.cancelled() => {
                        machine.shutdown();
                        let _ = conn.write_all(&machine.take_output()).await;
                        break Exit::Closed(Close::Shutdown);
                    }
                }
            }
            Event::StartTls => {
                let (Conn::Plain(tcp), Some(acceptor)) = (conn, listener.acceptor.clone()) else {
                    return;
                };
                let handshake =
                    tokio::time::timeout(listener.handshake_timeout, acceptor.accept(tcp)).await;
                match handshake {
                    Ok(Ok(stream)) => {
                        tls = Some(crate::tls::tls_info(stream.get_ref().1));
                        conn = Conn::Server(Box::new(stream));
                        machine.tls_started();
                    }
                    _ => {
                        info!(event = "tls_failed", "STARTTLS handshake failed");
                        return;
                    }
                }
            }
            Event::Close(reason) => break Exit::Closed(reason),
            Event::Login {
                attempt,
                credentials,
            } => {
                let started = Instant::now();
                let credentials = match credentials {
                    Err((refusal, shown)) => {
                        info!(event = "auth", result = "refused", user = %shown, reason = ?refusal, attempt, "login refused before authentication");
                        tokio::time::sleep(shared.failure_delay()).await;
                        if let Some(Event::Close(reason)) = machine.login_failed(Failure::Rejected)
                        {
                            let _ = conn.write_all(&machine.take_output()).await;
                            break Exit::Closed(reason);
                        }
                        continue;
                    }
                    Ok(c) => c,
                };
                let mut request = AuthRequest {
                    protocol,
                    mechanism: credentials.mechanism,
                    username: credentials.username.clone(),
                    secret: credentials.secret,
                    client: ctx.client,
                    local: ctx.local,
                    tls: tls.clone(),
                    attempt,
                    session_id: ctx.session_id.clone(),
                    client_id: machine.client_id().map(str::to_owned),
                };
                let verdict = shared.authn.verify(&request).await;
                let username = std::mem::take(&mut request.username);
                let user = LogName(username.as_bytes());
                let mechanism = request.mechanism.label();
                drop(request);
                let failure = match verdict {
                    Verdict::Accept { account } => {
                        let facts = ClientFacts {
                            client: ctx.client,
                            local: ctx.local,
                            tls_version: tls.as_ref().map(|t| t.version.clone()),
                        };
                        let Some(service) = shared.config.backend.service(protocol) else {
                            return;
                        };
                        let login = make_backend(&shared.backend, &account, service);
                        match shared.backend.login(service, &facts, login).await {
                            Ok(backend) => {
                                machine.login_succeeded(&backend.capabilities);
                                if conn.write_all(&machine.take_output()).await.is_err() {
                                    return;
                                }
                                info!(event = "auth", result = "accept", %user, account = %LogName(account.as_bytes()), mechanism, attempt, authenticator = shared.authn.kind(), latency_ms = started.elapsed().as_millis() as u64, "login accepted");
                                let goodbye = machine.pipelined_goodbye();
                                let Some(leftover) = machine.take_leftover() else {
                                    let _ = conn.write_all(goodbye).await;
                                    return;
                                };
                                let stats = crate::splice::run(
                                    filters(),
                                    conn,
                                    backend.conn,
                                    leftover,
                                    backend.leftover,
                                    shared.config.limits.session_idle,
                                    shared.hard_stop.clone(),
                                )
                                .await;
                                info!(event = "session_end", account = %LogName(account.as_bytes()), to_backend = stats.to_backend, to_client = stats.to_client, end = ?stats.end, "session ended");
                                return;
                            }
                            Err(e) => {
                                warn!(event = "auth", result = "backend_failed", %user, error = %e, attempt, "backend master login failed");
                                Failure::Temporary
                            }
                        }
                    }
                    Verdict::Reject { reason, wait } => {
                        info!(event = "auth", result = "reject", %user, mechanism, attempt, reason = %reason, latency_ms = started.elapsed().as_millis() as u64, "login rejected");
                        let delay = shared.failure_delay().max(wait.unwrap_or_default());
                        tokio::time::sleep(delay.saturating_sub(started.elapsed())).await;
                        Failure::Rejected
                    }
                    Verdict::TempFail { reason } => {
                        warn!(event = "auth", result = "tempfail", %user, mechanism, attempt, reason = %reason, "authenticator could not decide");
                        Failure::Temporary
                    }
                };
                if let Some(Event::Close(reason)) = machine.login_failed(failure) {
                    let _ = conn.write_all(&machine.take_output()).await;
                    break Exit::Closed(reason);
                }
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.shutdown()).await;
    info!(event = "session_end", before_login = true, exit = ?exit, "session ended before login");
}
