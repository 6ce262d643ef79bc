//! The HTTP driver: one hyper connection (HTTP/1.1 or HTTP/2, chosen by ALPN) per client, and
//! for every request on it the same script:
//!
//! hygiene (framing, duplicated identity) → credentials (Basic header or Stalwart's JSON login
//! form) → identity rules → guard → authenticator (or the short positive cache) → the request
//! re-written for the master login of the canonical account → forwarded, bodies streamed.
//!
//! Nothing about identity survives from one request to the next: keep-alive and HTTP/2 streams
//! never carry a login, each request proves itself again (the cache only saves the hashing).

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{debug, info, warn, Instrument};

use super::{ConnCtx, ListenerCtx, SharedRef};
use crate::authn::{AuthRequest, TlsInfo, Verdict};
use crate::backend::ClientFacts;
use crate::config::{BackendTls, HttpConfig, ProxyProtocol};
use crate::guard::Decision;
use crate::identity::LogName;
use crate::metrics::DecisionLabels;
use crate::proto::http::{self as proto, Authorization};
use crate::secret::Secret;
use crate::stream::Conn;
use crate::Protocol;

/// Bodies in both directions: streamed, never collected (except the small login form).
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Most header fields in one request (SECURITY.md).
const MAX_HEADERS: usize = 100;
/// Header block limit (SECURITY.md: 16 KiB); hyper's buffer bound covers request line + headers.
const MAX_HEAD: usize = 16 * 1024;
/// HTTP/2 concurrent streams per connection (SECURITY.md).
const MAX_STREAMS: u32 = 100;
/// Longest User-Agent passed to the authenticator as the client's self-description.
const MAX_CLIENT_ID: usize = 128;
/// Most idle backend connections one client connection keeps when PROXY v2 ties backend
/// connections to it.
const PER_CLIENT_IDLE: usize = 4;

/// The listener-wide HTTP state: the pooled backend clients and the positive auth cache.
pub struct HttpState {
    /// One pooled client per runtime (see [`HttpState::client`]).
    clients: Vec<Client<HttpConnector, Body>>,
    cache: Option<moka::sync::Cache<[u8; 32], Arc<str>>>,
    cache_key: [u8; 32],
}

impl HttpState {
    /// `runtimes`: how many runtimes serve the listener (`ServerConfig::runtimes`).
    pub fn new(cfg: &HttpConfig, runtimes: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let clients = (0..runtimes.max(1))
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .pool_max_idle_per_host(cfg.backend_pool_idle)
                    .pool_timer(TokioTimer::new())
                    .build(connector.clone())
            })
            .collect();
        let cache = (!cfg.auth_cache_ttl.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cfg.auth_cache_ttl)
                .build()
        });
        Self {
            clients,
            cache,
            cache_key: rand::random(),
        }
    }

    /// The calling runtime's client. A pooled backend connection is driven by a task on the
    /// runtime that opened it; sharing one pool across per-core runtimes would make every
    /// other runtime's requests wake that thread (as the authenticator's pool avoids too).
    fn client(&self) -> &Client<HttpConnector, Body> {
        let i = crate::server::workers::current() % self.clients.len();
        &self.clients[i]
    }

    /// The name a bearer token's failures are counted under by the guard: `bearer-` and 16 hex
    /// digits of a keyed hash of the token (never the token).
    fn token_guard_name(&self, token: &Secret) -> String {
        let digest = self.cache_key("", token);
        let mut name = String::from("bearer-");
        for b in &digest[..8] {
            name.push_str(&format!("{b:02x}"));
        }
        name
    }

    /// The cache key: HMAC of user and password under a per-process random key, so the cache
    /// never holds a password nor a hash that could be attacked offline after a memory dump.
    fn cache_key(&self, user: &str, password: &Secret) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        // HMAC takes keys of any length, so this cannot fail; a fixed key would still work.
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.cache_key)
            .unwrap_or_else(|_| <hmac::Hmac<sha2::Sha256> as KeyInit>::new(&Default::default()));
        mac.update(&(user.len() as u64).to_be_bytes());
        mac.update(user.as_bytes());
        mac.update(password.expose());
        mac.finalize().into_bytes().into()
    }
}

