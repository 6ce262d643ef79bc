//! Configuration: one TOML file, deserialized strictly (unknown keys are errors) and then validated
//! so that every error names its key and says what is wrong.
//!
//! The section and key names of DESIGN.md §7 are a public contract: extend, never rename.
//! Relative paths are resolved against the working directory, as the shipped config expects when
//! started from the repository root.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::secret::Secret;
use crate::Protocol;

/// A configuration problem, naming the key.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub tls: Option<TlsConfig>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    pub backend: BackendConfig,
    pub master: MasterConfig,
    pub authenticator: AuthenticatorConfig,
    #[serde(default)]
    pub guard: GuardConfig,
    pub admin: Option<AdminConfig>,
    /// DNSBL checks at connect time (off unless configured).
    pub dnsbl: Option<crate::dnsbl::DnsblConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The HTTP listener's policy (anonymous paths, auth cache, timeouts).
    #[serde(default)]
    pub http: HttpConfig,
}

/// `[http]`: what the HTTP listener lets through without credentials, and how long it waits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Paths served without credentials: exact, or a prefix when ending in `*`. The defaults are
    /// Stalwart's discovery documents and OAuth endpoints, which carry their own proof (codes,
    /// tokens) or none is needed; the login form `POST /api/auth` is always intercepted.
    pub anonymous_paths: Vec<String>,
    /// How long a successful Basic login is remembered (keyed hash of user and password), so that
    /// a DAV client's burst of requests does not pay for password hashing each time. 0 = off.
    #[serde(with = "humantime_serde")]
    pub auth_cache_ttl: Duration,
    /// The realm in `WWW-Authenticate: Basic realm="…"`.
    pub realm: String,
    /// Deadline for a request's header block (slowloris), also the keep-alive idle limit.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Deadline for the backend's response head.
    #[serde(with = "humantime_serde")]
    pub backend_timeout: Duration,
    /// Idle backend connections kept per instance (plain backend without PROXY v2; otherwise
    /// backend connections belong to one client connection, which keeps up to 4 idle).
    pub backend_pool_idle: usize,
    /// The authorization server's token endpoints (exact paths): `invalid_grant`,
    /// `invalid_client` and `slow_down` answers to a `POST` there count as failed logins of the
    /// client address, and an address the guard denies is answered `invalid_grant` locally.
    pub oauth_endpoints: Vec<String>,
}

/// Longest positive auth cache allowed (DESIGN.md §4: TTL <= 60 s).
pub const MAX_AUTH_CACHE_TTL: Duration = Duration::from_secs(60);

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            anonymous_paths: [
                "/.well-known/*",
                "/login",
                "/auth/token",
                "/auth/device",
                "/auth/jwks.json",
                "/auth/userinfo",
                "/auth/introspect",
                "/favicon.ico",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
            auth_cache_ttl: Duration::ZERO,
            realm: "Stalwart".into(),
            header_read_timeout: Duration::from_secs(10),
            backend_timeout: Duration::from_secs(60),
            backend_pool_idle: 32,
            oauth_endpoints: vec!["/auth/token".into()],
        }
    }
}

