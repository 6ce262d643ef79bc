//! The `nginx` authenticator: a client of nginx's mail `auth_http` protocol.
//!
//! Byte-compatible with what nginx itself sends, so that an existing auth_http server (Nauthilus's
//! `/api/v1/auth/nginx`, Mailu's, a home-grown one) becomes the central authenticator unchanged.
//! Request building ([`build_request`]) and reply interpretation ([`interpret`]) are pure, so both
//! are tested byte for byte and can be fuzzed.
//!
//! Interpretation fails closed: only an unambiguous `Auth-Status: OK` accepts; anything the
//! authenticator did not clearly say (missing, empty or duplicate status, a non-200 reply,
//! unparsable `Auth-Wait`, a temporary SMTP error code) is a temporary failure, never "wrong
//! password", so a broken authenticator cannot get users banned.

use std::time::Duration;

use zeroize::Zeroizing;

use super::http::{Endpoint, HttpClient, Response, Service};
use super::{AuthRequest, Authenticator, Verdict, VerdictFuture};
use crate::sasl::Mechanism;
use crate::Protocol;

/// Header names Portcullis sends itself; configured static headers may not reuse them.
pub const RESERVED_HEADERS: &[&str] = &[
    "Auth-Method",
    "Auth-User",
    "Auth-Pass",
    "Auth-Salt",
    "Auth-Protocol",
    "Auth-Login-Attempt",
    "Client-IP",
    "Client-Host",
    "Auth-SSL",
    "Auth-SSL-Protocol",
    "Auth-SSL-Cipher",
    "Auth-SSL-Verify",
    "Auth-SSL-Subject",
    "Auth-SSL-Issuer",
    "Auth-SSL-Serial",
    "Auth-SSL-Fingerprint",
    "Auth-SSL-Cert",
];

/// How often `Auth-Status: WAIT` is honoured for one decision before giving up (the overall
/// deadline in [`super::Checked`] usually ends it first).
pub const MAX_WAIT_ROUNDS: u32 = 3;
/// Longest `Auth-Wait` honoured; larger values are clamped.
pub const MAX_AUTH_WAIT: Duration = Duration::from_secs(300);
/// Longest server-supplied reason kept for the logs, in characters.
pub const MAX_REASON_CHARS: usize = 200;

/// What the auth_http server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `Auth-Status: OK`; `account` is `Auth-User` when the server sent one.
    Accept { account: Option<String> },
    /// `Auth-Status: WAIT`: ask again after this long.
    Wait(Duration),
    /// Any other status text: wrong credentials. `wait` is `Auth-Wait`, if sent.
    Reject {
        reason: String,
        wait: Option<Duration>,
    },
    /// Not a usable answer.
    TempFail { reason: String },
}

/// The value nginx sends in `Auth-Protocol` for each of our protocols (`sieve` and `http` are
/// extensions: nginx has no such listeners).
pub fn protocol_label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Imap => "imap",
        Protocol::Pop3 => "pop3",
        Protocol::Submission => "smtp",
        Protocol::ManageSieve => "sieve",
        Protocol::Http => "http",
    }
}

/// nginx's `Auth-Method` for a mechanism: the password mechanisms carry a plain password. Tokens
/// normally go to `[authenticator.oauth]`; were one to reach an auth_http server, it is named.
fn auth_method(mechanism: Mechanism) -> &'static str {
    match mechanism {
        Mechanism::Plain | Mechanism::Login => "plain",
        Mechanism::XOAuth2 | Mechanism::OAuthBearer | Mechanism::Bearer => mechanism.label(),
    }
}

/// nginx's escaping of `Auth-User` / `Auth-Pass` (`NGX_ESCAPE_MAIL_AUTH`): SP, `%` and bytes
/// 0x00–0x1F become `%XX` (upper-case hex); everything else, including bytes >= 0x7F, is raw.
pub fn escape_into(out: &mut Vec<u8>, raw: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in raw {
        if b <= 0x20 || b == b'%' {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        } else {
            out.push(b);
        }
    }
}

