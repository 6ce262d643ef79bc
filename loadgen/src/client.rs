//! One client connection: TCP (TCP_NODELAY), optional implicit TLS, and the few protocol
//! exchanges the benchmark needs (IMAP, POP3, SMTP, and HTTP requests with Basic auth), with
//! literal-aware IMAP reading.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::dotend::DotEnd;

/// The protocols the generator speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Imap,
    Pop3,
    Smtp,
    /// HTTP/1.1 `GET` with `Authorization: Basic` on a keep-alive connection: "login" is the
    /// first authenticated request, the small command a second one (each is authenticated on
    /// its own, as a DAV client's are).
    Http,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Imap => "imap",
            Proto::Pop3 => "pop3",
            Proto::Smtp => "smtp",
            Proto::Http => "http",
        }
    }
}

/// The path every HTTP request asks for (a JMAP session resource; the backend answers any).
pub const HTTP_PATH: &str = "/jmap/session";

/// Accepts any server certificate: the benchmark measures the servers, not the client's
/// path validation, and every contestant presents the same certificate anyway.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3 client config without session resumption: every login is a full handshake.
pub fn tls_connector() -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                .with_no_client_auth()
        })
        .unwrap_or_else(|e| panic!("TLS 1.3 with ring: {e}"));
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

enum Inner {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Inner {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Inner {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// A connected client with a read buffer.
pub struct Conn {
    io: BufReader<Inner>,
    line: Vec<u8>,
    tag: u32,
    /// Literal and line bytes received since the last `take_received`.
    pub received: u64,
}

impl Conn {
    pub async fn connect(addr: SocketAddr, tls: Option<&TlsConnector>) -> io::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let inner = match tls {
            None => Inner::Plain(tcp),
            Some(connector) => {
                let name = ServerName::try_from("localhost").map_err(|e| err(e.to_string()))?;
                Inner::Tls(Box::new(connector.connect(name, tcp).await?))
            }
        };
        Ok(Conn {
            io: BufReader::with_capacity(64 * 1024, inner),
            line: Vec::with_capacity(512),
            tag: 0,
            received: 0,
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let w = self.io.get_mut();
        w.write_all(bytes).await?;
        w.flush().await
    }

    /// Reads one line (with its CRLF) into `self.line`.
    async fn read_line(&mut self) -> io::Result<()> {
        self.line.clear();
        let n = self.io.read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            return Err(err("connection closed by server"));
        }
        self.received += n as u64;
        Ok(())
    }

    fn line_str(&self) -> String {
        String::from_utf8_lossy(&self.line).trim_end().to_string()
    }

    /// Skips `n` literal bytes.
    async fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            let buf = self.io.fill_buf().await?;
            if buf.is_empty() {
                return Err(err("connection closed inside a literal"));
            }
            let take = buf.len().min(n as usize);
            self.io.consume(take);
            n -= take as u64;
            self.received += take as u64;
        }
        Ok(())
    }

    /// Literal length announced at the end of the current IMAP line, if any.
    fn literal_len(&self) -> Option<u64> {
        let l = self.line.strip_suffix(b"\r\n").unwrap_or(&self.line);
        let l = l.strip_suffix(b"}")?;
        let open = l.iter().rposition(|&b| b == b'{')?;
        std::str::from_utf8(&l[open + 1..]).ok()?.parse().ok()
    }

    // ---- IMAP ----

    fn next_tag(&mut self) -> String {
        self.tag += 1;
        format!("a{}", self.tag)
    }

    /// Sends `cmd` with a fresh tag and reads to its tagged completion, skipping literals;
    /// errors unless it is OK. Returns the untagged `* N EXISTS` seen, if any.
    pub async fn imap(&mut self, cmd: &str) -> io::Result<Option<u64>> {
        let tag = self.next_tag();
        self.send(format!("{tag} {cmd}\r\n").as_bytes()).await?;
        self.imap_complete(&tag).await
    }

