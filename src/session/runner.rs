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
use crate::guard::{Decision, Outcome};
use crate::identity::LogName;
use crate::metrics::{BytesLabels, DecisionLabels, GaugeGuard, ProtoLabels};
use crate::proto::prelogin::{BackendMachine, Close, Event, Failure, PreLogin};
use crate::secret::Secret;
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
///
/// Not an `async fn`: its arguments would stay in the session's task for its whole life. They
/// go into the boxed pre-login phase here, and the returned future holds two pointers.
pub fn run<M, BM, B, U, D, F>(
    shared: SharedRef,
    listener: ListenerCtx,
    ctx: ConnCtx,
    conn: Conn,
    tls: Option<TlsInfo>,
    plug: Plug<M, B, F>,
) -> impl std::future::Future<Output = ()>
where
    M: PreLogin,
    BM: BackendMachine,
    B: Fn(&Connector, &str, BackendService) -> BM,
    U: Upstream,
    D: Downstream,
    F: FnOnce() -> (U, D),
{
    let span = tracing::info_span!("session", proto = plug.protocol.label(), peer = %ctx.client, session = %ctx.session_id, worker = crate::server::workers::current());
    // Two boxed phases (the splice boxes its own), so that a logged-in session holds only the
    // splice's state: the task keeps its largest state for its whole life, and the pre-login
    // phase is the larger one.
    let prelogin =
        Box::pin(drive(shared.clone(), listener, ctx, conn, tls, plug)).instrument(span.clone());
    async move {
        let Some(session) = prelogin.await else {
            return;
        };
        splice(shared, session).instrument(span).await;
    }
}

/// A logged-in session, handed from the pre-login phase to the splice.
struct LoggedIn<F> {
    protocol: Protocol,
    account: String,
    client: Conn,
    backend: Conn,
    /// Client bytes pipelined behind the login, for the backend.
    client_first: Vec<u8>,
    /// Backend bytes read past its login reply, for the client.
    backend_first: Vec<u8>,
    filters: F,
    /// The account's session slot, held for the life of the session.
    _slot: crate::guard::SessionPermit,
}

/// Splices a logged-in session, then counts and logs it. A plain `fn` like [`run`]: the
/// returned future holds each part of the session once.
fn splice<U, D, F>(shared: SharedRef, s: LoggedIn<F>) -> impl std::future::Future<Output = ()>
where
    U: Upstream,
    D: Downstream,
    F: FnOnce() -> (U, D),
{
    let LoggedIn {
        protocol,
        account,
        client,
        backend,
        client_first,
        backend_first,
        filters,
        _slot: slot,
    } = s;
    let spliced = GaugeGuard::new(
        &shared.metrics.sessions_spliced.get_or_create(&ProtoLabels {
            protocol: protocol.label(),
        }),
    );
    // Boxed: awaiting a captured future would move it, and the task would hold it twice.
    let spliced_session = Box::pin(crate::splice::run(
        filters(),
        client,
        backend,
        client_first,
        backend_first,
        shared.config.limits.session_idle,
        shared.hard_stop.clone(),
    ));
    async move {
        let stats = spliced_session.await;
        drop((spliced, slot));
        for (direction, n) in [
            ("to_backend", stats.to_backend),
            ("to_client", stats.to_client),
        ] {
            shared
                .metrics
                .bytes
                .get_or_create(&BytesLabels {
                    protocol: protocol.label(),
                    direction,
                })
                .inc_by(n);
        }
        info!(event = "session_end", account = %LogName(account.as_bytes()), to_backend = stats.to_backend, to_client = stats.to_client, zero_copy = stats.to_client_zero_copy, zero_copy_to_backend = stats.to_backend_zero_copy, end = ?stats.end, "session ended");
    }
}

