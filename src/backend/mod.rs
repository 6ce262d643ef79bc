//! Reaching the backend (Stalwart): TCP with a deadline, PROXY v2 with the real client address,
//! TLS or STARTTLS with certificate verification, then the per-protocol master login.

pub mod learned;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{BackendConfig, BackendService, BackendTls, ProxyProtocol};
use crate::proto::imap::{BackendError, BackendEvent, BackendLogin};
use crate::proto::prelogin::BackendMachine;
use crate::secret::Secret;
use crate::stream::Conn;

/// How long a probe waits for its connection to close cleanly.
const PROBE_SHUTDOWN: Duration = Duration::from_secs(1);

/// Why the backend could not be used. All of these are temporary failures for the client.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("backend connect timed out")]
    ConnectTimeout,
    #[error("backend connect failed: {0}")]
    Connect(std::io::Error),
    #[error("backend TLS failed: {0}")]
    Tls(std::io::Error),
    #[error("backend login timed out")]
    LoginTimeout,
    #[error("backend i/o: {0}")]
    Io(std::io::Error),
    #[error("backend login: {0}")]
    Login(#[from] BackendError),
    #[error("backend misconfigured: {0}")]
    Config(String),
}

/// Facts about the client for the PROXY v2 header.
#[derive(Debug, Clone)]
pub struct ClientFacts {
    pub client: SocketAddr,
    pub local: SocketAddr,
    /// The client leg's TLS version, if it was TLS (`TLSv1.3`).
    pub tls_version: Option<String>,
}

/// Connects to the backend and logs in as the master user.
pub struct Connector {
    host: String,
    proxy_protocol: ProxyProtocol,
    tls: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    connect_timeout: Duration,
    login_timeout: Duration,
    master_user: String,
    separator: String,
    master_secret: Secret,
    /// The name the proxy gives itself on the backend leg (SMTP `EHLO`).
    helo_name: String,
    /// The IMAP backend's greeting and login reply, decoded once (see [`crate::proto::imap::BackendMemo`]).
    imap_memo: Arc<crate::proto::imap::BackendMemo>,
}

/// A logged-in backend connection.
pub struct LoggedIn {
    pub conn: Conn,
    /// Post-login capabilities as the backend sent them.
    pub capabilities: Vec<String>,
    /// Backend bytes already read past the login response.
    pub leftover: Vec<u8>,
}

impl Connector {
    /// # Errors
    /// If the TLS material or server name is unusable.
    pub fn new(
        cfg: &BackendConfig,
        master_user: &str,
        separator: &str,
        master_secret: Secret,
    ) -> Result<Self, ConnectError> {
        let tls = crate::tls::client_config(cfg.tls_ca_file.as_deref(), "backend.tls_ca_file")
            .map_err(|e| ConnectError::Config(e.to_string()))?;
        let name = cfg
            .tls_server_name
            .clone()
            .unwrap_or_else(|| cfg.host.clone());
        let server_name = ServerName::try_from(name)
            .map_err(|e| ConnectError::Config(format!("backend.tls_server_name: {e}")))?;
        Ok(Self {
            host: cfg.host.clone(),
            proxy_protocol: cfg.proxy_protocol,
            tls,
            server_name,
            connect_timeout: cfg.connect_timeout,
            login_timeout: cfg.login_timeout,
            master_user: master_user.to_owned(),
            separator: separator.to_owned(),
            master_secret,
            helo_name: "localhost".into(),
            imap_memo: Arc::default(),
        })
    }