    async fn imap_complete(&mut self, tag: &str) -> io::Result<Option<u64>> {
        let mut exists = None;
        loop {
            self.read_line().await?;
            while let Some(n) = self.literal_len() {
                self.skip(n).await?;
                self.read_line().await?;
            }
            if self.line.starts_with(b"* ") && self.line.ends_with(b" EXISTS\r\n") {
                exists = std::str::from_utf8(&self.line[2..self.line.len() - 9])
                    .ok()
                    .and_then(|s| s.parse().ok());
            }
            if self.line.starts_with(tag.as_bytes()) && self.line.get(tag.len()) == Some(&b' ') {
                let rest = &self.line[tag.len() + 1..];
                return if rest.starts_with(b"OK") {
                    Ok(exists)
                } else {
                    Err(err(format!("{tag}: {}", self.line_str())))
                };
            }
        }
    }

    pub async fn imap_greeting(&mut self) -> io::Result<()> {
        self.read_line().await?;
        if self.line.starts_with(b"* OK") {
            Ok(())
        } else {
            Err(err(format!("greeting: {}", self.line_str())))
        }
    }

    /// APPENDs `msg` to `mailbox` (synchronizing literal: works through every proxy).
    pub async fn imap_append(&mut self, mailbox: &str, msg: &[u8]) -> io::Result<()> {
        let tag = self.next_tag();
        self.send(format!("{tag} APPEND {mailbox} {{{}}}\r\n", msg.len()).as_bytes())
            .await?;
        self.read_line().await?;
        if !self.line.starts_with(b"+") {
            return Err(err(format!("APPEND: {}", self.line_str())));
        }
        let w = self.io.get_mut();
        w.write_all(msg).await?;
        w.write_all(b"\r\n").await?;
        w.flush().await?;
        self.imap_complete(&tag).await.map(|_| ())
    }

    /// Sends IDLE and waits for the continuation; the connection then stays idle.
    pub async fn imap_idle(&mut self) -> io::Result<()> {
        let tag = self.next_tag();
        self.send(format!("{tag} IDLE\r\n").as_bytes()).await?;
        loop {
            self.read_line().await?;
            if self.line.starts_with(b"+") {
                return Ok(());
            }
            if self.line.starts_with(tag.as_bytes()) {
                return Err(err(format!("IDLE: {}", self.line_str())));
            }
        }
    }

    // ---- POP3 ----

    async fn pop3_ok(&mut self) -> io::Result<()> {
        self.read_line().await?;
        if self.line.starts_with(b"+OK") {
            Ok(())
        } else {
            Err(err(format!("pop3: {}", self.line_str())))
        }
    }

    pub async fn pop3(&mut self, cmd: &str) -> io::Result<()> {
        self.send(format!("{cmd}\r\n").as_bytes()).await?;
        self.pop3_ok().await
    }

    /// `RETR n`, read to the end of its multi-line answer without looking at lines: the bytes
    /// are only searched for the terminating `CRLF . CRLF`, as a mail client's download would.
    pub async fn pop3_retr(&mut self, n: u32) -> io::Result<()> {
        self.send(format!("RETR {n}\r\n").as_bytes()).await?;
        self.pop3_ok().await?;
        let mut end = DotEnd::new();
        loop {
            let buf = self.io.fill_buf().await?;
            if buf.is_empty() {
                return Err(err("connection closed inside a RETR answer"));
            }
            let found = end.scan(buf);
            let take = found.unwrap_or(buf.len());
            self.io.consume(take);
            self.received += take as u64;
            if found.is_some() {
                return Ok(());
            }
        }
    }

    // ---- SMTP ----

    /// Reads a (multi-line) SMTP reply and checks its code.
    async fn smtp_reply(&mut self, code: &[u8; 3]) -> io::Result<()> {
        loop {
            self.read_line().await?;
            if self.line.len() < 4 || &self.line[..3] != code {
                return Err(err(format!(
                    "smtp: expected {}: {}",
                    String::from_utf8_lossy(code),
                    self.line_str()
                )));
            }
            if self.line[3] == b' ' || self.line[3] == b'\r' {
                return Ok(());
            }
        }
    }