/// Backend connections owned by one client connection, used when PROXY v2 is on (each backend
/// connection's header names this client, so it must never serve another) and for a TLS backend
/// (the connection comes from the same [`crate::backend::Connector`] as the mail protocols', with
/// its certificate verification).
struct OwnPool {
    facts: ClientFacts,
    idle: Arc<Mutex<Vec<hyper::client::conn::http1::SendRequest<Body>>>>,
}

/// What every request of one client connection shares.
struct ConnState {
    shared: SharedRef,
    ctx: ConnCtx,
    tls: Option<TlsInfo>,
    own: Option<OwnPool>,
    attempts: AtomicU32,
    /// Failed authentications on this connection (see [`ConnState::failed`]).
    failures: AtomicU32,
    /// One authentication at a time per connection: the streams of one HTTP/2 connection
    /// cannot all pass the guard before the first of them has failed.
    auth_turn: tokio::sync::Mutex<()>,
    /// Fired at `limits.max_auth_failures`: the connection is closed (HTTP/2: GOAWAY).
    enough: tokio_util::sync::CancellationToken,
}

impl ConnState {
    /// Counts a failed authentication; at the limit the connection is closed, as a mail
    /// protocol session is after the same number of failures.
    fn failed(&self) {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n >= self.shared.config.limits.max_auth_failures {
            self.enough.cancel();
        }
    }

    fn too_many_failures(&self) -> bool {
        self.failures.load(Ordering::Relaxed) >= self.shared.config.limits.max_auth_failures
    }
}

/// Serves one client connection until it closes, the client goes idle, or shutdown.
pub async fn run(
    shared: SharedRef,
    _listener: ListenerCtx,
    ctx: ConnCtx,
    conn: Conn,
    tls: Option<TlsInfo>,
) {
    let span = tracing::info_span!("session", proto = "http", peer = %ctx.client, session = %ctx.session_id);
    serve(shared, ctx, conn, tls).instrument(span).await;
}

async fn serve(shared: SharedRef, ctx: ConnCtx, conn: Conn, tls: Option<TlsInfo>) {
    let cfg = &shared.config.http;
    let tls_backend = shared
        .config
        .backend
        .http
        .is_some_and(|s| s.tls == BackendTls::Implicit);
    let own =
        (shared.backend.proxy_protocol() == ProxyProtocol::V2 || tls_backend).then(|| OwnPool {
            facts: ClientFacts {
                client: ctx.client,
                local: ctx.local,
                tls_version: tls.as_ref().map(|t| t.version.clone()),
            },
            idle: Arc::new(Mutex::new(Vec::new())),
        });
    let state = Arc::new(ConnState {
        shared: shared.clone(),
        ctx,
        tls,
        own,
        attempts: AtomicU32::new(0),
        failures: AtomicU32::new(0),
        auth_turn: tokio::sync::Mutex::new(()),
        enough: tokio_util::sync::CancellationToken::new(),
    });
    let enough = state.enough.clone();
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(MAX_HEAD.max(8192))
        .max_headers(MAX_HEADERS)
        .half_close(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEAD as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let h2 = match &conn {
        Conn::Server(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        _ => false,
    };
    let io = Scanned {
        inner: conn,
        scanner: (!h2).then(proto::Http1Scanner::default),
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        r = connection.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "http connection ended with an error");
            }
            return;
        }
        () = shared.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
        }
        () = enough.cancelled() => {
            info!(event = "http_closed", reason = "too many failed authentications", "closing the connection");
            connection.as_mut().graceful_shutdown();
        }
    }
    tokio::select! {
        _ = connection.as_mut() => {}
        () = shared.hard_stop.cancelled() => {}
    }
}

/// The client connection with the HTTP/1 framing scanner in its read path (see
/// [`proto::Http1Scanner`]): a refused construct fails the read, and hyper closes the connection
/// without answering, before the request is dispatched.
struct Scanned {
    inner: Conn,
    scanner: Option<proto::Http1Scanner>,
}