/// Appends text that came from elsewhere (TLS facts) to a header value, dropping control bytes
/// so that it can never end the line.
fn push_text(out: &mut Vec<u8>, text: &str) {
    out.extend(text.bytes().filter(|&b| b >= 0x20 && b != 0x7f));
}

fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Builds the request nginx would send for `req`, byte for byte, plus `Connection: keep-alive`
/// when `keepalive` is on. The buffer holds the password: it is wiped on drop, and sized up front
/// so that no unwiped copy is left behind by a reallocation.
pub fn build_request(
    endpoint: &Endpoint,
    static_headers: &[(String, String)],
    keepalive: bool,
    req: &AuthRequest,
) -> Zeroizing<Vec<u8>> {
    let secret = req.secret.expose();
    let tls_len = req
        .tls
        .as_ref()
        .map_or(0, |t| t.version.len() + t.cipher.len() + 64);
    let statics: usize = static_headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum();
    let capacity = 512
        + endpoint.path.len()
        + endpoint.host.len()
        + 3 * (req.username.len() + secret.len())
        + tls_len
        + statics;
    let mut out = Zeroizing::new(Vec::with_capacity(capacity));
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(endpoint.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.0\r\n");
    header(&mut out, "Host", endpoint.host_header().as_bytes());
    header(
        &mut out,
        "Auth-Method",
        auth_method(req.mechanism).as_bytes(),
    );
    out.extend_from_slice(b"Auth-User: ");
    escape_into(&mut out, req.username.as_bytes());
    out.extend_from_slice(b"\r\nAuth-Pass: ");
    escape_into(&mut out, secret);
    out.extend_from_slice(b"\r\n");
    header(
        &mut out,
        "Auth-Protocol",
        protocol_label(req.protocol).as_bytes(),
    );
    header(
        &mut out,
        "Auth-Login-Attempt",
        req.attempt.to_string().as_bytes(),
    );
    header(
        &mut out,
        "Client-IP",
        req.client.ip().to_canonical().to_string().as_bytes(),
    );
    if req.protocol == Protocol::Submission {
        // nginx sends the resolved name; with resolving off (our case) it sends this literal.
        header(&mut out, "Client-Host", b"[UNAVAILABLE]");
    }
    if let Some(tls) = &req.tls {
        header(&mut out, "Auth-SSL", b"on");
        out.extend_from_slice(b"Auth-SSL-Protocol: ");
        push_text(&mut out, &tls.version);
        out.extend_from_slice(b"\r\nAuth-SSL-Cipher: ");
        push_text(&mut out, &tls.cipher);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in static_headers {
        header(&mut out, name, value.as_bytes());
    }
    if keepalive {
        header(&mut out, "Connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Server text made safe for a log line: control characters dropped, length bounded.
pub fn sanitize_reason(text: &str) -> String {
    let mut out: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON_CHARS)
        .collect();
    if text
        .chars()
        .filter(|c| !c.is_control())
        .nth(MAX_REASON_CHARS)
        .is_some()
    {
        out.push('…');
    }
    out
}

/// Withholds a server-supplied reason that quotes the password (raw, nginx-escaped, or with its
/// control characters dropped as [`sanitize_reason`] does), so that a careless authenticator
/// echoing its input cannot put the password in our logs. Passwords shorter than 3 bytes are not
/// searched for: they would match ordinary text.
pub fn withhold_echo(reason: String, secret: &[u8]) -> String {
    if secret.len() < 3 {
        return reason;
    }
    let mut escaped = Zeroizing::new(Vec::with_capacity(secret.len() * 3));
    escape_into(&mut escaped, secret);
    let sanitized = Zeroizing::new(
        std::str::from_utf8(secret)
            .map(|s| s.chars().filter(|c| !c.is_control()).collect::<String>())
            .unwrap_or_default(),
    );
    let text = reason.as_bytes();
    let found = |needle: &[u8]| needle.len() >= 3 && memchr::memmem::find(text, needle).is_some();
    if found(secret) || found(&escaped) || found(sanitized.as_bytes()) {
        "<reason withheld: it contained the password>".into()
    } else {
        reason
    }
}

/// Parses a wait in whole seconds (`Auth-Wait`), clamped to [`MAX_AUTH_WAIT`].
fn parse_wait(raw: &[u8]) -> Option<Duration> {
    let raw = raw.trim_ascii();
    if raw.is_empty() || raw.len() > 10 || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs = raw
        .iter()
        .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
    Some(Duration::from_secs(secs).min(MAX_AUTH_WAIT))
}

/// The single value of header `name`: `Ok(None)` if absent, `Err` if repeated.
fn single<'a>(resp: &'a Response, name: &str) -> Result<Option<&'a [u8]>, String> {
    let mut values = resp.header_values(name);
    let first = values.next();
    if values.next().is_some() {
        return Err(format!("duplicate {name} header"));
    }
    Ok(first)
}

/// Interprets an auth_http reply. Pure and total: any input gives a [`Reply`].
pub fn interpret(resp: &Response) -> Reply {
    match interpret_inner(resp) {
        Ok(reply) => reply,
        Err(reason) => Reply::TempFail { reason },
    }
}

fn interpret_inner(resp: &Response) -> Result<Reply, String> {
    if resp.status != 200 {
        return Err(format!("HTTP status {}", resp.status));
    }
    let status = single(resp, "Auth-Status")?.ok_or("no Auth-Status header")?;
    let user = single(resp, "Auth-User")?;
    let wait = single(resp, "Auth-Wait")?;
    let code = single(resp, "Auth-Error-Code")?;
    let status = std::str::from_utf8(status)
        .map_err(|_| "Auth-Status is not UTF-8")?
        .trim();
    if status.is_empty() {
        return Err("empty Auth-Status".into());
    }
    // nginx compares these two exactly (case-sensitive); anything else is an error text.
    match status {
        "OK" => {
            let account = match user {
                None => None,
                Some(raw) => {
                    let name = std::str::from_utf8(raw)
                        .map_err(|_| "Auth-User is not UTF-8")?
                        .trim();
                    if name.is_empty() {
                        return Err("empty Auth-User".into());
                    }
                    Some(name.to_owned())
                }
            };
            Ok(Reply::Accept { account })
        }
        "WAIT" => {
            let raw = wait.ok_or("Auth-Status WAIT without Auth-Wait")?;
            Ok(Reply::Wait(parse_wait(raw).ok_or("invalid Auth-Wait")?))
        }
        text => {
            let wait = match wait {
                None => None,
                Some(raw) => Some(parse_wait(raw).ok_or("invalid Auth-Wait")?),
            };
            let text = sanitize_reason(text);
            let Some(code) = code else {
                return Ok(Reply::Reject { reason: text, wait });
            };
            let code = sanitize_reason(
                std::str::from_utf8(code)
                    .map_err(|_| "Auth-Error-Code is not UTF-8")?
                    .trim(),
            );
            // An SMTP 4xx code (e.g. Nauthilus's `451 4.3.0`) is the server saying "temporary".
            if code.starts_with('4') {
                return Err(format!("{code} {text}"));
            }
            Ok(Reply::Reject {
                reason: format!("{code} {text}"),
                wait,
            })
        }
    }
}

/// The `nginx` authenticator.
#[derive(Debug)]
pub struct NginxAuth {
    service: Service,
}

impl NginxAuth {
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
        let request = build_request(
            self.service.client.endpoint(),
            &self.service.static_headers,
            self.service.keepalive,
            req,
        );
        let mut rounds = 0;
        loop {
            let resp = match self.service.client.send(&request).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::warn!(endpoint = %self.service.client.endpoint(), error = %e, "auth_http request failed");
                    return Verdict::temp(format!("auth_http: {e}"));
                }
            };
            match interpret(&resp) {
                Reply::Accept { account } => {
                    return Verdict::Accept {
                        account: account.unwrap_or_else(|| req.username.clone()),
                    }
                }
                Reply::Reject { reason, wait } => {
                    let reason = withhold_echo(reason, req.secret.expose());
                    return Verdict::Reject { reason, wait };
                }
                Reply::TempFail { reason } => {
                    let reason = withhold_echo(reason, req.secret.expose());
                    tracing::warn!(endpoint = %self.service.client.endpoint(), %reason, "auth_http reply unusable");
                    return Verdict::temp(format!("auth_http: {reason}"));
                }
                Reply::Wait(delay) => {
                    rounds += 1;
                    if rounds > MAX_WAIT_ROUNDS {
                        return Verdict::temp("auth_http: still WAIT after retries");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

impl Authenticator for NginxAuth {
    fn verify<'a>(&'a self, req: &'a AuthRequest) -> VerdictFuture<'a> {
        Box::pin(self.decide(req))
    }

    fn kind(&self) -> &'static str {
        "nginx"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::http::test_server::{serve, Canned};
    use super::super::http::{parse_response_at_eof, validate_static_headers, ClientOptions};
    use super::super::{Checked, TlsInfo};
    use super::*;
    use crate::identity::IdentityRules;
    use crate::secret::Secret;
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    const PASSWORD: &str = "pa ss%wörd\r\n";

    fn request(protocol: Protocol) -> AuthRequest {
        AuthRequest {
            protocol,
            mechanism: Mechanism::Plain,
            username: "alice@example.org".into(),
            secret: Secret::from(PASSWORD),
            client: "[::ffff:192.0.2.7]:40000".parse().unwrap(),
            local: "127.0.0.1:993".parse().unwrap(),
            tls: None,
            attempt: 2,
            session_id: "s1".into(),
            client_id: None,
        }
    }

    fn auth(url: &str, keepalive: bool) -> NginxAuth {
        let endpoint = Endpoint::parse(url).unwrap();
        let client = HttpClient::new(
            endpoint,
            ClientOptions {
                timeout: Duration::from_secs(2),
                keepalive,
                ..ClientOptions::default()
            },
        )
        .unwrap();
        NginxAuth::new(client, vec![("X-Auth-Key".into(), "k3y".into())], keepalive)
    }

    #[test]
    fn escaping_matches_nginx() {
        let mut out = Vec::new();
        escape_into(&mut out, b"a b%c\x00\x1f\x7f\xc3\xa4\"+");
        assert_eq!(out, b"a%20b%25c%00%1F\x7f\xc3\xa4\"+");
    }

    #[test]
    fn request_bytes_are_exact() {
        let endpoint = Endpoint::parse("http://127.0.0.1:9100/api/v1/auth/nginx").unwrap();
        let statics = vec![("X-Auth-Key".to_string(), "k3y".to_string())];
        let req = request(Protocol::Imap);
        let got = build_request(&endpoint, &statics, false, &req);
        let want = concat!(
            "GET /api/v1/auth/nginx HTTP/1.0\r\n",
            "Host: 127.0.0.1:9100\r\n",
            "Auth-Method: plain\r\n",
            "Auth-User: alice@example.org\r\n",
            "Auth-Pass: pa%20ss%25wörd%0D%0A\r\n",
            "Auth-Protocol: imap\r\n",
            "Auth-Login-Attempt: 2\r\n",
            "Client-IP: 192.0.2.7\r\n",
            "X-Auth-Key: k3y\r\n",
            "\r\n",
        );
        assert_eq!(String::from_utf8_lossy(&got), want);

        let mut req = request(Protocol::Submission);
        req.mechanism = Mechanism::Login;
        req.attempt = 1;
        req.tls = Some(TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384\r\nX: y".into(),
            sni: None,
        });
        let got = build_request(&endpoint, &[], true, &req);
        let want = concat!(
            "GET /api/v1/auth/nginx HTTP/1.0\r\n",
            "Host: 127.0.0.1:9100\r\n",
            "Auth-Method: plain\r\n",
            "Auth-User: alice@example.org\r\n",
            "Auth-Pass: pa%20ss%25wörd%0D%0A\r\n",
            "Auth-Protocol: smtp\r\n",
            "Auth-Login-Attempt: 1\r\n",
            "Client-IP: 192.0.2.7\r\n",
            "Client-Host: [UNAVAILABLE]\r\n",
            "Auth-SSL: on\r\n",
            "Auth-SSL-Protocol: TLSv1.3\r\n",
            "Auth-SSL-Cipher: TLS13_AES_256_GCM_SHA384X: y\r\n",
            "Connection: keep-alive\r\n",
            "\r\n",
        );
        assert_eq!(String::from_utf8_lossy(&got), want);
        assert!(got.capacity() >= got.len());

        for (p, label) in [
            (Protocol::Pop3, "pop3"),
            (Protocol::ManageSieve, "sieve"),
            (Protocol::Http, "http"),
        ] {
            let got = build_request(&endpoint, &[], false, &request(p));
            let text = String::from_utf8_lossy(&got).into_owned();
            assert!(
                text.contains(&format!("\r\nAuth-Protocol: {label}\r\n")),
                "{text}"
            );
            assert!(!text.contains("Client-Host"));
        }
    }

    #[test]
    fn static_headers_cannot_shadow_protocol_headers() {
        for name in ["auth-user", "AUTH-PASS", "Client-IP", "Host", "Connection"] {
            let (n, v) = (name.to_string(), "x".to_string());
            assert!(
                validate_static_headers([(&n, &v)], RESERVED_HEADERS).is_err(),
                "{name}"
            );
        }
    }

    #[test]
    fn interpretation_table() {
        let ok = |account: Option<&str>| Reply::Accept {
            account: account.map(str::to_owned),
        };
        let temp = |r: &Reply| matches!(r, Reply::TempFail { .. });
        type Check = Box<dyn Fn(&Reply) -> bool>;
        let cases: Vec<(&[u8], Check)> = vec![
            (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\n\r\n", Box::new(move |r| *r == ok(None))),
            (b"HTTP/1.0 200 OK\r\nauth-status: OK\r\nAUTH-USER: Alice@Example.org\r\nAuth-Pass: master-secret\r\n\r\n", Box::new(move |r| *r == ok(Some("Alice@Example.org")))),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\n\r\n", Box::new(|r| *r == Reply::Reject { reason: "Invalid login or password".into(), wait: None })),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: Invalid login\r\nAuth-Wait: 3\r\n\r\n", Box::new(|r| *r == Reply::Reject { reason: "Invalid login".into(), wait: Some(Duration::from_secs(3)) })),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: Bad\r\nAuth-Error-Code: 535 5.7.8\r\n\r\n", Box::new(|r| *r == Reply::Reject { reason: "535 5.7.8 Bad".into(), wait: None })),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: Temporary server problem, try again later\r\nAuth-Error-Code: 451 4.3.0\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 2\r\n\r\n", Box::new(|r| *r == Reply::Wait(Duration::from_secs(2)))),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 99999\r\n\r\n", Box::new(|r| *r == Reply::Wait(MAX_AUTH_WAIT))),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: Bad\r\nAuth-Wait: soon\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: Bad\r\nAuth-Wait: -1\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 200 OK\r\nX-Other: 1\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 200 OK\r\nAuth-Status:\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Status: OK\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-User: a\r\nAuth-User: b\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-User: \xff\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-User:\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 200 OK\r\nAuth-Status: \xff\xfe\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 500 Internal Server Error\r\nAuth-Status: OK\r\n\r\n", Box::new(temp)),
            (b"HTTP/1.0 403 Forbidden\r\nAuth-Status: Invalid\r\n\r\n", Box::new(temp)),
            // nginx compares OK case-sensitively: "ok" is an error text, i.e. a rejection.
            (b"HTTP/1.0 200 OK\r\nAuth-Status: ok\r\n\r\n", Box::new(|r| matches!(r, Reply::Reject { .. }))),
        ];
        for (raw, check) in cases {
            let r = parse_response_at_eof(raw).unwrap();
            let reply = interpret(&r);
            assert!(check(&reply), "{}: {reply:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn reasons_are_bounded_and_clean() {
        let long = format!(
            "HTTP/1.0 200 OK\r\nAuth-Status: a\tb{}\r\n\r\n",
            "é".repeat(500)
        );
        let reply = interpret(&parse_response_at_eof(long.as_bytes()).unwrap());
        let Reply::Reject { reason, .. } = reply else {
            panic!("{reply:?}")
        };
        assert!(reason.chars().count() <= MAX_REASON_CHARS + 1);
        assert!(!reason.chars().any(char::is_control));
    }

    proptest! {
        #[test]
        fn interpret_never_panics(
            status in 100u16..600,
            fields in proptest::collection::vec((
                prop_oneof![Just("Auth-Status".to_string()), Just("Auth-User".to_string()), Just("Auth-Wait".to_string()), Just("Auth-Error-Code".to_string()), "[A-Za-z-]{1,12}"],
                proptest::collection::vec(any::<u8>(), 0..40),
            ), 0..6),
        ) {
            let r = Response { status, headers: fields, body: Vec::new(), keep_alive: false };
            let reply = interpret(&r);
            if let Reply::Accept { .. } = reply {
                prop_assert_eq!(status, 200);
            }
        }
    }

    fn checked(a: NginxAuth, deadline: Duration) -> Checked {
        Checked::new(Arc::new(a), deadline, 4, IdentityRules::default())
    }

    #[tokio::test]
    async fn ok_with_auth_user_is_the_canonical_account() {
        let server = serve(vec![Canned::close(
            b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\nAuth-User: alice@example.org\r\n\r\n",
        )])
        .await;
        let a = auth(&server.url("/auth"), false);
        let mut req = request(Protocol::Imap);
        req.username = "alice".into();
        assert_eq!(
            a.verify(&req).await,
            Verdict::Accept {
                account: "alice@example.org".into()
            }
        );
        let sent = server.requests();
        assert_eq!(sent.len(), 1);
        assert!(sent[0].starts_with(b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1:"));
        assert_eq!(
            sent[0],
            *build_request(
                a.service.client.endpoint(),
                &a.service.static_headers,
                false,
                &req
            )
        );
    }

    #[tokio::test]
    async fn ok_without_auth_user_keeps_the_name_as_sent() {
        let server = serve(vec![Canned::close(
            b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n\r\n",
        )])
        .await;
        let a = auth(&server.url("/"), false);
        assert_eq!(
            a.verify(&request(Protocol::Imap)).await,
            Verdict::Accept {
                account: "alice@example.org".into()
            }
        );
    }

    #[tokio::test]
    async fn failure_text_is_a_rejection() {
        let server = serve(vec![Canned::close(
            b"HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\nAuth-Wait: 1\r\n\r\n",
        )])
        .await;
        let a = auth(&server.url("/"), false);
        assert_eq!(
            a.verify(&request(Protocol::Imap)).await,
            Verdict::Reject {
                reason: "Invalid login or password".into(),
                wait: Some(Duration::from_secs(1))
            }
        );
    }

    #[tokio::test]
    async fn broken_servers_are_temporary_failures() {
        for raw in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\nX-Nothing: here\r\n\r\n",
            b"HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nAuth-Sta",
            b"",
        ] {
            let server = serve(vec![Canned::close(raw)]).await;
            let a = auth(&server.url("/"), false);
            let v = a.verify(&request(Protocol::Imap)).await;
            assert!(matches!(v, Verdict::TempFail { .. }), "{raw:?}: {v:?}");
        }
    }

    #[tokio::test]
    async fn refused_connection_is_a_temporary_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let a = auth(&format!("http://{addr}/"), true);
        let v = a.verify(&request(Protocol::Imap)).await;
        assert!(matches!(v, Verdict::TempFail { .. }), "{v:?}");
    }

    #[tokio::test]
    async fn slow_server_hits_the_deadline() {
        let server = serve(vec![Canned {
            delay: Duration::from_secs(5),
            ..Canned::close(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n\r\n")
        }])
        .await;
        let c = checked(auth(&server.url("/"), false), Duration::from_millis(200));
        let v = c.verify(&request(Protocol::Imap)).await;
        assert!(matches!(v, Verdict::TempFail { .. }), "{v:?}");
    }

    #[tokio::test]
    async fn wait_asks_again() {
        let server = serve(vec![
            Canned::close(b"HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 0\r\n\r\n"),
            Canned::close(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n\r\n"),
        ])
        .await;
        let a = auth(&server.url("/"), false);
        assert!(matches!(
            a.verify(&request(Protocol::Imap)).await,
            Verdict::Accept { .. }
        ));
        let sent = server.requests();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0], sent[1]);

        let server = serve(vec![Canned::close(
            b"HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 0\r\n\r\n",
        )])
        .await;
        let a = auth(&server.url("/"), false);
        assert!(matches!(
            a.verify(&request(Protocol::Imap)).await,
            Verdict::TempFail { .. }
        ));
        assert_eq!(server.requests().len(), MAX_WAIT_ROUNDS as usize + 1);
    }

    #[tokio::test]
    async fn keepalive_reuses_one_connection() {
        let server = serve(vec![Canned::keep(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\nAuth-Status: OK\r\n\r\n",
        )])
        .await;
        let a = auth(&server.url("/"), true);
        for _ in 0..2 {
            assert!(matches!(
                a.verify(&request(Protocol::Imap)).await,
                Verdict::Accept { .. }
            ));
        }
        assert_eq!(server.requests().len(), 2);
        assert_eq!(server.connections(), 1);
        assert!(server.requests()[0].ends_with(b"Connection: keep-alive\r\n\r\n"));
    }

    #[tokio::test]
    async fn no_reuse_without_the_servers_consent() {
        // An HTTP/1.1 reply to our HTTP/1.0 request that does not echo keep-alive will be closed
        // by the server, so the connection must not be pooled.
        let server = serve(vec![Canned::keep(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nAuth-Status: OK\r\n\r\n",
        )])
        .await;
        let a = auth(&server.url("/"), true);
        for _ in 0..2 {
            assert!(matches!(
                a.verify(&request(Protocol::Imap)).await,
                Verdict::Accept { .. }
            ));
        }
        assert_eq!(server.connections(), 2);
    }

    #[tokio::test]
    async fn stale_pooled_connection_is_retried_once() {
        // The server promises keep-alive but closes anyway: the next request fails before any
        // response byte and must be retried on a fresh connection.
        let server = serve(vec![Canned::close(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\nAuth-Status: OK\r\n\r\n",
        )])
        .await;
        let a = auth(&server.url("/"), true);
        for _ in 0..2 {
            let v = a.verify(&request(Protocol::Imap)).await;
            assert!(matches!(v, Verdict::Accept { .. }), "{v:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(server.connections(), 2);
    }

    #[test]
    fn echoed_passwords_are_withheld() {
        assert_eq!(
            withhold_echo("bad pw hunter2".into(), b"hunter2"),
            "<reason withheld: it contained the password>"
        );
        assert_eq!(
            withhold_echo("bad pw a%20b%25c".into(), b"a b%c"),
            "<reason withheld: it contained the password>"
        );
        assert_eq!(
            withhold_echo("Invalid login".into(), b"hunter2"),
            "Invalid login"
        );
        assert_eq!(
            withhold_echo("Invalid login".into(), b"in"),
            "Invalid login"
        );
        assert_eq!(
            withhold_echo("bad abcd".into(), b"ab\x01cd"),
            "<reason withheld: it contained the password>"
        );
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn password_never_reaches_logs_or_debug_output() {
        let logs = Captured::default();
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || sink.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let req = request(Protocol::Submission);
        let mut shown = format!("{req:?}");
        for raw in [
            &b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Pass: pa ss%w\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\nAuth-Status: Invalid\r\nAuth-Error-Code: 535 5.7.8\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nAuth-Status: Oops\r\nAuth-Error-Code: 451 4.3.0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nAuth-Status: wrong: pa%20ss%25w\xc3\xb6rd%0D%0A\r\nAuth-Error-Code: 451 4.3.0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nAuth-Status: wrong: pa%20ss%25w\xc3\xb6rd%0D%0A\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"nonsense",
        ] {
            let server = serve(vec![Canned::close(raw)]).await;
            let a = auth(&server.url("/"), true);
            let v = a.verify(&req).await;
            shown.push_str(&format!("{a:?} {v:?}"));
        }
        let a = auth("http://127.0.0.1:1/", true);
        shown.push_str(&format!("{:?}", a.verify(&req).await));
        let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        assert!(
            logs.contains("auth_http"),
            "the test should have produced log lines: {logs}"
        );
        for text in [&logs, &shown] {
            assert!(!text.contains("pa ss"), "{text}");
            assert!(!text.contains("pa%20ss"), "{text}");
            assert!(!text.contains("k3y"), "{text}");
        }
    }
}
