//! A recording HTTP/1.1 backend that stands in for Stalwart's HTTP side: it keeps every request
//! head and body exactly as Portcullis sent it, answers like Stalwart does for Basic (the master
//! form `<account>%<master>:<secret>` for a known account → 200, anything else → 401), and
//! upgrades `/ws` to an echoing WebSocket-like byte stream.
//!
//! Paths: `/echo*` answers with the request body; `/big/<n>` answers with `n` bytes;
//! `/ws` answers 101 and echoes bytes; anything else answers `ok`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use base64::Engine as _;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header lines in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The connection it came on (0-based, in accept order).
    pub conn: usize,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The decoded Basic credential, if any.
    pub fn basic(&self) -> Option<String> {
        let v = self.header("authorization")?.strip_prefix("Basic ")?;
        let raw = base64::engine::general_purpose::STANDARD.decode(v).ok()?;
        String::from_utf8(raw).ok()
    }
}

pub struct HttpBackend {
    port: u16,
    seen: Arc<Mutex<Vec<Recorded>>>,
    /// Raw bytes received on each connection before the first request (a PROXY header).
    preambles: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl HttpBackend {
    /// Starts on a free loopback port; `accept` is the list of `user:password` strings answered
    /// 200 (the master forms); `proxy_v2` expects a PROXY v2 header first on every connection.
    pub fn start(accept: Vec<String>, proxy_v2: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let preambles = Arc::new(Mutex::new(Vec::new()));
        let accept = Arc::new(accept);
        {
            let seen = seen.clone();
            let preambles = preambles.clone();
            thread::spawn(move || {
                for (n, stream) in listener.incoming().enumerate() {
                    let Ok(stream) = stream else { continue };
                    let seen = seen.clone();
                    let preambles = preambles.clone();
                    let accept = accept.clone();
                    thread::spawn(move || {
                        let _ = serve(stream, n, &seen, &preambles, &accept, proxy_v2);
                    });
                }
            });
        }
        Self {
            port,
            seen,
            preambles,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn seen(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    pub fn preambles(&self) -> Vec<Vec<u8>> {
        self.preambles.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

fn serve(
    stream: TcpStream,
    conn: usize,
    seen: &Mutex<Vec<Recorded>>,
    preambles: &Mutex<Vec<Vec<u8>>>,
    accept: &[String],
    proxy_v2: bool,
) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    if proxy_v2 {
        let mut head = [0u8; 16];
        r.read_exact(&mut head)?;
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        let mut rest = vec![0u8; len];
        r.read_exact(&mut rest)?;
        let mut all = head.to_vec();
        all.extend_from_slice(&rest);
        preambles.lock().unwrap().push(all);
    }
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut it = line.trim_end().split(' ');
        let method = it.next().unwrap_or_default().to_owned();
        let path = it.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end_matches(['\r', '\n']);
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if let Some(len) = get("content-length") {
            let len: usize = len.parse().unwrap_or(0);
            body.resize(len, 0);
            r.read_exact(&mut body)?;
        } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                r.read_line(&mut size)?;
                let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                    .unwrap_or(0);
                let mut chunk = vec![0u8; size + 2];
                r.read_exact(&mut chunk)?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        }
        let rec = Recorded {
            method: method.clone(),
            path: path.clone(),
            headers,
            body,
            conn,
        };
        seen.lock().unwrap().push(rec.clone());
        let authorized = rec.basic().is_some_and(|b| accept.contains(&b));
        let anonymous = path.starts_with("/.well-known/") || path.starts_with("/auth/");
        if !authorized && !anonymous && path != "/api/auth" {
            out.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"backend\"\r\nContent-Length: 6\r\n\r\nnoauth",
            )?;
            continue;
        }
        if path == "/ws" {
            out.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")?;
            let mut buf = [0u8; 4096];
            // Whatever the reader already buffered comes first.
            let pending = r.buffer().to_vec();
            r.consume(pending.len());
            out.write_all(&pending)?;
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                out.write_all(&buf[..n])?;
            }
        }
        let reply: Vec<u8> = if path.starts_with("/echo") {
            rec.body.clone()
        } else if let Some(n) = path.strip_prefix("/big/") {
            vec![b'x'; n.parse().unwrap_or(0)]
        } else if path == "/api/auth" {
            if rec.body.is_empty() {
                b"{}".to_vec()
            } else {
                rec.body.clone()
            }
        } else {
            b"ok".to_vec()
        };
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Backend: recorder\r\n\r\n",
            reply.len()
        )?;
        out.write_all(&reply)?;
    }
}

/// A TLS terminator in front of a plain backend port (the dev certificate for `localhost`), so
/// the recording backend can stand in for Stalwart's HTTPS listener. Returns its port; runs until
/// the test process ends.
pub fn tls_front(target: u16) -> u16 {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = super::proxy::repo().join("certs-dev");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certs.join("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let port = std_listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
    });
    port
}