impl tokio::io::AsyncRead for Scanned {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (std::task::Poll::Ready(Ok(())), Some(scanner)) = (&r, this.scanner.as_mut()) {
            if let Err(e) = scanner.feed(&buf.filled()[before..]) {
                info!(event = "http_refused", reason = %e, "framing refused; closing the connection");
                this.scanner = None;
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e,
                )));
            }
        }
        r
    }
}

impl tokio::io::AsyncWrite for Scanned {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What authentication decided for one request.
enum Authn {
    /// Forward as the master login for this canonical account.
    Account(String),
    /// Forward without credentials (an anonymous path), or with the client's bearer token for
    /// an anonymous OAuth endpoint, which Stalwart checks itself.
    Anonymous,
    /// 401 with `WWW-Authenticate`.
    Unauthorized,
    /// 503: the authenticator could not decide.
    Unavailable,
}

async fn handle(state: &ConnState, req: Request<Incoming>) -> Response<Body> {
    let shared = &state.shared;
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if let Err(e) = proto::check_headers(req.headers(), target_len) {
        info!(event = "http_refused", reason = %e, "request refused before authentication");
        shared.metrics.auth("http", "none", "protocol_error");
        let status = if e == proto::Hygiene::TargetTooLong {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::BAD_REQUEST
        };
        return close(local(status, "bad request\n"), req.version());
    }
    let path = req.uri().path().to_owned();
    let is_login_form = req.method() == Method::POST && path == "/api/auth";
    let anonymous = proto::is_anonymous(&path, &shared.config.http.anonymous_paths);
    let oauth_endpoint =
        req.method() == Method::POST && shared.config.http.oauth_endpoints.contains(&path);

    let (mut parts, body) = req.into_parts();
    let (authn, req) = if is_login_form {
        parts.headers.remove(header::AUTHORIZATION);
        match login_form(state, body).await {
            Ok((Authn::Unauthorized, _)) => {
                // A JSON answer without WWW-Authenticate: the login page reads it, and a browser
                // must not pop up its own password dialog.
                let mut r = local(StatusCode::UNAUTHORIZED, "{\"type\":\"failure\"}");
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return r;
            }
            Ok((authn, form)) => {
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(form.len()));
                (
                    authn,
                    Request::from_parts(
                        parts,
                        Full::new(form).map_err(|never| match never {}).boxed(),
                    ),
                )
            }
            Err(response) => return response,
        }
    } else {
        let authz = parts.headers.get(header::AUTHORIZATION);
        let authn = match authz.map(|v| proto::parse_authorization(v.as_bytes())) {
            None if anonymous => Authn::Anonymous,
            None => Authn::Unauthorized,
            // Without token validation configured, a token on an anonymous path is the
            // backend's business (its own OAuth endpoints); it never authorizes anything else.
            Some(Ok(Authorization::Bearer(_))) if anonymous && !shared.sasl.takes_tokens() => {
                Authn::Anonymous
            }
            Some(Ok(Authorization::Bearer(token))) if shared.sasl.takes_tokens() => {
                let agent = user_agent(&parts.headers);
                match authenticate(state, None, token, agent, "bearer").await {
                    // On an anonymous path a valid token is forwarded as it came.
                    Authn::Account(_) if anonymous => Authn::Anonymous,
                    other => other,
                }
            }
            Some(Ok(Authorization::Bearer(_) | Authorization::Other)) => Authn::Unauthorized,
            Some(Err(e)) => {
                let started = Instant::now();
                let mechanism = if e == proto::BasicError::Token {
                    "bearer"
                } else {
                    "basic"
                };
                info!(event = "auth", result = "refused", mechanism, reason = %e, "malformed credentials");
                shared.metrics.auth("http", mechanism, "refused");
                tokio::time::sleep(shared.failure_delay().saturating_sub(started.elapsed())).await;
                Authn::Unauthorized
            }
            Some(Ok(Authorization::Basic(creds))) => {
                let agent = user_agent(&parts.headers);
                authenticate(state, Some(&creds.user), creds.password, agent, "basic").await
            }
        };
        (authn, Request::from_parts(parts, body.boxed()))
    };
    let account = match authn {
        Authn::Account(account) => Some(account),
        Authn::Anonymous => None,
        Authn::Unauthorized => return unauthorized(&shared.config.http.realm),
        Authn::Unavailable => {
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                "authentication temporarily unavailable\n",
            )
        }
    };
    if oauth_endpoint {
        if let Some(denied) = oauth_endpoint_denied(state).await {
            return denied;
        }
    }
    let account_log = account.clone();
    match forward(state, req, account).await {
        Ok(resp) if oauth_endpoint => watch_oauth_answer(state, resp).await,
        Ok(resp) => resp,
        Err(ForwardError::SessionCap) => {
            warn!(event = "auth", result = "session_cap", account = %LogName(account_log.as_deref().unwrap_or("").as_bytes()), "too many concurrent requests for this account");
            shared.metrics.auth("http", "basic", "session_cap");
            let mut r = local(
                StatusCode::TOO_MANY_REQUESTS,
                "too many concurrent sessions for this account\n",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
        Err(e) => {
            warn!(event = "http_backend", error = %e, account = %LogName(account_log.as_deref().unwrap_or("").as_bytes()), "backend request failed");
            local(StatusCode::BAD_GATEWAY, "backend unavailable\n")
        }
    }
}

/// Largest token-endpoint error answer read to classify it; larger ones pass unread.
const MAX_OAUTH_ERROR_BODY: usize = 16 * 1024;

/// The name the guard counts token-endpoint failures under: one per client address, so that the
/// account windows act per address and a ban never locks other addresses out of the endpoint.
fn oauth_endpoint_name(ip: IpAddr) -> String {
    format!("oauth-endpoint-{}", ip.to_string().replace(':', "-"))
}

/// An address the guard denies gets the token endpoint's own refusal, after the uniform delay,
/// without reaching the authorization server.
async fn oauth_endpoint_denied(state: &ConnState) -> Option<Response<Body>> {
    let shared = &state.shared;
    let started = Instant::now();
    let ip = state.ctx.client.ip();
    let Decision::Deny { reason } = shared.guard.check(ip, &oauth_endpoint_name(ip)).await else {
        return None;
    };
    info!(
        event = "auth",
        result = "denied",
        mechanism = "oauth_endpoint",
        reason = reason.label(),
        "token endpoint request denied by the guard"
    );
    shared.metrics.auth("http", "oauth_endpoint", "denied");
    tokio::time::sleep(shared.failure_delay().saturating_sub(started.elapsed())).await;
    let mut r = local(StatusCode::BAD_REQUEST, "{\"error\":\"invalid_grant\"}");
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Some(r)
}

/// Reads a token endpoint's error answer (bounded) and feeds the attack signals in it to the
/// guard; the answer goes to the client unchanged.
async fn watch_oauth_answer(state: &ConnState, resp: Response<Body>) -> Response<Body> {
    if !matches!(resp.status().as_u16(), 400 | 401) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = match Limited::new(body, MAX_OAUTH_ERROR_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return local(StatusCode::BAD_GATEWAY, "backend answer unreadable\n");
        }
    };
    if let Some(signal) = proto::oauth_failure(parts.status.as_u16(), &bytes) {
        let shared = &state.shared;
        let ip = state.ctx.client.ip();
        // A fresh value per failure: each one counts (the repeat tolerance is for passwords).
        let mut nonce = vec![0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut nonce[..]);
        let outcome = shared
            .guard
            .failed(ip, &oauth_endpoint_name(ip), &Secret::new(nonce), "http")
            .await;
        shared
            .metrics
            .guard_bans_started
            .inc_by(outcome.bans.len() as u64);
        shared.metrics.auth("http", "oauth_endpoint", "reject");
        info!(
            event = "auth",
            result = "reject",
            mechanism = "oauth_endpoint",
            reason = signal,
            "token endpoint refused the client"
        );
    }
    Response::from_parts(
        parts,
        Full::new(bytes).map_err(|never| match never {}).boxed(),
    )
}