impl HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, p) in self.anonymous_paths.iter().enumerate() {
            let body = p.strip_suffix('*').unwrap_or(p);
            if !body.starts_with('/')
                || body.contains('*')
                || !crate::proto::http::is_plain_path(body)
            {
                return Err(invalid(
                    format!("http.anonymous_paths[{i}]"),
                    "must be an absolute path without dot segments, optionally ending in *",
                ));
            }
            if body == "/" && p.ends_with('*') {
                return Err(invalid(
                    format!("http.anonymous_paths[{i}]"),
                    "\"/*\" would make every path anonymous",
                ));
            }
        }
        for (i, p) in self.oauth_endpoints.iter().enumerate() {
            if !p.starts_with('/') || !crate::proto::http::is_plain_path(p) {
                return Err(invalid(
                    format!("http.oauth_endpoints[{i}]"),
                    "must be an absolute path without dot segments",
                ));
            }
        }
        if self.auth_cache_ttl > MAX_AUTH_CACHE_TTL {
            return Err(invalid("http.auth_cache_ttl", "must be at most 60s"));
        }
        if self.realm.is_empty()
            || self.realm.len() > 64
            || !self.realm.chars().all(|c| c.is_ascii_graphic() || c == ' ')
            || self.realm.contains(['"', '\\'])
        {
            return Err(invalid(
                "http.realm",
                "1 to 64 printable ASCII characters, no quote or backslash",
            ));
        }
        if self.header_read_timeout.is_zero() || self.backend_timeout.is_zero() {
            return Err(invalid(
                "http.header_read_timeout",
                "timeouts must be greater than zero",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Name used in greetings.
    pub hostname: String,
    /// How long SIGTERM waits for spliced sessions before closing them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Runtime worker threads; 0 = one per core. Fewer threads than cores cost less CPU per
    /// login where the proxy shares a small machine with the backend (fewer cross-thread
    /// wake-ups; see bench/RESULTS.md).
    pub worker_threads: usize,
    /// How connections are spread over the worker threads.
    pub scheduler: Scheduler,
}

/// How connections are spread over the worker threads (`server.scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// One single-threaded runtime per worker thread, each accepting on its own socket of every
    /// listener (an `SO_REUSEPORT` group, see `server::listen`); a connection stays on the
    /// thread that accepted it (nginx's model). The default: no cross-thread wake-ups on the
    /// login path.
    PerCore,
    /// One shared work-stealing runtime: an idle thread takes over tasks from a busy one, at
    /// the price of waking threads across cores.
    WorkStealing,
}

impl ServerConfig {
    /// Worker threads to run: `worker_threads`, or one per core when it is 0.
    pub fn threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }

    /// Runtimes with their own reactor: one per thread with `per-core`, one shared otherwise.
    /// Connection pools keep one pool per runtime, so a pooled connection is only used by the
    /// runtime that drives it.
    pub fn runtimes(&self) -> usize {
        match self.scheduler {
            Scheduler::PerCore => self.threads(),
            Scheduler::WorkStealing => 1,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            shutdown_grace: Duration::from_secs(30),
            worker_threads: 0,
            scheduler: Scheduler::PerCore,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM chain served when no SNI name matches (or the client sent none).
    pub default_cert: PathBuf,
    pub default_key: PathBuf,
    /// Further certificates chosen by SNI.
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<SniCertificate>,
    /// Refuse handshakes whose SNI matches no configured name (instead of using the default).
    #[serde(default)]
    pub strict_sni: bool,
    /// One deadline across the whole handshake (SECURITY.md: 10 s).
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    /// DNS names (exact, or `*.example.org` for one label).
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How the client leg of a listener is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    /// TLS from the first byte (993, 995, 465, 443).
    Implicit,
    /// Cleartext greeting, then STARTTLS/STLS (143, 110, 587, 4190).
    Starttls,
    /// No TLS at all: only for tests on loopback.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub protocol: Protocol,
    pub bind: Vec<SocketAddr>,
    pub tls: ListenerTls,
    /// ALPN ids accepted; defaults to the protocol's registered id.
    pub alpn: Option<Vec<String>>,
    /// Accept plaintext credentials on a cleartext connection. Only for loopback test listeners.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
}

/// How Portcullis reaches one backend service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendTls {
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendService {
    pub port: u16,
    pub tls: BackendTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    V2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub host: String,
    pub imap: Option<BackendService>,
    pub pop3: Option<BackendService>,
    pub submission: Option<BackendService>,
    pub managesieve: Option<BackendService>,
    pub http: Option<BackendService>,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// CA bundle for verifying the backend's certificate (default: the system's web PKI roots).
    pub tls_ca_file: Option<PathBuf>,
    /// Name to verify the backend's certificate against (default: `host`).
    pub tls_server_name: Option<String>,
    #[serde(default = "default_backend_connect", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_backend_login", with = "humantime_serde")]
    pub login_timeout: Duration,
}

fn default_backend_connect() -> Duration {
    Duration::from_secs(5)
}
fn default_backend_login() -> Duration {
    Duration::from_secs(10)
}

impl BackendConfig {
    /// The service for `protocol`, if configured.
    pub fn service(&self, protocol: Protocol) -> Option<BackendService> {
        match protocol {
            Protocol::Imap => self.imap,
            Protocol::Pop3 => self.pop3,
            Protocol::Submission => self.submission,
            Protocol::ManageSieve => self.managesieve,
            Protocol::Http => self.http,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterConfig {
    /// The master account Portcullis logs in as (`<user>%<master>`).
    pub user: String,
    /// File holding the master secret (one line; trailing newline ignored).
    pub secret_file: Option<PathBuf>,
    /// Environment variable holding the master secret (used when `secret_file` is unset).
    pub secret_env: Option<String>,
    #[serde(default = "default_separator")]
    pub separator: String,
}

fn default_separator() -> String {
    "%".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthenticatorKind {
    File,
    Nginx,
    Json,
    /// Bearer tokens only (`[authenticator.oauth]`); password logins are refused.
    #[serde(rename = "oauth")]
    OAuth,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthenticatorConfig {
    pub kind: AuthenticatorKind,
    /// `file`: the users file.
    pub users_file: Option<PathBuf>,
    /// `nginx` / `json`: the endpoint (`http://` or `https://`).
    pub url: Option<String>,
    /// Deadline for one decision, including the wait for a concurrency permit.
    #[serde(default = "default_auth_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Decisions in flight at once; further logins wait (within `timeout`).
    #[serde(default = "default_auth_concurrency")]
    pub max_concurrency: usize,
    /// `nginx` / `json`: reuse connections to the authenticator when it allows.
    #[serde(default = "default_true")]
    pub keepalive: bool,
    /// `nginx` / `json`: static headers added to every request (e.g. a shared secret).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `nginx` / `json` over https: CA bundle to verify the authenticator (default: web PKI roots).
    pub tls_ca_file: Option<PathBuf>,
    /// Bearer-token validation (XOAUTH2, OAUTHBEARER, HTTP `Bearer`). With any other kind, tokens
    /// go here and passwords to that kind; required for `kind = "oauth"`.
    pub oauth: Option<OAuthConfig>,
}

/// How bearer tokens are validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OAuthMethod {
    /// `GET url` with the token as `Authorization: Bearer` (Stalwart's opaque tokens:
    /// `/auth/userinfo`). Valid when the answer is 200 with the account claim.
    Userinfo,
    /// RFC 7662: `POST url` with `token=…`, authenticated as `client_id`/`client_secret`.
    Introspection,
    /// A signed JWT, checked against the issuer's JWKS (`jwks_url`, or OIDC discovery).
    Jwt,
}

/// `[authenticator.oauth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    pub method: OAuthMethod,
    /// `userinfo` / `introspection`: the endpoint.
    pub url: Option<String>,
    /// The token issuer. `jwt`: required; `iss` must equal it and discovery starts from it.
    /// `introspection`: when set, `iss` must equal it.
    pub issuer: Option<String>,
    /// OpenID discovery document (default: `<issuer>/.well-known/openid-configuration`). Also
    /// named in the SASL error challenge so that clients know where to get a new token.
    pub discovery_url: Option<String>,
    /// `jwt`: the JWKS, instead of discovering it.
    pub jwks_url: Option<String>,
    /// `jwt`: required, `aud` must contain one. `introspection`: checked when set.
    #[serde(default)]
    pub audience: Vec<String>,
    /// `introspection`: the client the proxy authenticates as (HTTP Basic).
    pub client_id: Option<String>,
    /// `introspection`: its secret, read from this file (never written in this one)...
    pub client_secret_file: Option<PathBuf>,
    /// ...or from this environment variable.
    pub client_secret_env: Option<String>,
    /// The claim naming the canonical account (default `preferred_username`; `username` for
    /// introspection).
    pub account_claim: Option<String>,
    /// Further claims whose values a client may give as its identity in XOAUTH2 `user=` or the
    /// OAUTHBEARER `a=`; the account claim always counts.
    #[serde(default = "default_identity_claims")]
    pub identity_claims: Vec<String>,
    /// `jwt`: accepted signature algorithms (asymmetric only).
    #[serde(default = "default_jwt_algorithms")]
    pub algorithms: Vec<String>,
    /// Longest a validated token is trusted without asking again; never past its expiry. It is
    /// also how long a revoked token can still be used: `userinfo` answers carry no expiry.
    #[serde(default = "default_token_cache_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long before its expiry a cached token is asked about again.
    #[serde(default = "default_expiry_margin", with = "humantime_serde")]
    pub expiry_margin: Duration,
    /// Tokens remembered at most.
    #[serde(default = "default_token_cache_size")]
    pub cache_size: u64,
    /// Clock skew allowed on `exp`/`nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// CA bundle for the provider's https endpoints (default: web PKI roots).
    pub tls_ca_file: Option<PathBuf>,
}

fn default_identity_claims() -> Vec<String> {
    vec!["email".into(), "preferred_username".into()]
}
fn default_jwt_algorithms() -> Vec<String> {
    [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}
fn default_token_cache_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_expiry_margin() -> Duration {
    Duration::from_secs(30)
}
fn default_token_cache_size() -> u64 {
    10_000
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_auth_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_auth_concurrency() -> usize {
    64
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GuardStore {
    #[default]
    Memory,
    Redis,
}

/// What a failure window counts by (see `[[guard.window]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKey {
    /// The client address: an IPv4 address (`ipv4_prefix`) or IPv6 network (`ipv6_prefix`).
    Ip,
    /// The client's wider network (`net4_prefix`, `net6_prefix`).
    Net,
    /// The account, whatever the address.
    Account,
    /// One address guessing one account.
    IpAccount,
}

impl WindowKey {
    /// The name used in configuration, ban keys and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Net => "net",
            Self::Account => "account",
            Self::IpAccount => "ip_account",
        }
    }
}

/// One sliding failure window: more than `max` counted failures of one key within `period`
/// start a ban.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    pub key: WindowKey,
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    pub max: u32,
}

impl WindowConfig {
    fn new(key: WindowKey, period_secs: u64, max: u32) -> Self {
        Self {
            key,
            period: Duration::from_secs(period_secs),
            max,
        }
    }
}

/// The guard: failure windows, bans, allow-lists and the store they live in.
///
/// Every key except `store`, `redis_url`, `redis_timeout`, `key_prefix` and `memory_max_keys` is
/// applied again on SIGHUP; those five shape the store and need a restart.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    pub store: GuardStore,
    pub redis_url: Option<String>,
    /// Every failed login is answered after this delay (plus up to `failure_jitter`), whatever
    /// the cause, so that causes cannot be told apart by timing.
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub failure_jitter: Duration,
    /// Deadline for one Redis round trip; past it the local store decides. Short, because it is
    /// paid on every login while Redis is slow.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// While Redis is unreachable, how often one login probes it again (the others go straight
    /// to the local store instead of each waiting for a timeout).
    #[serde(with = "humantime_serde")]
    pub redis_retry: Duration,
    /// Prefix of every Redis key, so that several deployments can share one Redis.
    pub key_prefix: String,
    /// Prefix length that makes one client: a whole IPv4 address, an IPv6 /64 (one host
    /// usually owns a whole /64, and rotates addresses inside it).
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Prefix length of the wider network counted by `key = "net"` windows.
    pub net4_prefix: u8,
    pub net6_prefix: u8,
    /// Networks (CIDR, or bare addresses) never counted, denied or banned: monitoring, webmail.
    pub allow: Vec<String>,
    /// How many distinct wrong passwords are remembered per (address, account), as truncated
    /// keyed hashes: the same wrong password again (a phone with a stale password) counts once.
    pub password_repeat: usize,
    /// The failure windows. Writing any `[[guard.window]]` replaces the whole default list.
    #[serde(rename = "window")]
    pub windows: Vec<WindowConfig>,
    /// Password spraying: more than `spray_max_users` distinct failed usernames from one address
    /// within `spray_window` start a ban.
    #[serde(with = "humantime_serde")]
    pub spray_window: Duration,
    pub spray_max_users: u32,
    /// First ban duration; each further offence within `ban_decay` multiplies it by
    /// `ban_factor`, up to `ban_max`, each spread by ±`ban_jitter` (a fraction) so that banned
    /// clients do not all come back at once.
    #[serde(with = "humantime_serde")]
    pub ban_initial: Duration,
    pub ban_factor: f64,
    #[serde(with = "humantime_serde")]
    pub ban_max: Duration,
    pub ban_jitter: f64,
    /// How long an offence is remembered after the last one.
    #[serde(with = "humantime_serde")]
    pub ban_decay: Duration,
    /// NAT and offices: an address (or network) from which at least `nat_successes` distinct
    /// accounts logged in within `nat_window` gets its `ip`/`net` windows and spray limit
    /// multiplied by `nat_factor`.
    #[serde(with = "humantime_serde")]
    pub nat_window: Duration,
    pub nat_successes: u32,
    pub nat_factor: f64,
    /// How long a successful login keeps its (address, account) known: while the account is
    /// under attack (an `account` window tripped), only known addresses may try it.
    #[serde(with = "humantime_serde")]
    pub known_for: Duration,
    /// Sessions one account may hold open at once through this instance.
    pub account_sessions: u32,
    /// Upper bound of the memory store's counter entries (bans have their own tenth of it).
    pub memory_max_keys: u64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            store: GuardStore::Memory,
            redis_url: None,
            failure_delay: Duration::from_millis(1000),
            failure_jitter: Duration::from_millis(200),
            redis_timeout: Duration::from_millis(200),
            redis_retry: Duration::from_secs(1),
            key_prefix: "portcullis:".into(),
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            net4_prefix: 24,
            net6_prefix: 48,
            allow: Vec::new(),
            password_repeat: 5,
            windows: vec![
                WindowConfig::new(WindowKey::Ip, 600, 10),
                WindowConfig::new(WindowKey::Ip, 3600, 30),
                WindowConfig::new(WindowKey::Net, 600, 100),
                WindowConfig::new(WindowKey::Account, 600, 20),
                WindowConfig::new(WindowKey::IpAccount, 600, 5),
            ],
            spray_window: Duration::from_secs(600),
            spray_max_users: 10,
            ban_initial: Duration::from_secs(300),
            ban_factor: 2.0,
            ban_max: Duration::from_secs(24 * 3600),
            ban_jitter: 0.2,
            ban_decay: Duration::from_secs(24 * 3600),
            nat_window: Duration::from_secs(3600),
            nat_successes: 5,
            nat_factor: 4.0,
            known_for: Duration::from_secs(30 * 24 * 3600),
            account_sessions: 50,
            memory_max_keys: 200_000,
        }
    }
}

impl GuardConfig {
    /// Checks the `[guard]` section alone (also used when SIGHUP reloads it).
    ///
    /// # Errors
    /// The first problem found, naming its key (`guard.window[1].max: must be > 0`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.store == GuardStore::Redis && self.redis_url.is_none() {
            return Err(invalid("guard.redis_url", "required for store = \"redis\""));
        }
        if let Some(url) = &self.redis_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(
                    "guard.redis_url",
                    "must start with redis:// (or rediss://)",
                ));
            }
        }
        let positive = |key: &str, d: Duration| {
            if d.is_zero() {
                Err(invalid(format!("guard.{key}"), "must be > 0"))
            } else {
                Ok(())
            }
        };
        positive("redis_timeout", self.redis_timeout)?;
        positive("redis_retry", self.redis_retry)?;
        positive("spray_window", self.spray_window)?;
        positive("ban_initial", self.ban_initial)?;
        positive("ban_decay", self.ban_decay)?;
        positive("nat_window", self.nat_window)?;
        positive("known_for", self.known_for)?;
        if self.redis_timeout > Duration::from_secs(10) {
            return Err(invalid("guard.redis_timeout", "must be at most 10s"));
        }
        if self.key_prefix.is_empty()
            || self
                .key_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "guard.key_prefix",
                "must be non-empty, without spaces or control characters",
            ));
        }
        if !(1..=32).contains(&self.ipv4_prefix) {
            return Err(invalid("guard.ipv4_prefix", "must be 1 to 32"));
        }
        if !(1..=128).contains(&self.ipv6_prefix) {
            return Err(invalid("guard.ipv6_prefix", "must be 1 to 128"));
        }
        if self.net4_prefix == 0 || self.net4_prefix > self.ipv4_prefix {
            return Err(invalid(
                "guard.net4_prefix",
                "must be 1 to guard.ipv4_prefix (a network holds the address)",
            ));
        }
        if self.net6_prefix == 0 || self.net6_prefix > self.ipv6_prefix {
            return Err(invalid(
                "guard.net6_prefix",
                "must be 1 to guard.ipv6_prefix (a network holds the address)",
            ));
        }
        for (i, cidr) in self.allow.iter().enumerate() {
            if let Err(e) = crate::guard::keys::Cidr::parse(cidr) {
                return Err(invalid(format!("guard.allow[{i}]"), e));
            }
        }
        if self.password_repeat > 64 {
            return Err(invalid("guard.password_repeat", "must be at most 64"));
        }
        if self.windows.is_empty() {
            return Err(invalid(
                "guard.window",
                "at least one [[guard.window]] is required (an empty list would be unlimited)",
            ));
        }
        for (i, w) in self.windows.iter().enumerate() {
            if w.max == 0 {
                return Err(invalid(format!("guard.window[{i}].max"), "must be > 0"));
            }
            if w.period < Duration::from_secs(1) || w.period > Duration::from_secs(30 * 86_400) {
                return Err(invalid(
                    format!("guard.window[{i}].period"),
                    "must be between 1s and 30days",
                ));
            }
        }
        if self.spray_max_users == 0 || self.spray_max_users > 10_000 {
            return Err(invalid("guard.spray_max_users", "must be 1 to 10000"));
        }
        if !(self.ban_factor >= 1.0 && self.ban_factor <= 100.0) {
            return Err(invalid("guard.ban_factor", "must be 1 to 100"));
        }
        if self.ban_max < self.ban_initial {
            return Err(invalid(
                "guard.ban_max",
                "must be at least guard.ban_initial",
            ));
        }
        if !(0.0..1.0).contains(&self.ban_jitter) {
            return Err(invalid(
                "guard.ban_jitter",
                "must be a fraction from 0 to below 1",
            ));
        }
        if self.nat_successes == 0 || self.nat_successes > 10_000 {
            return Err(invalid("guard.nat_successes", "must be 1 to 10000"));
        }
        if !(self.nat_factor >= 1.0 && self.nat_factor <= 1000.0) {
            return Err(invalid("guard.nat_factor", "must be 1 to 1000"));
        }
        if self.account_sessions == 0 {
            return Err(invalid("guard.account_sessions", "must be > 0"));
        }
        if self.memory_max_keys < 1_000 {
            return Err(invalid("guard.memory_max_keys", "must be at least 1000"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback (or a private management network): `/metrics`, `/healthz`, `/readyz`, `/bans`.
    pub bind: SocketAddr,
    /// Bearer token for the bans API, from a file...
    pub token_file: Option<PathBuf>,
    /// ...or an environment variable. Without a token the bans API is disabled.
    pub token_env: Option<String>,
}

impl AdminConfig {
    /// The bans-API token, if one is configured.
    ///
    /// # Errors
    /// If the configured file or variable cannot be read or is empty.
    pub fn token(&self) -> Result<Option<Secret>, ConfigError> {
        let raw = if let Some(path) = &self.token_file {
            warn_if_readable_by_others(path);
            std::fs::read(path).map_err(|e| {
                invalid(
                    "admin.token_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
        } else if let Some(var) = &self.token_env {
            std::env::var(var)
                .map_err(|_| invalid("admin.token_env", format!("variable {var} is not set")))?
                .into_bytes()
        } else {
            return Ok(None);
        };
        let token: Vec<u8> = raw
            .into_iter()
            .filter(|b| !matches!(b, b'\n' | b'\r'))
            .collect();
        if token.len() < 16 {
            return Err(invalid(
                "admin.token_file",
                "the admin token must be at least 16 bytes",
            ));
        }
        Ok(Some(Secret::new(token)))
    }
}

/// Per-connection bounds (SECURITY.md "Bounded resources before login").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest IMAP command line before login.
    pub imap_line_max: u32,
    /// Largest literal accepted before login (LOGIN arguments).
    pub imap_literal_max: u32,
    /// All literal bytes before login, together.
    pub imap_preauth_literal_total: u32,
    /// Largest IMAP command after login, its lines and literals together. Must not exceed the
    /// backend's own limit (Stalwart's IMAP maximum request size, 50 MiB by default): a command
    /// the backend found too big in the middle of a line would be answered with BAD and the
    /// rest of that read dropped, and what followed could be read as a new command.
    pub imap_command_max: u64,
    /// Failed authentications per connection before the goodbye.
    pub max_auth_failures: u32,
    /// Protocol errors per connection before the goodbye.
    pub max_protocol_errors: u32,
    /// Idle time allowed before login.
    #[serde(with = "humantime_serde")]
    pub preauth_idle: Duration,
    /// Absolute time allowed from accept to login (slowloris).
    #[serde(with = "humantime_serde")]
    pub preauth_deadline: Duration,
    /// Idle time allowed after login (both directions silent). IMAP IDLE re-issues every ~29 min.
    #[serde(with = "humantime_serde")]
    pub session_idle: Duration,
    /// Connections open at once across all listeners; over it, closed without a greeting.
    pub max_connections: usize,
    /// Connections open at once from one IPv4 address or IPv6 /64.
    pub per_ip_connections: u32,
    /// New connections per minute from one IPv4 address or IPv6 /64.
    pub per_ip_new_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            imap_line_max: 8 * 1024,
            imap_literal_max: 1024,
            imap_preauth_literal_total: 8 * 1024,
            imap_command_max: 50 * 1024 * 1024,
            max_auth_failures: 3,
            max_protocol_errors: 3,
            preauth_idle: Duration::from_secs(30),
            preauth_deadline: Duration::from_secs(60),
            session_idle: Duration::from_secs(35 * 60),
            max_connections: 20_000,
            per_ip_connections: 20,
            per_ip_new_per_minute: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `portcullis=debug`); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types alone cannot.
    ///
    /// # Errors
    /// The first problem found, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(invalid("listener", "at least one [[listener]] is required"));
        }
        if let Some(d) = &self.dnsbl {
            d.validate()
                .map_err(|(key, message)| invalid(key, message))?;
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let key = |k: &str| format!("listener[{i}].{k}");
            if l.bind.is_empty() {
                return Err(invalid(key("bind"), "needs at least one address"));
            }
            if l.tls != ListenerTls::None && self.tls.is_none() {
                return Err(invalid(
                    key("tls"),
                    "a TLS listener needs [tls] default_cert and default_key",
                ));
            }
            if l.tls == ListenerTls::None && l.bind.iter().any(|a| !a.ip().is_loopback()) {
                return Err(invalid(
                    key("tls"),
                    "tls = \"none\" is only allowed on loopback addresses",
                ));
            }
            if l.allow_plaintext_auth && l.bind.iter().any(|a| !a.ip().is_loopback()) {
                return Err(invalid(
                    key("allow_plaintext_auth"),
                    "only allowed on loopback addresses",
                ));
            }
            if l.protocol == Protocol::Http && l.tls == ListenerTls::Starttls {
                return Err(invalid(key("tls"), "http has no STARTTLS"));
            }
            if l.protocol == Protocol::ManageSieve && l.tls == ListenerTls::Implicit {
                return Err(invalid(
                    key("tls"),
                    "managesieve has no implicit TLS (RFC 5804): use \"starttls\"",
                ));
            }
            if l.protocol == Protocol::Http
                && self
                    .backend
                    .http
                    .is_some_and(|s| s.tls == BackendTls::Starttls)
            {
                return Err(invalid(
                    "backend.http.tls",
                    "HTTP has no STARTTLS: use \"none\" or \"implicit\"",
                ));
            }
            if self.backend.service(l.protocol).is_none() {
                return Err(invalid(
                    format!("backend.{}", l.protocol.label()),
                    format!(
                        "listener[{i}] serves {} but no backend is configured for it",
                        l.protocol.label()
                    ),
                ));
            }
        }
        if self.backend.host.is_empty() {
            return Err(invalid("backend.host", "must not be empty"));
        }
        let rules = crate::identity::IdentityRules::default();
        if rules.validate(self.master.user.as_bytes()).is_err() && self.master.user.contains(' ') {
            return Err(invalid("master.user", "must not contain spaces"));
        }
        if self.master.user.is_empty() {
            return Err(invalid("master.user", "must not be empty"));
        }
        if self.master.separator.is_empty() || self.master.separator.len() > 4 {
            return Err(invalid("master.separator", "must be 1 to 4 characters"));
        }
        if self.master.secret_file.is_none() && self.master.secret_env.is_none() {
            return Err(invalid(
                "master.secret_file",
                "set secret_file or secret_env (the secret never goes in this file)",
            ));
        }
        match self.authenticator.kind {
            AuthenticatorKind::File if self.authenticator.users_file.is_none() => {
                return Err(invalid(
                    "authenticator.users_file",
                    "required for kind = \"file\"",
                ));
            }
            AuthenticatorKind::Nginx | AuthenticatorKind::Json => {
                let Some(url) = &self.authenticator.url else {
                    return Err(invalid("authenticator.url", "required for this kind"));
                };
                if let Err(e) = crate::authn::http::Endpoint::parse(url) {
                    return Err(invalid("authenticator.url", e.to_string()));
                }
            }
            AuthenticatorKind::OAuth if self.authenticator.oauth.is_none() => {
                return Err(invalid(
                    "authenticator.oauth",
                    "required for kind = \"oauth\"",
                ));
            }
            AuthenticatorKind::File | AuthenticatorKind::OAuth => {}
        }
        if self.authenticator.timeout.is_zero() {
            return Err(invalid(
                "authenticator.timeout",
                "must be greater than zero",
            ));
        }
        self.guard.validate()?;
        self.http.validate()?;
        let l = &self.limits;
        if l.imap_line_max < 512 {
            return Err(invalid("limits.imap_line_max", "must be at least 512"));
        }
        if l.imap_command_max < 64 * 1024 {
            return Err(invalid("limits.imap_command_max", "must be at least 65536"));
        }
        if l.imap_literal_max > l.imap_preauth_literal_total {
            return Err(invalid(
                "limits.imap_literal_max",
                "must not exceed limits.imap_preauth_literal_total",
            ));
        }
        if l.max_auth_failures == 0 || l.max_protocol_errors == 0 {
            return Err(invalid("limits.max_auth_failures", "must be at least 1"));
        }
        if l.per_ip_connections == 0 || l.per_ip_new_per_minute == 0 {
            return Err(invalid(
                "limits.per_ip_connections",
                "per-IP caps must be at least 1",
            ));
        }
        if l.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        Ok(())
    }

    /// Loads the master secret from its file or environment variable.
    ///
    /// # Errors
    /// [`ConfigError`] naming `master.secret_file` or `master.secret_env`.
    pub fn master_secret(&self) -> Result<Secret, ConfigError> {
        let raw = if let Some(path) = &self.master.secret_file {
            warn_if_readable_by_others(path);
            std::fs::read(path).map_err(|e| {
                invalid(
                    "master.secret_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
        } else if let Some(var) = &self.master.secret_env {
            std::env::var(var)
                .map_err(|_| invalid("master.secret_env", format!("variable {var} is not set")))?
                .into_bytes()
        } else {
            return Err(invalid("master.secret_file", "not set"));
        };
        let mut secret = raw;
        while matches!(secret.last(), Some(b'\n' | b'\r')) {
            secret.pop();
        }
        if secret.is_empty() {
            return Err(invalid("master.secret_file", "the master secret is empty"));
        }
        if secret.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err(invalid(
                "master.secret_file",
                "the master secret contains control bytes",
            ));
        }
        Ok(Secret::new(secret))
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "master secret file is readable by group or others; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtimes_follow_the_scheduler_and_thread_count() {
        let per_core = |worker_threads| ServerConfig {
            worker_threads,
            ..ServerConfig::default()
        };
        assert_eq!(per_core(3).threads(), 3);
        assert_eq!(per_core(3).runtimes(), 3);
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(per_core(0).runtimes(), cores);
        let shared = ServerConfig {
            worker_threads: 3,
            scheduler: Scheduler::WorkStealing,
            ..ServerConfig::default()
        };
        assert_eq!((shared.threads(), shared.runtimes()), (3, 1));
    }

    const MINIMAL: &str = r#"
[[listener]]
protocol = "imap"
bind = ["127.0.0.1:10143"]
tls = "none"

[backend]
host = "127.0.0.1"
imap = { port = 143, tls = "none" }

[master]
user = "proxy"
secret_env = "PORTCULLIS_TEST_SECRET"

[authenticator]
kind = "file"
users_file = "config/users.toml"
"#;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.limits.imap_line_max, 8192);
        assert_eq!(c.master.separator, "%");
        assert_eq!(c.authenticator.timeout, Duration::from_secs(3));
        assert_eq!(c.guard.store, GuardStore::Memory);
    }

    #[test]
    fn http_listener_and_section_are_validated() {
        let http = MINIMAL
            .replace("protocol = \"imap\"", "protocol = \"http\"")
            .replace("imap = {", "http = {");
        let c = Config::parse(&http).unwrap();
        assert!(c.http.auth_cache_ttl.is_zero());
        assert!(c.http.anonymous_paths.iter().any(|p| p == "/.well-known/*"));
        let no_backend = http.replace("http = { port = 143, tls = \"none\" }", "");
        assert!(err(&no_backend).starts_with("backend.http:"));
        let tls = http.replace("tls = \"none\" }", "tls = \"starttls\" }");
        assert!(err(&tls).starts_with("backend.http.tls:"));
        let tls = http.replace("tls = \"none\" }", "tls = \"implicit\" }");
        assert!(Config::parse(&tls).is_ok());
        for (section, key) in [
            ("auth_cache_ttl = \"61s\"", "http.auth_cache_ttl:"),
            ("anonymous_paths = [\"/*\"]", "http.anonymous_paths[0]:"),
            (
                "anonymous_paths = [\"/a/../b\"]",
                "http.anonymous_paths[0]:",
            ),
            ("anonymous_paths = [\"x\"]", "http.anonymous_paths[0]:"),
            ("anonymous_paths = [\"/a*b\"]", "http.anonymous_paths[0]:"),
            ("realm = \"a\\\"b\"", "http.realm:"),
        ] {
            let e = err(&format!("{http}\n[http]\n{section}\n"));
            assert!(e.starts_with(key), "{section}: {e}");
        }
        let ok = Config::parse(&format!("{http}\n[http]\nauth_cache_ttl = \"60s\"\n")).unwrap();
        assert_eq!(ok.http.auth_cache_ttl, Duration::from_secs(60));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&MINIMAL.replace("[backend]", "[backend]\nbogus = 1"));
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn errors_name_their_key() {
        let e = err(&MINIMAL.replace("127.0.0.1:10143", "0.0.0.0:10143"));
        assert!(e.starts_with("listener[0].tls:"), "{e}");
        let e = err(&MINIMAL.replace("users_file = \"config/users.toml\"", ""));
        assert!(e.starts_with("authenticator.users_file:"), "{e}");
        let e = err(&MINIMAL.replace("imap = { port = 143, tls = \"none\" }", ""));
        assert!(e.starts_with("backend.imap:"), "{e}");
        let e = err(&MINIMAL.replace("tls = \"none\"\n", "tls = \"implicit\"\n"));
        assert!(e.starts_with("listener[0].tls:"), "{e}");
        let e = err(&MINIMAL.replace("kind = \"file\"", "kind = \"nginx\"\nurl = \"ftp://x\""));
        assert!(e.starts_with("authenticator.url:"), "{e}");
    }

    #[test]
    fn managesieve_listeners_need_their_backend_and_starttls() {
        let sieve = MINIMAL.replace("protocol = \"imap\"", "protocol = \"managesieve\"");
        let e = err(&sieve);
        assert!(e.starts_with("backend.managesieve:"), "{e}");
        let with_backend = sieve.replace(
            "imap = { port = 143, tls = \"none\" }",
            "managesieve = { port = 4190, tls = \"none\" }",
        );
        let c = Config::parse(&with_backend).unwrap();
        assert_eq!(c.listeners[0].protocol, Protocol::ManageSieve);
        let e = err(&format!(
            "[tls]\ndefault_cert = \"a\"\ndefault_key = \"b\"\n{}",
            with_backend.replace("tls = \"none\"\n", "tls = \"implicit\"\n")
        ));
        assert!(e.starts_with("listener[0].tls:"), "{e}");
    }

    #[test]
    fn durations_are_human() {
        let c = Config::parse(&format!("{MINIMAL}\n[limits]\npreauth_idle = \"5s\"\n")).unwrap();
        assert_eq!(c.limits.preauth_idle, Duration::from_secs(5));
        let e = err(&format!("{MINIMAL}\n[limits]\npreauth_idle = \"soon\"\n"));
        assert!(e.contains("preauth_idle"), "{e}");
    }

    #[test]
    fn guard_section_parses_and_validates() {
        let c = Config::parse(&format!(
            r#"{MINIMAL}
[guard]
store = "redis"
redis_url = "redis://127.0.0.1:6379"
redis_timeout = "150ms"
key_prefix = "mail1:"
ipv6_prefix = 56
allow = ["192.0.2.0/24", "2001:db8::1"]
password_repeat = 3
spray_window = "5m"
spray_max_users = 8
ban_initial = "1m"
ban_factor = 3.0
ban_max = "12h"
ban_jitter = 0.1
ban_decay = "2d"
nat_successes = 10
nat_factor = 8.0
account_sessions = 20

[[guard.window]]
key = "ip"
period = "1m"
max = 5

[[guard.window]]
key = "ip_account"
period = "15m"
max = 3
"#
        ))
        .unwrap();
        let g = &c.guard;
        assert_eq!(g.store, GuardStore::Redis);
        assert_eq!(g.redis_timeout, Duration::from_millis(150));
        assert_eq!(g.ipv6_prefix, 56);
        assert_eq!(g.ipv4_prefix, 32, "unset keys keep their defaults");
        assert_eq!(g.windows.len(), 2, "a window list replaces the defaults");
        assert_eq!(g.windows[1].key, WindowKey::IpAccount);
        assert_eq!(g.windows[1].period, Duration::from_secs(900));
        assert_eq!(g.ban_decay, Duration::from_secs(2 * 86_400));

        let defaults = Config::parse(MINIMAL).unwrap().guard;
        assert_eq!(defaults.windows.len(), 5);
        assert_eq!(defaults.failure_delay, Duration::from_secs(1));
        assert_eq!(defaults.password_repeat, 5);

        let guard_err = |extra: &str| err(&format!("{MINIMAL}\n[guard]\n{extra}\n"));
        let e = guard_err(
            "[[guard.window]]\nkey = \"ip\"\nperiod = \"1m\"\nmax = 5\n[[guard.window]]\nkey = \"net\"\nperiod = \"1m\"\nmax = 0",
        );
        assert_eq!(e, "guard.window[1].max: must be > 0");
        let e = guard_err("[[guard.window]]\nkey = \"host\"\nperiod = \"1m\"\nmax = 5");
        assert!(e.contains("host"), "{e}");
        assert!(guard_err("allow = [\"10.0.0.0/33\"]").starts_with("guard.allow[0]:"));
        assert!(guard_err("ban_jitter = 1.5").starts_with("guard.ban_jitter:"));
        assert!(guard_err("net4_prefix = 28\nipv4_prefix = 24").starts_with("guard.net4_prefix:"));
        assert!(guard_err("ban_max = \"1m\"").starts_with("guard.ban_max:"));
        assert!(guard_err("store = \"redis\"").starts_with("guard.redis_url:"));
        assert!(guard_err("redis_url = \"http://x\"").starts_with("guard.redis_url:"));
        assert!(guard_err("frobnicate = 1").contains("frobnicate"));
    }

    #[test]
    fn master_secret_from_env_strips_newline() {
        std::env::set_var("PORTCULLIS_TEST_SECRET", "s3cret\n");
        let c = Config::parse(MINIMAL).unwrap();
        assert!(c.master_secret().unwrap().ct_eq(b"s3cret"));
    }
}