    /// Connects; with PROXY v2 on, sends the header for `facts`, or a LOCAL header (a
    /// connection of the proxy's own, such as a probe) when there is no client.
    async fn tcp(
        &self,
        service: BackendService,
        facts: Option<&ClientFacts>,
    ) -> Result<TcpStream, ConnectError> {
        let target = (self.host.as_str(), service.port);
        let mut tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(target))
            .await
            .map_err(|_| ConnectError::ConnectTimeout)?
            .map_err(ConnectError::Connect)?;
        tcp.set_nodelay(true).map_err(ConnectError::Io)?;
        if self.proxy_protocol == ProxyProtocol::V2 {
            let header = match facts {
                Some(facts) => proxy_v2_header(facts),
                None => proxy_v2_local_header(),
            }
            .map_err(ConnectError::Io)?;
            tcp.write_all(&header).await.map_err(ConnectError::Io)?;
        }
        Ok(tcp)
    }

    /// A connection to an HTTP backend service: TCP, the PROXY v2 header for `facts` when
    /// configured, then TLS (certificate verified) when the service says `implicit`. The HTTP
    /// driver speaks HTTP over it itself.
    ///
    /// # Errors
    /// [`ConnectError`] when the backend cannot be reached in time or its TLS fails.
    pub async fn http_connect(
        &self,
        service: BackendService,
        facts: &ClientFacts,
    ) -> Result<Conn, ConnectError> {
        let tcp = self.tcp(service, Some(facts)).await?;
        match service.tls {
            BackendTls::Implicit => tokio::time::timeout(self.connect_timeout, self.upgrade(tcp))
                .await
                .map_err(|_| ConnectError::ConnectTimeout)?,
            BackendTls::None | BackendTls::Starttls => Ok(Conn::Plain(tcp)),
        }
    }

    /// The backend host name or address, as configured.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether each backend connection starts with a PROXY v2 header.
    pub fn proxy_protocol(&self) -> ProxyProtocol {
        self.proxy_protocol
    }

    /// The HTTP `Authorization` value for the master login as `account`
    /// (`Basic base64(<account><sep><master>:<secret>)`). Kept here so the secret has one owner.
    pub fn http_master_basic(&self, account: &str) -> Vec<u8> {
        crate::proto::http::master_basic(
            account,
            &self.separator,
            &self.master_user,
            &self.master_secret,
        )
    }

    /// Stalwart's JSON login form (`POST /api/auth`) rewritten for the master login as `account`.
    pub fn http_master_form(
        &self,
        form: &crate::proto::http::LoginForm,
        account: &str,
    ) -> zeroize::Zeroizing<Vec<u8>> {
        form.rewritten(
            account,
            &self.separator,
            &self.master_user,
            &self.master_secret,
        )
    }

    /// Sets the name used in `EHLO` towards the backend (`server.hostname`).
    #[must_use]
    pub fn with_helo_name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.helo_name);
        self
    }

    async fn upgrade(&self, tcp: TcpStream) -> Result<Conn, ConnectError> {
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(ConnectError::Tls)?;
        Ok(Conn::Client(Box::new(tls)))
    }

    /// The master login for `account` in IMAP.
    pub fn imap_machine(&self, account: &str, service: BackendService) -> BackendLogin {
        BackendLogin::new(
            account,
            &self.master_user,
            &self.separator,
            &self.master_secret,
            service.tls == BackendTls::Starttls,
        )
        .with_memo(self.imap_memo.clone())
    }

    /// The master login for `account` in POP3.
    pub fn pop3_machine(
        &self,
        account: &str,
        service: BackendService,
    ) -> crate::proto::pop3::Pop3BackendLogin {
        crate::proto::pop3::Pop3BackendLogin::new(
            account,
            &self.master_user,
            &self.separator,
            &self.master_secret,
            service.tls == BackendTls::Starttls,
        )
    }

    /// The submission master login for `account`.
    pub fn smtp_machine(
        &self,
        account: &str,
        service: BackendService,
    ) -> crate::proto::smtp::SmtpBackendLogin {
        crate::proto::smtp::SmtpBackendLogin::login(
            account,
            &self.master_user,
            &self.separator,
            &self.master_secret,
            &self.helo_name,
            service.tls == BackendTls::Starttls,
        )
    }

    /// The submission keyword probe.
    pub fn smtp_probe(&self, service: BackendService) -> crate::proto::smtp::SmtpBackendLogin {
        crate::proto::smtp::SmtpBackendLogin::probe(
            &self.helo_name,
            service.tls == BackendTls::Starttls,
        )
    }

    /// The master login for `account` in ManageSieve.
    pub fn sieve_machine(
        &self,
        account: &str,
        service: BackendService,
    ) -> crate::proto::sieve::SieveBackendLogin {
        crate::proto::sieve::SieveBackendLogin::new(
            account,
            &self.master_user,
            &self.separator,
            &self.master_secret,
            service.tls == BackendTls::Starttls,
        )
    }

    /// Connects to the backend service and runs `login` (a protocol's master-login machine).
    ///
    /// # Errors
    /// Any [`ConnectError`]; the session answers the client with a temporary failure.
    pub async fn login<B: BackendMachine>(
        &self,
        service: BackendService,
        facts: &ClientFacts,
        login: B,
    ) -> Result<LoggedIn, ConnectError> {
        tokio::time::timeout(self.login_timeout, self.drive(service, Some(facts), login))
            .await
            .map_err(|_| ConnectError::LoginTimeout)?
    }

    /// The longest a [`Connector::probe`] can take, connection shutdown included.
    pub fn probe_deadline(&self) -> Duration {
        self.connect_timeout + PROBE_SHUTDOWN
    }

    /// Runs a probe machine (one that ends with `LoggedIn(capabilities)` without logging in)
    /// and returns what it learned. The connection is the proxy's own (PROXY v2 `LOCAL`), and
    /// the whole probe is bounded by the connect timeout, so a client waiting for its greeting
    /// never waits longer than that.
    ///
    /// # Errors
    /// Any [`ConnectError`]; the caller falls back to the protocol's defaults.
    pub async fn probe<B: BackendMachine>(
        &self,
        service: BackendService,
        probe: B,
    ) -> Result<Vec<String>, ConnectError> {
        let mut done = tokio::time::timeout(self.connect_timeout, self.drive(service, None, probe))
            .await
            .map_err(|_| ConnectError::ConnectTimeout)??;
        let _ = tokio::time::timeout(PROBE_SHUTDOWN, done.conn.shutdown()).await;
        Ok(done.capabilities)
    }

    /// Connects and runs a backend machine to its end, without a deadline of its own.
    async fn drive<B: BackendMachine>(
        &self,
        service: BackendService,
        facts: Option<&ClientFacts>,
        mut login: B,
    ) -> Result<LoggedIn, ConnectError> {
        let tcp = self.tcp(service, facts).await?;
        let mut conn = match service.tls {
            BackendTls::Implicit => self.upgrade(tcp).await?,
            _ => Conn::Plain(tcp),
        };
        let mut buf = vec![0u8; 4096];
        loop {
            let ev = login.advance();
            let out = login.take_output();
            if !out.is_empty() {
                conn.write_all(&out).await.map_err(ConnectError::Io)?;
                conn.flush().await.map_err(ConnectError::Io)?;
            }
            match ev {
                BackendEvent::NeedInput => {
                    let n = conn.read(&mut buf).await.map_err(ConnectError::Io)?;
                    if n == 0 {
                        return Err(BackendError::Closed.into());
                    }
                    login.feed(&buf[..n]);
                }
                BackendEvent::StartTls => {
                    let Conn::Plain(tcp) = conn else {
                        return Err(BackendError::Protocol.into());
                    };
                    conn = self.upgrade(tcp).await?;
                    login.tls_started();
                    let out = login.take_output();
                    conn.write_all(&out).await.map_err(ConnectError::Io)?;
                    conn.flush().await.map_err(ConnectError::Io)?;
                }
                BackendEvent::LoggedIn(capabilities) => {
                    let leftover = login.take_leftover();
                    return Ok(LoggedIn {
                        conn,
                        capabilities,
                        leftover,
                    });
                }
                BackendEvent::Failed(e) => return Err(e.into()),
            }
        }
    }
}