/// Reads and checks Stalwart's JSON login form (`POST /api/auth`, bounded) and authenticates
/// its credentials like a Basic header; on success the body to forward is the form rewritten
/// for the master login of the canonical account.
async fn login_form(state: &ConnState, body: Incoming) -> Result<(Authn, Bytes), Response<Body>> {
    // Bounded in time like a request head: a client announcing a form and sending it slowly
    // (or never) holds its connection no longer than one sending a head slowly.
    let limit = state.shared.config.http.header_read_timeout;
    let collect = Limited::new(body, proto::MAX_LOGIN_FORM).collect();
    let bytes = match tokio::time::timeout(limit, collect).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(_)) => {
            return Err(local(
                StatusCode::PAYLOAD_TOO_LARGE,
                "login form too large\n",
            ))
        }
        Err(_) => {
            info!(
                event = "http_refused",
                reason = "login form not received in time",
                "login form refused"
            );
            return Err(local(
                StatusCode::REQUEST_TIMEOUT,
                "login form not received in time\n",
            ));
        }
    };
    let form = match proto::parse_login_form(&bytes) {
        Ok(f) => f,
        Err(e) => {
            info!(event = "http_refused", reason = %e, "login form refused");
            return Err(local(StatusCode::BAD_REQUEST, "bad login form\n"));
        }
    };
    drop(bytes);
    let authn = authenticate(
        state,
        Some(&form.account_name),
        Secret::new(form.account_secret.expose().to_vec()),
        None,
        "form",
    )
    .await;
    let body = match &authn {
        Authn::Account(account) => {
            Bytes::copy_from_slice(&state.shared.backend.http_master_form(&form, account))
        }
        _ => Bytes::new(),
    };
    Ok((authn, body))
}

