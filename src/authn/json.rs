//! The `json` authenticator: one `POST` of a JSON document per decision, for a custom service.
//!
//! The contract is `docs/authn-json.openapi.yaml`. Field names follow Nauthilus's JSON API where
//! the two overlap, so that a service written for one is easy to point at the other. As with every
//! authenticator, only an unambiguous `{"status":"ok","account":…}` accepts, and anything unclear is
//! a temporary failure, never "wrong password".

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroizing;

use super::http::{Endpoint, HttpClient, Response, Service};
use super::nginx::{protocol_label, sanitize_reason, withhold_echo, MAX_AUTH_WAIT};
use super::{AuthRequest, Authenticator, Verdict, VerdictFuture};

/// Header names Portcullis sends itself; configured static headers may not reuse them.
pub const RESERVED_HEADERS: &[&str] = &["Content-Type", "Accept"];

/// Why a request could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    /// JSON strings are Unicode: a password that is not UTF-8 cannot be sent faithfully, and a
    /// lossy conversion would let different passwords collide.
    #[error("password is not valid UTF-8")]
    PasswordNotUtf8,
    #[error("cannot encode the request: {0}")]
    Encode(String),
}

/// The request document.
#[derive(Serialize)]
struct Body<'a> {
    username: &'a str,
    password: &'a str,
    client_ip: String,
    client_port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    local_ip: String,
    local_port: u16,
    protocol: &'static str,
    method: &'static str,
    auth_login_attempt: u32,
    ssl: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    ssl_protocol: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ssl_cipher: Option<&'a str>,
    session: &'a str,
}

