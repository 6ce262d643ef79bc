//! TLS material and configurations: one `ServerConfig` per listener, certificates chosen by SNI
//! with a default, strict ALPN, no 0-RTT; and the client configuration for the backend leg.
//!
//! Certificates live behind an [`ArcSwap`] so a reload swaps them for new handshakes while live
//! sessions keep theirs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use crate::authn::TlsInfo;
use crate::config::TlsConfig;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{key}: cannot load {path}: {message}")]
    Load {
        key: String,
        path: String,
        message: String,
    },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider Portcullis uses (ring), passed explicitly so no global state is needed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_key(cert: &Path, key: &Path, key_name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let err = |path: &Path, message: String| TlsError::Load {
        key: key_name.to_owned(),
        path: path.display().to_string(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(err(cert, "no certificate in the file".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, e.to_string()))?;
    let ck =
        CertifiedKey::from_der(chain, private, &provider()).map_err(|e| err(key, e.to_string()))?;
    Ok(Arc::new(ck))
}

/// Certificates by name, plus the default.
#[derive(Debug)]
pub struct CertStore {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.org` stored as `example.org`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    strict: bool,
}

impl CertStore {
    /// Loads every certificate named in `[tls]`.
    ///
    /// # Errors
    /// [`TlsError::Load`] naming the key and file.
    pub fn load(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let default = load_key(&cfg.default_cert, &cfg.default_key, "tls.default_cert")?;
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, c) in cfg.certificates.iter().enumerate() {
            let ck = load_key(&c.cert, &c.key, &format!("tls.certificate[{i}]"))?;
            for name in &c.names {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.insert(parent.to_owned(), ck.clone()),
                    None => exact.insert(name, ck.clone()),
                };
            }
        }
        Ok(Self {
            default,
            exact,
            wildcard,
            strict: cfg.strict_sni,
        })
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = sni else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(ck) = self.exact.get(&name) {
            return Some(ck.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(ck) = self.wildcard.get(parent) {
                return Some(ck.clone());
            }
        }
        if self.strict {
            None
        } else {
            Some(self.default.clone())
        }
    }
}

/// SNI certificate selection over a hot-swappable store.
#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
}

impl SniResolver {
    pub fn new(store: CertStore) -> Self {
        Self {
            store: ArcSwap::from_pointee(store),
        }
    }

    /// Replaces the certificates for handshakes that start from now on.
    pub fn replace(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().pick(hello.server_name())
    }
}

/// A server configuration for one listener. rustls refuses a ClientHello whose ALPN list shares
/// nothing with `alpn` (the ALPACA defence) and accepts one that offers no ALPN at all.
///
/// # Errors
/// If the provider cannot offer TLS 1.2/1.3.
pub fn server_config(
    resolver: Arc<SniResolver>,
    alpn: &[String],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    cfg.max_early_data_size = 0;
    cfg.send_half_rtt_data = false;
    Ok(Arc::new(cfg))
}

/// The client configuration for the backend leg: certificates verified against `ca_file` or
/// the web PKI roots. Never downgraded.
///
/// # Errors
/// [`TlsError::Load`] if the CA file cannot be read.
pub fn client_config(
    ca_file: Option<&Path>,
    key: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| TlsError::Load {
                key: key.into(),
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            for cert in certs {
                let cert = cert.map_err(|e| TlsError::Load {
                    key: key.into(),
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                roots.add(cert)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// What an authenticator may want to know about the client's TLS session.
pub fn tls_info(conn: &rustls::ServerConnection) -> TlsInfo {
    TlsInfo {
        version: conn
            .protocol_version()
            .and_then(|v| v.as_str())
            .map(|s| s.replace("TLSv1_", "TLSv1."))
            .unwrap_or_default(),
        cipher: conn
            .negotiated_cipher_suite()
            .and_then(|c| c.suite().as_str())
            .unwrap_or_default()
            .to_owned(),
        sni: conn.server_name().map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SniCertificate;

    fn write_cert(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn store(strict: bool) -> (CertStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (dc, dk) = write_cert(dir.path(), "default.test");
        let (oc, ok) = write_cert(dir.path(), "imap.other.test");
        let cfg = TlsConfig {
            default_cert: dc,
            default_key: dk,
            certificates: vec![SniCertificate {
                names: vec!["imap.other.test".into(), "*.wild.test".into()],
                cert: oc,
                key: ok,
            }],
            strict_sni: strict,
            handshake_timeout: std::time::Duration::from_secs(1),
        };
        (CertStore::load(&cfg).unwrap(), dir)
    }

    #[test]
    fn sni_picks_the_named_certificate_and_falls_back_to_the_default() {
        let (s, _dir) = store(false);
        let default = s.pick(None).unwrap();
        let other = s.pick(Some("IMAP.other.test")).unwrap();
        assert!(!Arc::ptr_eq(&default, &other));
        assert!(Arc::ptr_eq(
            &other,
            &s.pick(Some("mail.wild.test")).unwrap()
        ));
        assert!(Arc::ptr_eq(
            &default,
            &s.pick(Some("a.b.wild.test")).unwrap()
        ));
        assert!(Arc::ptr_eq(
            &default,
            &s.pick(Some("unknown.test")).unwrap()
        ));
        let (strict, _dir) = store(true);
        assert!(strict.pick(Some("unknown.test")).is_none());
        assert!(strict.pick(None).is_some());
    }

    #[test]
    fn load_errors_name_the_key_and_file() {
        let cfg = TlsConfig {
            default_cert: "/nonexistent/cert.pem".into(),
            default_key: "/nonexistent/key.pem".into(),
            certificates: vec![],
            strict_sni: false,
            handshake_timeout: std::time::Duration::from_secs(1),
        };
        let e = CertStore::load(&cfg).unwrap_err().to_string();
        assert!(
            e.starts_with("tls.default_cert: cannot load /nonexistent/cert.pem"),
            "{e}"
        );
    }
}