/// One credential through identity rules, guard, cache and authenticator: a Basic or login-form
/// password (`user` given), or a bearer token (`user` is `None`: the token names its owner).
///
/// A token has no claimed name for the guard to count failures by, so it is counted under a
/// name derived from a keyed hash of the token: repeating one stale token counts once, and many
/// different wrong tokens from one address look like password spraying, which is what they are.
///
/// A connection authenticates one request at a time, and `limits.max_auth_failures` failures
/// close it, as they end a mail protocol session.
async fn authenticate(
    state: &ConnState,
    user: Option<&[u8]>,
    password: Secret,
    client_id: Option<String>,
    mechanism: &'static str,
) -> Authn {
    let shared = &state.shared;
    let started = Instant::now();
    let ip: IpAddr = state.ctx.client.ip();
    let _turn = state.auth_turn.lock().await;
    if state.too_many_failures() {
        // The connection is closing; streams already open get no further attempt.
        shared.metrics.auth("http", mechanism, "denied");
        tokio::time::sleep(shared.failure_delay()).await;
        return Authn::Unauthorized;
    }
    let attempt = state
        .attempts
        .fetch_add(1, Ordering::Relaxed)
        .saturating_add(1);
    let token_name;
    let user = match user {
        Some(u) => u,
        None => {
            token_name = shared.http.token_guard_name(&password);
            token_name.as_bytes()
        }
    };
    let username = match shared.rules.validate(user) {
        Ok(u) => u.to_owned(),
        Err(e) => {
            let shown = String::from_utf8_lossy(user).into_owned();
            info!(event = "auth", result = "refused", user = %LogName(user), reason = %e, attempt, mechanism, "login refused before authentication");
            shared.metrics.auth("http", mechanism, "refused");
            let outcome = shared
                .guard
                .failed(ip, &shown, &Secret::new(Vec::new()), "http")
                .await;
            state.failed();
            shared
                .metrics
                .guard_bans_started
                .inc_by(outcome.bans.len() as u64);
            tokio::time::sleep(shared.failure_delay().saturating_sub(started.elapsed())).await;
            return Authn::Unauthorized;
        }
    };
    let decided = Instant::now();
    let decision = shared.guard.check(ip, &username).await;
    shared
        .metrics
        .guard_latency
        .observe(decided.elapsed().as_secs_f64());
    if let Decision::Deny { reason } = decision {
        shared
            .metrics
            .guard_decisions
            .get_or_create(&DecisionLabels {
                decision: "deny",
                reason: reason.label(),
            })
            .inc();
        shared.metrics.auth("http", mechanism, "denied");
        info!(event = "auth", result = "denied", user = %LogName(username.as_bytes()), mechanism, attempt, reason = reason.label(), "login denied by the guard");
        state.failed();
        tokio::time::sleep(shared.failure_delay().saturating_sub(started.elapsed())).await;
        return Authn::Unauthorized;
    }
    shared
        .metrics
        .guard_decisions
        .get_or_create(&DecisionLabels {
            decision: "allow",
            reason: "ok",
        })
        .inc();
    let http = &shared.http;
    let is_token = mechanism == "bearer";
    // Tokens are cached by the `oauth` authenticator, until shortly before they expire.
    let key = http
        .cache
        .as_ref()
        .filter(|_| !is_token)
        .map(|_| http.cache_key(&username, &password));
    if let (Some(cache), Some(key)) = (&http.cache, &key) {
        if let Some(account) = cache.get(key) {
            shared.metrics.auth("http", mechanism, "accept_cached");
            debug!(event = "auth", result = "accept", cached = true, user = %LogName(username.as_bytes()), account = %LogName(account.as_bytes()), "login accepted from the cache");
            return Authn::Account(account.to_string());
        }
    }
    let request = AuthRequest {
        protocol: Protocol::Http,
        mechanism: if is_token {
            crate::sasl::Mechanism::Bearer
        } else {
            crate::sasl::Mechanism::Plain
        },
        username: if is_token {
            String::new()
        } else {
            username.clone()
        },
        secret: password,
        client: state.ctx.client,
        local: state.ctx.local,
        tls: state.tls.clone(),
        attempt,
        session_id: state.ctx.session_id.clone(),
        client_id,
    };
    let verdict = shared.authn.verify(&request).await;
    let user = LogName(username.as_bytes());
    let latency_ms = started.elapsed().as_millis() as u64;
    shared
        .metrics
        .auth_latency
        .get_or_create(&crate::metrics::ProtoLabels { protocol: "http" })
        .observe(started.elapsed().as_secs_f64());
    match verdict {
        Verdict::Accept { account } => {
            shared.guard.succeeded(ip, &account).await;
            shared.metrics.auth("http", mechanism, "accept");
            info!(event = "auth", result = "accept", %user, account = %LogName(account.as_bytes()), mechanism, attempt, authenticator = shared.authn.kind_for(request.mechanism), latency_ms, "login accepted");
            if let (Some(cache), Some(key)) = (&http.cache, key) {
                cache.insert(key, Arc::from(account.as_str()));
            }
            Authn::Account(account)
        }
        Verdict::Reject { reason, wait } => {
            let outcome = shared
                .guard
                .failed(ip, &username, &request.secret, "http")
                .await;
            state.failed();
            shared
                .metrics
                .guard_bans_started
                .inc_by(outcome.bans.len() as u64);
            info!(event = "auth", result = "reject", %user, mechanism, attempt, reason = %reason, latency_ms, "login rejected");
            shared.metrics.auth("http", mechanism, "reject");
            let delay = shared.failure_delay().max(wait.unwrap_or_default());
            tokio::time::sleep(delay.saturating_sub(started.elapsed())).await;
            Authn::Unauthorized
        }
        Verdict::TempFail { reason } => {
            warn!(event = "auth", result = "tempfail", %user, mechanism, attempt, reason = %reason, "authenticator could not decide");
            shared.metrics.auth("http", mechanism, "tempfail");
            Authn::Unavailable
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and everything a client could use to speak for the
/// proxy: removed from every forwarded request, then the forwarding facts are set afresh.
const STRIPPED: [HeaderName; 12] = [
    header::CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::FORWARDED,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-proto"),
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(STRIPPED.iter()) {
        headers.remove(name);
    }
    headers.remove(HeaderName::from_static("x-forwarded-host"));
}

/// True for an HTTP/1.1 WebSocket upgrade request (JMAP over WebSocket, RFC 8887).
fn is_websocket<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("backend timed out")]
    Timeout,
    #[error("backend request: {0}")]
    Client(#[from] hyper_util::client::legacy::Error),
    #[error("backend connection: {0}")]
    Conn(#[from] hyper::Error),
    #[error("backend connect: {0}")]
    Connect(#[from] crate::backend::ConnectError),
    #[error("no HTTP backend configured")]
    NoBackend,
    #[error("bad request target")]
    Target,
    #[error("too many concurrent requests for this account")]
    SessionCap,
}

async fn forward(
    state: &ConnState,
    mut req: Request<Body>,
    account: Option<String>,
) -> Result<Response<Body>, ForwardError> {
    let shared = &state.shared;
    let service = shared
        .config
        .backend
        .service(Protocol::Http)
        .ok_or(ForwardError::NoBackend)?;
    // A request in flight (or an upgraded WebSocket) holds one of the account's session slots,
    // shared with its mail sessions: `guard.account_sessions` bounds what one stolen password
    // can open at once, whatever the protocol.
    let permit = match &account {
        Some(a) => Some(shared.guard.session(a).ok_or(ForwardError::SessionCap)?),
        None => None,
    };
    let websocket = is_websocket(&req);
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let authority = parts.uri.authority().map(ToString::to_string);
    let client_version = parts.version;
    strip_hop_by_hop(&mut parts.headers);
    if parts.headers.get(header::HOST).is_none() {
        if let Some(a) = authority
            .as_deref()
            .and_then(|a| HeaderValue::from_str(a).ok())
        {
            parts.headers.insert(header::HOST, a);
        }
    }
    match &account {
        Some(account) => {
            let mut v = HeaderValue::from_bytes(&shared.backend.http_master_basic(account))
                .map_err(|_| ForwardError::Target)?;
            v.set_sensitive(true);
            parts.headers.insert(header::AUTHORIZATION, v);
        }
        None => {
            // Only a bearer token on an anonymous path gets here with a header: Stalwart checks it.
            if !parts.headers.get(header::AUTHORIZATION).is_some_and(|v| {
                matches!(
                    proto::parse_authorization(v.as_bytes()),
                    Ok(Authorization::Bearer(_))
                )
            }) {
                parts.headers.remove(header::AUTHORIZATION);
            }
        }
    }
    let ip = state.ctx.client.ip();
    let proto_name = if state.tls.is_some() { "https" } else { "http" };
    let for_value = match ip {
        IpAddr::V4(v4) => format!("for={v4};proto={proto_name}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={proto_name}"),
    };
    for (name, value) in [
        (header::FORWARDED, for_value),
        (HeaderName::from_static("x-forwarded-for"), ip.to_string()),
        (HeaderName::from_static("x-real-ip"), ip.to_string()),
        (
            HeaderName::from_static("x-forwarded-proto"),
            proto_name.to_owned(),
        ),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            parts.headers.insert(name, v);
        }
    }
    if websocket {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = Uri::builder()
        .scheme(if service.tls == BackendTls::Implicit {
            "https"
        } else {
            "http"
        })
        .authority(format!(
            "{}:{}",
            authority_host(shared.backend.host()),
            service.port
        ))
        .path_and_query(pq)
        .build()
        .map_err(|_| ForwardError::Target)?;
    parts.version = Version::HTTP_11;
    let upstream = Request::from_parts(parts, body);
    let timeout = shared.config.http.backend_timeout;
    let mut resp = match &state.own {
        None => tokio::time::timeout(timeout, shared.http.client().request(upstream))
            .await
            .map_err(|_| ForwardError::Timeout)??,
        Some(own) => tokio::time::timeout(timeout, send_own(state, own, upstream))
            .await
            .map_err(|_| ForwardError::Timeout)??,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            let hard_stop = shared.hard_stop.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let (Ok(c), Ok(b)) = (client_upgrade.await, backend_upgrade.await) else {
                    return;
                };
                let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut c, &mut b) => {}
                    () = hard_stop.cancelled() => {}
                }
            });
            return Ok(resp.map(|_| empty()));
        }
        return Ok(local(StatusCode::BAD_GATEWAY, "unexpected upgrade\n"));
    }
    if account.is_some() && resp.status() == StatusCode::UNAUTHORIZED {
        // The backend refused the master login: never "wrong password" for the client (it
        // proved its password here), and loud for the operator.
        warn!(event = "http_backend", result = "master_refused", account = %LogName(account.as_deref().unwrap_or("").as_bytes()), "backend refused the master login");
        shared.metrics.auth("http", "basic", "backend_failed");
        return Ok(local(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend login failed\n",
        ));
    }
    strip_hop_by_hop(resp.headers_mut());
    if client_version != Version::HTTP_11 && client_version != Version::HTTP_10 {
        resp.headers_mut().remove(header::UPGRADE);
    }
    Ok(resp.map(BodyExt::boxed))
}