/// Builds the whole request (head and body). The buffer holds the password: it is wiped on drop
/// and sized up front so that no unwiped copy is left behind by a reallocation.
///
/// # Errors
/// [`RequestError::PasswordNotUtf8`] if the password cannot be a JSON string.
pub fn build_request(
    endpoint: &Endpoint,
    static_headers: &[(String, String)],
    keepalive: bool,
    req: &AuthRequest,
) -> Result<Zeroizing<Vec<u8>>, RequestError> {
    let password = req
        .secret
        .expose_str()
        .ok_or(RequestError::PasswordNotUtf8)?;
    let tls = req.tls.as_ref();
    let body = Body {
        username: &req.username,
        password,
        client_ip: req.client.ip().to_canonical().to_string(),
        client_port: req.client.port(),
        client_id: req.client_id.as_deref(),
        local_ip: req.local.ip().to_canonical().to_string(),
        local_port: req.local.port(),
        protocol: protocol_label(req.protocol),
        method: req.mechanism.label(),
        auth_login_attempt: req.attempt,
        ssl: tls.is_some(),
        ssl_protocol: tls.map(|t| t.version.as_str()),
        ssl_cipher: tls.map(|t| t.cipher.as_str()),
        session: &req.session_id,
    };
    // JSON escaping grows a string at most sixfold (`\u00XX`).
    let variable = req.username.len()
        + password.len()
        + req.client_id.as_ref().map_or(0, String::len)
        + tls.map_or(0, |t| t.version.len() + t.cipher.len())
        + req.session_id.len();
    let mut json = Zeroizing::new(Vec::with_capacity(512 + 6 * variable));
    serde_json::to_writer(&mut *json, &body).map_err(|e| RequestError::Encode(e.to_string()))?;

    let statics: usize = static_headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum();
    let mut out = Zeroizing::new(Vec::with_capacity(
        256 + endpoint.path.len() + statics + json.len(),
    ));
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(endpoint.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(endpoint.host_header().as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: application/json\r\nAccept: application/json\r\n");
    out.extend_from_slice(format!("Content-Length: {}\r\n", json.len()).as_bytes());
    for (name, value) in static_headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !keepalive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&json);
    Ok(out)
}

/// The reply document (unknown fields are ignored, so the service may add its own).
#[derive(Deserialize)]
struct Reply {
    status: String,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    wait: Option<u64>,
}

/// Interprets a reply. Pure and total: any input gives a [`Verdict`].
pub fn interpret(resp: &Response) -> Verdict {
    if resp.status != 200 && resp.status != 403 {
        return Verdict::temp(format!("json: HTTP status {}", resp.status));
    }
    // Duplicate keys are refused by serde's derive ("duplicate field"): no ambiguity survives.
    let reply: Reply = match serde_json::from_slice(&resp.body) {
        Ok(r) => r,
        Err(e) => return Verdict::temp(format!("json: malformed reply ({})", e.classify_label())),
    };
    let reason = reply.reason.as_deref().map(sanitize_reason);
    match (reply.status.as_str(), resp.status) {
        ("ok", 200) => match reply.account {
            Some(account) if !account.is_empty() => Verdict::Accept { account },
            _ => Verdict::temp("json: status ok without account"),
        },
        ("fail", _) => Verdict::Reject {
            reason: reason.unwrap_or_else(|| "rejected".into()),
            wait: reply
                .wait
                .map(|s| Duration::from_secs(s).min(MAX_AUTH_WAIT)),
        },
        ("tempfail", _) => Verdict::temp(format!(
            "json: tempfail{}",
            reason.map(|r| format!(": {r}")).unwrap_or_default()
        )),
        (other, code) => Verdict::temp(format!(
            "json: unexpected status {:?} with HTTP {code}",
            sanitize_reason(other)
        )),
    }
}

/// A log-safe label for a JSON error (serde's message could quote the document).
trait ClassifyLabel {
    fn classify_label(&self) -> &'static str;
}

impl ClassifyLabel for serde_json::Error {
    fn classify_label(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "missing or mistyped field",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// The `json` authenticator.
#[derive(Debug)]
pub struct JsonAuth {
    service: Service,
}

impl JsonAuth {
    /// `static_headers` must already be checked with
    /// [`super::http::validate_static_headers`] against [`RESERVED_HEADERS`].
    pub fn new(client: HttpClient, static_headers: Vec<(String, String)>, keepalive: bool) -> Self {
        Self {
            service: Service {
                client,
                static_headers,
                keepalive,
            },
        }
    }

    async fn decide(&self, req: &AuthRequest) -> Verdict {
        let request = match build_request(
            self.service.client.endpoint(),
            &self.service.static_headers,
            self.service.keepalive,
            req,
        ) {
            Ok(r) => r,
            Err(e @ RequestError::PasswordNotUtf8) => return Verdict::reject(e.to_string()),
            Err(e) => return Verdict::temp(format!("json: {e}")),
        };
        match self.service.client.send(&request).await {
            Ok(resp) => {
                let verdict = match interpret(&resp) {
                    Verdict::Reject { reason, wait } => Verdict::Reject {
                        reason: withhold_echo(reason, req.secret.expose()),
                        wait,
                    },
                    Verdict::TempFail { reason } => Verdict::TempFail {
                        reason: withhold_echo(reason, req.secret.expose()),
                    },
                    accept => accept,
                };
                if let Verdict::TempFail { reason } = &verdict {
                    tracing::warn!(endpoint = %self.service.client.endpoint(), %reason, "json authenticator reply unusable");
                }
                verdict
            }
            Err(e) => {
                tracing::warn!(endpoint = %self.service.client.endpoint(), error = %e, "json authenticator request failed");
                Verdict::temp(format!("json: {e}"))
            }
        }
    }
}

impl Authenticator for JsonAuth {
    fn verify<'a>(&'a self, req: &'a AuthRequest) -> VerdictFuture<'a> {
        Box::pin(self.decide(req))
    }

    fn kind(&self) -> &'static str {
        "json"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::http::test_server::{serve, Canned};
    use super::super::http::{parse_response_at_eof, ClientOptions};
    use super::super::TlsInfo;
    use super::*;
    use crate::sasl::Mechanism;
    use crate::secret::Secret;
    use crate::Protocol;
    use proptest::prelude::*;

    const PASSWORD: &str = "s3cr\"et\u{1}ü";

    fn request() -> AuthRequest {
        AuthRequest {
            protocol: Protocol::Imap,
            mechanism: Mechanism::Login,
            username: "alice".into(),
            secret: Secret::from(PASSWORD),
            client: "192.0.2.7:40000".parse().unwrap(),
            local: "[2001:db8::1]:993".parse().unwrap(),
            tls: Some(TlsInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_128_GCM_SHA256".into(),
                sni: Some("mail.example.org".into()),
            }),
            attempt: 1,
            session_id: "0b7c".into(),
            client_id: Some("Thunderbird/128".into()),
        }
    }

    fn auth(url: &str, keepalive: bool) -> JsonAuth {
        let client = HttpClient::new(
            Endpoint::parse(url).unwrap(),
            ClientOptions {
                timeout: Duration::from_secs(2),
                keepalive,
                ..ClientOptions::default()
            },
        )
        .unwrap();
        JsonAuth::new(client, vec![("X-Api-Key".into(), "k3y".into())], keepalive)
    }

    fn reply(raw: &str) -> Verdict {
        interpret(&parse_response_at_eof(raw.as_bytes()).unwrap())
    }

    fn http(status_line: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status_line}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn ok_json(body: &str) -> String {
        http("200 OK", body)
    }

    #[test]
    fn request_bytes_are_exact() {
        let endpoint = Endpoint::parse("http://auth.internal:8080/v1/auth").unwrap();
        let statics = vec![("X-Api-Key".to_string(), "k3y".to_string())];
        let got = build_request(&endpoint, &statics, false, &request()).unwrap();
        let body = concat!(
            r#"{"username":"alice","password":"s3cr\"et\u0001ü","client_ip":"192.0.2.7","client_port":40000,"#,
            r#""client_id":"Thunderbird/128","local_ip":"2001:db8::1","local_port":993,"protocol":"imap","#,
            r#""method":"login","auth_login_attempt":1,"ssl":true,"ssl_protocol":"TLSv1.3","#,
            r#""ssl_cipher":"TLS13_AES_128_GCM_SHA256","session":"0b7c"}"#
        );
        let want = format!(
            "POST /v1/auth HTTP/1.1\r\nHost: auth.internal:8080\r\nContent-Type: application/json\r\n\
             Accept: application/json\r\nContent-Length: {}\r\nX-Api-Key: k3y\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(String::from_utf8_lossy(&got), want);

        let mut plain = request();
        plain.tls = None;
        plain.client_id = None;
        let got = build_request(&endpoint, &[], true, &plain).unwrap();
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.contains(r#""ssl":false,"session""#), "{text}");
        assert!(
            !text.contains("client_id") && !text.contains("Connection:"),
            "{text}"
        );

        let mut latin1 = request();
        latin1.secret = Secret::new(vec![0xe9]);
        assert_eq!(
            build_request(&endpoint, &[], true, &latin1).unwrap_err(),
            RequestError::PasswordNotUtf8
        );
    }

    #[test]
    fn interpretation_table() {
        assert_eq!(
            reply(&ok_json(
                r#"{"status":"ok","account":"alice@example.org","extra":[1]}"#
            )),
            Verdict::Accept {
                account: "alice@example.org".into()
            }
        );
        assert_eq!(
            reply(&ok_json(
                r#"{"status":"fail","reason":"bad\npassword","wait":5}"#
            )),
            Verdict::Reject {
                reason: "badpassword".into(),
                wait: Some(Duration::from_secs(5))
            }
        );
        assert_eq!(
            reply(&http("403 Forbidden", r#"{"status":"fail"}"#)),
            Verdict::Reject {
                reason: "rejected".into(),
                wait: None
            }
        );
        for raw in [
            ok_json(r#"{"status":"tempfail","reason":"ldap down"}"#),
            ok_json(r#"{"status":"ok"}"#),
            ok_json(r#"{"status":"ok","account":""}"#),
            ok_json(r#"{"status":"ok","account":7}"#),
            ok_json(r#"{"status":"ok","status":"ok","account":"a"}"#),
            ok_json(r#"{"status":"OK","account":"a"}"#),
            ok_json(r#"{"status":"fail","wait":-1}"#),
            ok_json(r#"{"status":"fail","wait":1.5}"#),
            ok_json(r#"{"account":"a"}"#),
            ok_json(r#"["ok"]"#),
            ok_json("not json"),
            ok_json(""),
            http("403 Forbidden", r#"{"status":"ok","account":"alice@x"}"#),
            http("500 Oops", r#"{"status":"ok","account":"alice@x"}"#),
            http("401 No", r#"{"status":"fail"}"#),
        ] {
            let v = reply(&raw);
            assert!(matches!(v, Verdict::TempFail { .. }), "{raw}: {v:?}");
        }
    }

    proptest! {
        #[test]
        fn interpret_never_panics(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let r = Response { status, headers: Vec::new(), body, keep_alive: false };
            if let Verdict::Accept { .. } = interpret(&r) {
                prop_assert_eq!(status, 200);
            }
        }

        #[test]
        fn interpret_never_panics_on_json_like(status in prop_oneof![Just(200u16), Just(403u16)], body in r#"\{("[a-z]{1,8}":("[a-z@]{0,8}"|-?[0-9]{1,3}|null|true),?){0,5}\}"#) {
            let r = Response { status, headers: Vec::new(), body: body.into_bytes(), keep_alive: false };
            let _ = interpret(&r);
        }
    }

    #[tokio::test]
    async fn accept_reject_and_tempfail_over_a_socket() {
        let server = serve(vec![
            Canned::close(ok_json(r#"{"status":"ok","account":"alice@example.org"}"#).as_bytes()),
            Canned::close(
                ok_json(r#"{"status":"fail","reason":"invalid credentials"}"#).as_bytes(),
            ),
            Canned::close(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
            Canned::close(b"\x16\x03\x01garbage"),
            Canned::close(b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n"),
        ])
        .await;
        let a = auth(&server.url("/v1/auth"), false);
        let req = request();
        assert_eq!(
            a.verify(&req).await,
            Verdict::Accept {
                account: "alice@example.org".into()
            }
        );
        assert!(matches!(a.verify(&req).await, Verdict::Reject { .. }));
        for _ in 0..3 {
            let v = a.verify(&req).await;
            assert!(matches!(v, Verdict::TempFail { .. }), "{v:?}");
        }
        let sent = server.requests();
        assert_eq!(
            sent[0],
            *build_request(
                a.service.client.endpoint(),
                &a.service.static_headers,
                false,
                &req
            )
            .unwrap()
        );
    }

    #[tokio::test]
    async fn refused_connection_is_a_temporary_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let v = auth(&format!("http://{addr}/"), true)
            .verify(&request())
            .await;
        assert!(matches!(v, Verdict::TempFail { .. }), "{v:?}");
    }

    #[tokio::test]
    async fn keepalive_reuses_one_connection() {
        let body = r#"{"status":"ok","account":"alice@example.org"}"#;
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        let server = serve(vec![
            Canned::keep(ok_json(body).as_bytes()),
            Canned::keep(chunked.as_bytes()),
        ])
        .await;
        let a = auth(&server.url("/"), true);
        for _ in 0..3 {
            let v = a.verify(&request()).await;
            assert!(matches!(v, Verdict::Accept { .. }), "{v:?}");
        }
        assert_eq!(server.requests().len(), 3);
        assert_eq!(server.connections(), 1);
        assert_eq!(a.service.client.idle_count(), 1);
    }

    #[tokio::test]
    async fn password_not_in_debug_output() {
        // The second reply echoes the password in its reason, as a careless service might.
        let echo = format!(
            r#"{{"status":"fail","reason":"wrong password {}"}}"#,
            serde_json::to_string(PASSWORD).unwrap().trim_matches('"')
        );
        let server = serve(vec![
            Canned::close(b"junk"),
            Canned::close(ok_json(&echo).as_bytes()),
        ])
        .await;
        let a = auth(&server.url("/"), true);
        let req = request();
        let junk = a.verify(&req).await;
        let echoed = a.verify(&req).await;
        assert!(matches!(echoed, Verdict::Reject { .. }), "{echoed:?}");
        let shown = format!("{a:?} {req:?} {junk:?} {echoed:?}");
        assert!(!shown.contains("s3cr") && !shown.contains("k3y"), "{shown}");
    }
}