async fn drive<M, BM, B, U, D, F>(
    shared: SharedRef,
    listener: ListenerCtx,
    ctx: ConnCtx,
    mut conn: Conn,
    mut tls: Option<TlsInfo>,
    plug: Plug<M, B, F>,
) -> Option<LoggedIn<F>>
where
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
        machine,
        backend: make_backend,
        filters,
    } = plug;
    // On the heap, and given back at login: the task keeps only what the splice needs.
    let mut machine = Box::new(machine);
    machine.greet();
    let deadline = ctx.accepted + l.preauth_deadline;
    let ip = ctx.client.ip();
    let mut buf = vec![0u8; 4096];

    let exit = loop {
        let event = machine.advance();
        let out = machine.take_output();
        if !out.is_empty()
            && send(&mut conn, &out, write_until(deadline, l.preauth_idle))
                .await
                .is_err()
        {
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
                        let _ = send(&mut conn, &machine.take_output(), write_until(deadline, l.preauth_idle)).await;
                        break Exit::Timeout;
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        machine.timed_out();
                        let _ = send(&mut conn, &machine.take_output(), write_until(deadline, l.preauth_idle)).await;
                        break Exit::Timeout;
                    }
                    () = shared.shutdown.cancelled() => {
                        machine.shutdown();
                        let _ = send(&mut conn, &machine.take_output(), write_until(deadline, l.preauth_idle)).await;
                        break Exit::Closed(Close::Shutdown);
                    }
                }
            }
            Event::StartTls => {
                let (Conn::Plain(tcp), Some(acceptor)) = (conn, listener.acceptor.clone()) else {
                    return None;
                };
                let handshake = tokio::time::timeout(
                    listener.handshake_timeout,
                    Box::pin(acceptor.accept(tcp)),
                )
                .await;
                match handshake {
                    Ok(Ok(stream)) => {
                        tls = Some(crate::tls::tls_info(stream.get_ref().1));
                        conn = Conn::Server(Box::new(stream));
                        machine.tls_started();
                    }
                    _ => {
                        info!(event = "tls_failed", "STARTTLS handshake failed");
                        return None;
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
                        shared.metrics.auth(protocol.label(), "none", "refused");
                        // A refused name is an attempt like any other for the address's windows.
                        let outcome = Box::pin(shared.guard.failed(
                            ip,
                            &shown,
                            &Secret::new(Vec::new()),
                            protocol.label(),
                        ))
                        .await;
                        count_bans(&shared, &outcome);
                        tokio::time::sleep(
                            shared.failure_delay().saturating_sub(started.elapsed()),
                        )
                        .await;
                        if let Some(Event::Close(reason)) = machine.login_failed(Failure::Rejected)
                        {
                            let _ = send(
                                &mut conn,
                                &machine.take_output(),
                                write_until(deadline, l.preauth_idle),
                            )
                            .await;
                            break Exit::Closed(reason);
                        }
                        continue;
                    }
                    Ok(c) => c,
                };
                let decided = Instant::now();
                let decision = Box::pin(shared.guard.check(ip, &credentials.username)).await;
                shared
                    .metrics
                    .guard_latency
                    .observe(decided.elapsed().as_secs_f64());
                if let Decision::Deny { reason } = decision {
                    // Banned: the authenticator is not asked, and the reply and delay are those
                    // of a wrong password.
                    shared
                        .metrics
                        .guard_decisions
                        .get_or_create(&DecisionLabels {
                            decision: "deny",
                            reason: reason.label(),
                        })
                        .inc();
                    let mechanism = credentials.mechanism.label();
                    shared.metrics.auth(protocol.label(), mechanism, "denied");
                    info!(event = "auth", result = "denied", user = %LogName(credentials.username.as_bytes()), mechanism, attempt, reason = reason.label(), "login denied by the guard");
                    drop(credentials);
                    tokio::time::sleep(shared.failure_delay().saturating_sub(started.elapsed()))
                        .await;
                    if let Some(Event::Close(reason)) = machine.login_failed(Failure::Rejected) {
                        let _ = send(
                            &mut conn,
                            &machine.take_output(),
                            write_until(deadline, l.preauth_idle),
                        )
                        .await;
                        break Exit::Closed(reason);
                    }
                    continue;
                }
                shared
                    .metrics
                    .guard_decisions
                    .get_or_create(&DecisionLabels {
                        decision: "allow",
                        reason: "ok",
                    })
                    .inc();
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
                let verdict = Box::pin(shared.authn.verify(&request)).await;
                if matches!(verdict, Verdict::Reject { .. }) {
                    let outcome = Box::pin(shared.guard.failed(
                        ip,
                        &request.username,
                        &request.secret,
                        protocol.label(),
                    ))
                    .await;
                    count_bans(&shared, &outcome);
                }
                let username = std::mem::take(&mut request.username);
                let user = LogName(username.as_bytes());
                let authenticator = shared.authn.kind_for(request.mechanism);
                let mechanism = request.mechanism.label();
                drop(request);
                let failure = match verdict {
                    Verdict::Accept { account } => {
                        Box::pin(shared.guard.succeeded(ip, &account)).await;
                        if !username.eq_ignore_ascii_case(&account) {
                            // Failures were counted under the name as typed ("alice"): the
                            // success must clear and vouch for that key too.
                            Box::pin(shared.guard.succeeded(ip, &username)).await;
                        }
                        let Some(session) = shared.guard.session(&account) else {
                            warn!(event = "auth", result = "session_cap", %user, account = %LogName(account.as_bytes()), "too many sessions for this account");
                            shared
                                .metrics
                                .auth(protocol.label(), mechanism, "session_cap");
                            if let Some(Event::Close(reason)) =
                                machine.login_failed(Failure::Temporary)
                            {
                                let _ = send(
                                    &mut conn,
                                    &machine.take_output(),
                                    write_until(deadline, l.preauth_idle),
                                )
                                .await;
                                break Exit::Closed(reason);
                            }
                            continue;
                        };
                        let facts = ClientFacts {
                            client: ctx.client,
                            local: ctx.local,
                            tls_version: tls.as_ref().map(|t| t.version.clone()),
                        };
                        let service = shared.config.backend.service(protocol)?;
                        let login = make_backend(&shared.backend, &account, service);
                        match Box::pin(shared.backend.login(service, &facts, login)).await {
                            Ok(backend) => {
                                machine.login_succeeded(&backend.capabilities);
                                if send(
                                    &mut conn,
                                    &machine.take_output(),
                                    write_until(deadline, l.preauth_idle),
                                )
                                .await
                                .is_err()
                                {
                                    return None;
                                }
                                shared.metrics.auth(protocol.label(), mechanism, "accept");
                                observe_latency(&shared, protocol, started);
                                info!(event = "auth", result = "accept", %user, account = %LogName(account.as_bytes()), mechanism, attempt, authenticator, latency_ms = started.elapsed().as_millis() as u64, "login accepted");
                                let goodbye = machine.pipelined_goodbye();
                                // The pre-login read buffer is not needed any more.
                                drop(std::mem::take(&mut buf));
                                let Some(leftover) = (*machine).take_leftover() else {
                                    let _ = send(
                                        &mut conn,
                                        goodbye,
                                        write_until(deadline, l.preauth_idle),
                                    )
                                    .await;
                                    return None;
                                };
                                return Some(LoggedIn {
                                    protocol,
                                    account,
                                    client: conn,
                                    backend: backend.conn,
                                    client_first: leftover,
                                    backend_first: backend.leftover,
                                    filters,
                                    _slot: session,
                                });
                            }
                            Err(e) => {
                                warn!(event = "auth", result = "backend_failed", %user, error = %e, attempt, "backend master login failed");
                                shared
                                    .metrics
                                    .auth(protocol.label(), mechanism, "backend_failed");
                                Failure::Temporary
                            }
                        }
                    }
                    Verdict::Reject { reason, wait } => {
                        info!(event = "auth", result = "reject", %user, mechanism, attempt, reason = %reason, latency_ms = started.elapsed().as_millis() as u64, "login rejected");
                        shared.metrics.auth(protocol.label(), mechanism, "reject");
                        observe_latency(&shared, protocol, started);
                        let delay = shared.failure_delay().max(wait.unwrap_or_default());
                        tokio::time::sleep(delay.saturating_sub(started.elapsed())).await;
                        Failure::Rejected
                    }
                    Verdict::TempFail { reason } => {
                        warn!(event = "auth", result = "tempfail", %user, mechanism, attempt, reason = %reason, "authenticator could not decide");
                        shared.metrics.auth(protocol.label(), mechanism, "tempfail");
                        Failure::Temporary
                    }
                };
                if let Some(Event::Close(reason)) = machine.login_failed(failure) {
                    let _ = send(
                        &mut conn,
                        &machine.take_output(),
                        write_until(deadline, l.preauth_idle),
                    )
                    .await;
                    break Exit::Closed(reason);
                }
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.shutdown()).await;
    info!(event = "session_end", before_login = true, exit = ?exit, "session ended before login");
    None
}

fn observe_latency(shared: &SharedRef, protocol: Protocol, started: Instant) {
    shared
        .metrics
        .auth_latency
        .get_or_create(&ProtoLabels {
            protocol: protocol.label(),
        })
        .observe(started.elapsed().as_secs_f64());
}

fn count_bans(shared: &SharedRef, outcome: &Outcome) {
    shared
        .metrics
        .guard_bans_started
        .inc_by(outcome.bans.len() as u64);
}

/// Writes and flushes (a TLS stream may otherwise hold the tail of what was written).
/// Writes pre-login output within the pre-login limits (see [`write_until`]).
async fn send(conn: &mut Conn, bytes: &[u8], until: tokio::time::Instant) -> std::io::Result<()> {
    let write = async {
        conn.write_all(bytes).await?;
        conn.flush().await
    };
    tokio::time::timeout_at(until, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// How long a pre-login write may take: a client that stops reading (its window full of
/// answers to pipelined commands) is held no longer than one that stops sending, and never
/// past the pre-login deadline.
fn write_until(deadline: tokio::time::Instant, idle: std::time::Duration) -> tokio::time::Instant {
    deadline.min(tokio::time::Instant::now() + idle)
}