/// Sends on a backend connection owned by this client connection (PROXY v2 on), opening one
/// when none is idle.
async fn send_own(
    state: &ConnState,
    own: &OwnPool,
    req: Request<Body>,
) -> Result<Response<Incoming>, ForwardError> {
    let pooled = {
        let mut idle = own
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut found = None;
        while let Some(s) = idle.pop() {
            if s.is_ready() {
                found = Some(s);
                break;
            }
        }
        found
    };
    let mut sender = match pooled {
        Some(s) => s,
        None => {
            let service = state
                .shared
                .config
                .backend
                .service(Protocol::Http)
                .ok_or(ForwardError::NoBackend)?;
            let tcp = state
                .shared
                .backend
                .http_connect(service, &own.facts)
                .await?;
            let (sender, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(TokioIo::new(tcp))
                .await?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            sender
        }
    };
    let resp = sender.send_request(req).await?;
    let idle = own.idle.clone();
    tokio::spawn(async move {
        if sender.ready().await.is_ok() {
            let mut idle = idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if idle.len() < PER_CLIENT_IDLE {
                idle.push(sender);
            }
        }
    });
    Ok(resp)
}

/// `host` for a URI authority (IPv6 literals in brackets).
fn authority_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn user_agent(headers: &HeaderMap) -> Option<String> {
    headers.get(header::USER_AGENT).map(|v| {
        v.as_bytes()
            .iter()
            .take(MAX_CLIENT_ID)
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '?'
                }
            })
            .collect()
    })
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

