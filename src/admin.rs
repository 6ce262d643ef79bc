//! The admin listener: Prometheus `/metrics`, `/healthz`, `/readyz`, and the bans API for the
//! operator (list, lift one, lift all for an account), the latter behind a bearer token.
//!
//! Plain HTTP/1.1 on loopback or a management network; small and bounded (few connections, a
//! header deadline, no request bodies).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::secret::Secret;
use crate::session::SharedRef;

/// Most admin connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;

/// What the admin handlers need.
pub struct Admin {
    shared: SharedRef,
    token: Option<Secret>,
}

impl Admin {
    pub fn new(shared: SharedRef, token: Option<Secret>) -> Self {
        Self { shared, token }
    }

    /// Serves until `stop` fires.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                () = stop.cancelled() => return,
            };
            let (tcp, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(pair) => pair,
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(&req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .max_buf_size(16 * 1024)
                    .serve_connection(TokioIo::new(tcp), service);
                let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            });
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> Result<(), Box<Response<Full<Bytes>>>> {
        let Some(token) = &self.token else {
            return Err(Box::new(text(
                StatusCode::FORBIDDEN,
                "the bans API is disabled: set admin.token_file or admin.token_env\n",
            )));
        };
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        match given {
            Some(given) if token.ct_eq(given) => Ok(()),
            _ => {
                let mut r = text(StatusCode::UNAUTHORIZED, "bearer token required\n");
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
                );
                Err(Box::new(r))
            }
        }
    }

    async fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/metrics") => {
                self.shared.refresh_gauges().await;
                let mut r = Response::new(Full::new(Bytes::from(self.shared.metrics.encode())));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                if self.shared.shutdown.is_cancelled() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }
            (_, p) if p == "/bans" || p.starts_with("/bans/") => {
                if let Err(r) = self.authorized(req) {
                    return *r;
                }
                self.bans(req).await
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    async fn bans(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let query = req.uri().query().unwrap_or_default();
        match (req.method(), path) {
            (&Method::GET, "/bans") => {
                let bans: Vec<serde_json::Value> = self
                    .shared
                    .guard
                    .bans()
                    .await
                    .iter()
                    .map(ban_json)
                    .collect();
                json(StatusCode::OK, &serde_json::json!({ "bans": bans }))
            }
            (&Method::DELETE, "/bans") => {
                let Some(account) = query_param(query, "account") else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "DELETE /bans needs ?account=NAME (or DELETE /bans/KEY)\n",
                    );
                };
                let shown = crate::identity::LogName(account.as_bytes()).to_string();
                match self.shared.guard.lift_account(&account).await {
                    Ok(lifted) => {
                        info!(event = "admin", action = "lift_account", account = %shown, lifted, "bans lifted for an account");
                        json(StatusCode::OK, &serde_json::json!({ "lifted": lifted }))
                    }
                    Err(e) => guard_error(&e),
                }
            }
            (&Method::DELETE, p) => {
                let key = percent_decode(&p["/bans/".len()..]);
                let shown = crate::identity::LogName(key.as_bytes()).to_string();
                match self.shared.guard.lift(&key).await {
                    Ok(true) => {
                        info!(event = "admin", action = "lift", key = %shown, "ban lifted");
                        json(StatusCode::OK, &serde_json::json!({ "lifted": 1 }))
                    }
                    Ok(false) => text(StatusCode::NOT_FOUND, "no such ban\n"),
                    Err(e) => guard_error(&e),
                }
            }
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        }
    }
}

fn ban_json(b: &crate::guard::BanInfo) -> serde_json::Value {
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    serde_json::json!({
        "key": b.key,
        "kind": b.kind.label(),
        "account": b.account,
        "reason": b.reason.to_string(),
        "offences": b.offences,
        "since": secs(b.since),
        "until": secs(b.until),
        "protocol": b.protocol,
    })
}

fn guard_error(e: &crate::guard::GuardError) -> Response<Full<Bytes>> {
    let status = match e {
        crate::guard::GuardError::BadKey(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut r = Response::new(Full::new(Bytes::from(format!("{e}\n"))));
    *r.status_mut() = status;
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The value of `name` in a query string, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
        .filter(|v| !v.is_empty())
}

/// `%XX` and `+` decoding; invalid escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_percent_decoding() {
        assert_eq!(
            query_param("a=1&account=alice%40example.org", "account").as_deref(),
            Some("alice@example.org")
        );
        assert_eq!(query_param("account=", "account"), None);
        assert_eq!(percent_decode("2001%3Adb8%3A%3A%2F64"), "2001:db8::/64");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
    }
}