/// A PROXY v2 LOCAL header: the proxy's own connection, no client address to report.
///
/// # Errors
/// Only if the header cannot be encoded.
pub fn proxy_v2_local_header() -> std::io::Result<Vec<u8>> {
    use ppp::v2::{AddressFamily, Builder, Command, Protocol, Version};
    Builder::new(
        Version::Two | Command::Local,
        AddressFamily::Unspecified | Protocol::Unspecified,
    )
    .build()
}

/// PROXY protocol v2 header carrying the client's address and, when the client leg was TLS, the
/// SSL TLV (`client_ssl` set), so that Stalwart treats the session as TLS.
///
/// # Errors
/// Only if the header cannot be encoded.
pub fn proxy_v2_header(facts: &ClientFacts) -> std::io::Result<Vec<u8>> {
    use ppp::v2::{Builder, Command, Protocol, Type, Version};
    let (src, dst) = match (facts.client, facts.local) {
        (SocketAddr::V4(a), SocketAddr::V6(b)) => (
            SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
            SocketAddr::V6(b),
        ),
        (SocketAddr::V6(a), SocketAddr::V4(b)) => (
            SocketAddr::V6(a),
            SocketAddr::new(b.ip().to_ipv6_mapped().into(), b.port()),
        ),
        pair => pair,
    };
    let mut builder =
        Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst));
    if let Some(version) = &facts.tls_version {
        // PP2_TYPE_SSL: client flags (PP2_CLIENT_SSL), verify (0 = ok), then sub-TLVs.
        let mut value = vec![0x01, 0, 0, 0, 0];
        value.push(Type::SSLVersion as u8);
        value.extend_from_slice(&(version.len() as u16).to_be_bytes());
        value.extend_from_slice(version.as_bytes());
        builder = builder.write_tlv(Type::SSL, &value)?;
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_header_round_trips_with_ssl_tlv() {
        let facts = ClientFacts {
            client: "203.0.113.7:51000".parse().unwrap(),
            local: "127.0.0.1:993".parse().unwrap(),
            tls_version: Some("TLSv1.3".into()),
        };
        let bytes = proxy_v2_header(&facts).unwrap();
        let parsed = ppp::v2::Header::try_from(bytes.as_slice()).unwrap();
        match parsed.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                assert_eq!(a.source_address.to_string(), "203.0.113.7");
                assert_eq!(a.source_port, 51000);
            }
            other => panic!("{other:?}"),
        }
        let tlvs: Vec<_> = parsed.tlvs().collect::<Result<_, _>>().unwrap();
        assert_eq!(tlvs.len(), 1);
        assert_eq!(tlvs[0].kind, 0x20);
        assert_eq!(tlvs[0].value[0], 0x01);
        assert!(tlvs[0].value.ends_with(b"TLSv1.3"));
        let plain = proxy_v2_header(&ClientFacts {
            tls_version: None,
            ..facts
        })
        .unwrap();
        let parsed = ppp::v2::Header::try_from(plain.as_slice()).unwrap();
        assert_eq!(parsed.tlvs().count(), 0);
    }

    #[test]
    fn local_header_carries_no_address() {
        let bytes = proxy_v2_local_header().unwrap();
        let parsed = ppp::v2::Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(parsed.command, ppp::v2::Command::Local);
        assert_eq!(parsed.addresses, ppp::v2::Addresses::Unspecified);
    }
}