fn local(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Adds `Connection: close` on HTTP/1 (after a framing error the rest of the stream cannot be
/// trusted); HTTP/2 has no such header and its framing is not ambiguous.
fn close(mut r: Response<Body>, version: Version) -> Response<Body> {
    if version == Version::HTTP_11 || version == Version::HTTP_10 {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn unauthorized(realm: &str) -> Response<Body> {
    let mut r = local(StatusCode::UNAUTHORIZED, "authentication required\n");
    if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\"")) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_forwarding_headers_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic eDp5"),
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-host", "evil"),
            ("te", "trailers"),
            ("depth", "1"),
            ("authorization", "Basic x"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "depth"]);
    }

    #[test]
    fn ipv6_backend_hosts_are_bracketed() {
        assert_eq!(authority_host("::1"), "[::1]");
        assert_eq!(authority_host("[::1]"), "[::1]");
        assert_eq!(authority_host("stalwart.internal"), "stalwart.internal");
    }

    #[test]
    fn user_agent_is_bounded_and_printable() {
        let mut h = HeaderMap::new();
        let mut long = b"DAVx5/4.4 \xff".to_vec();
        long.extend_from_slice(&[b'a'; 300]);
        h.insert(header::USER_AGENT, HeaderValue::from_bytes(&long).unwrap());
        let ua = user_agent(&h).unwrap();
        assert_eq!(ua.len(), MAX_CLIENT_ID);
        assert!(ua.starts_with("DAVx5/4.4 ?a"));
    }
}