    pub async fn smtp(&mut self, cmd: &str, code: &[u8; 3]) -> io::Result<()> {
        self.send(format!("{cmd}\r\n").as_bytes()).await?;
        self.smtp_reply(code).await
    }

    /// One message submission: `MAIL`, `RCPT`, `DATA`, the body and its terminator, each step
    /// waiting for its reply (no PIPELINING, which not every contestant offers). `msg` must end
    /// in CRLF and have no line starting with a dot.
    pub async fn smtp_send(&mut self, msg: &[u8]) -> io::Result<()> {
        self.smtp("MAIL FROM:<bench@example.org>", b"250").await?;
        self.smtp("RCPT TO:<sink@example.org>", b"250").await?;
        self.smtp("DATA", b"354").await?;
        let w = self.io.get_mut();
        w.write_all(msg).await?;
        w.write_all(b".\r\n").await?;
        w.flush().await?;
        self.smtp_reply(b"250").await
    }

    // ---- HTTP ----

    /// One `GET` with Basic credentials; reads the response head and its `Content-Length` body
    /// and errors unless the status is 2xx.
    pub async fn http_get(&mut self, path: &str, user: &str, pass: &str) -> io::Result<()> {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        self.send(
            format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {basic}\r\nUser-Agent: portcullis-loadgen\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        self.read_line().await?;
        let status = self.line_str();
        let ok = status
            .split(' ')
            .nth(1)
            .is_some_and(|code| code.starts_with('2'));
        let mut length = 0u64;
        loop {
            self.read_line().await?;
            if self.line == b"\r\n" {
                break;
            }
            let header = String::from_utf8_lossy(&self.line);
            if let Some((name, value)) = header.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-length") {
                    length = value
                        .trim()
                        .parse()
                        .map_err(|_| err("bad Content-Length"))?;
                }
            }
        }
        self.skip(length).await?;
        if ok {
            Ok(())
        } else {
            Err(err(format!("http: {status}")))
        }
    }

    // ---- whole sessions ----

    /// Greeting and login; the login is complete (the client may send commands) on return.
    pub async fn login(&mut self, proto: Proto, user: &str, pass: &str) -> io::Result<()> {
        match proto {
            Proto::Imap => {
                self.imap_greeting().await?;
                self.imap(&format!("LOGIN {user} {pass}")).await.map(|_| ())
            }
            Proto::Pop3 => {
                self.pop3_ok().await?;
                self.pop3(&format!("USER {user}")).await?;
                self.pop3(&format!("PASS {pass}")).await
            }
            Proto::Smtp => {
                self.smtp_reply(b"220").await?;
                self.smtp("EHLO bench.example.org", b"250").await?;
                let plain =
                    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
                self.smtp(&format!("AUTH PLAIN {plain}"), b"235").await
            }
            Proto::Http => self.http_get(HTTP_PATH, user, pass).await,
        }
    }

    /// One small command after login.
    pub async fn small_command(&mut self, proto: Proto) -> io::Result<()> {
        match proto {
            Proto::Imap => self.imap("NOOP").await.map(|_| ()),
            Proto::Pop3 => self.pop3("STAT").await,
            Proto::Smtp => self.smtp("NOOP", b"250").await,
            Proto::Http => Err(err("HTTP needs the credentials: use http_get")),
        }
    }

    /// Logs out and waits for the server's goodbye (and, for IMAP, the tagged OK).
    pub async fn logout(&mut self, proto: Proto) -> io::Result<()> {
        match proto {
            Proto::Imap => self.imap("LOGOUT").await.map(|_| ())?,
            Proto::Pop3 => self.pop3("QUIT").await?,
            Proto::Smtp => self.smtp("QUIT", b"221").await?,
            Proto::Http => {}
        }
        let _ = self.io.get_mut().shutdown().await;
        Ok(())
    }
}
