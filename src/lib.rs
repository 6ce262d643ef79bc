//! Portcullis: a protocol-aware authentication reverse proxy in front of Stalwart.
//!
//! The life of a connection, and where each step lives:
//!
//! - [`server`]: listeners, TLS, connection permits, shutdown.
//! - [`session`]: the phase order of one connection, one driver per protocol.
//! - [`proto`]: sans-I/O protocol state machines (no tokio); every parser is here or in [`sasl`].
//! - [`sasl`]: SASL mechanisms shared by every protocol.
//! - [`identity`]: username rules applied before anyone is asked.
//! - [`guard`]: attack detection before and after the authenticator (bans, limits, Redis).
//! - [`authn`]: the central authenticator (file, nginx auth_http, JSON).
//! - [`backend`]: connecting to Stalwart and logging in as the master user.
//! - [`splice`]: copying bytes after login, with the post-login filters.
//! - [`config`], [`secret`]: configuration and secrets that never print.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod authn;
pub mod backend;
pub mod config;
pub mod dnsbl;
pub mod guard;
pub mod identity;
pub mod metrics;
pub mod proto;
pub mod sasl;
pub mod secret;
pub mod server;
pub mod session;
pub mod splice;
pub mod stream;
pub mod tls;
pub mod zerocopy;

use serde::Deserialize;

/// The protocols Portcullis speaks on the client side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Pop3,
    Submission,
    ManageSieve,
    Http,
}

impl Protocol {
    /// Lower-case name, as in the configuration and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Imap => "imap",
            Self::Pop3 => "pop3",
            Self::Submission => "submission",
            Self::ManageSieve => "managesieve",
            Self::Http => "http",
        }
    }

    /// The IANA ALPN id accepted by default on a listener of this protocol.
    pub fn default_alpn(self) -> &'static [&'static str] {
        match self {
            Self::Imap => &["imap"],
            Self::Pop3 => &["pop3"],
            Self::Submission => &["smtp"],
            Self::ManageSieve => &["managesieve"],
            Self::Http => &["h2", "http/1.1"],
        }
    }
}
