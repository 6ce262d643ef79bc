//! Support code for Portcullis' integration tests (`mod common;` in a test file).
//!
//! - [`dovecot`]: a private Dovecot per test, the stand-in for Stalwart.
//! - [`smtpsink`]: the SMTP server Dovecot's submission relays to.
//! - [`authhttp`]: an nginx-style `auth_http` authenticator with failure modes.
//! - [`clients`]: runs the Python protocol clients in `tests/clients/`.
//! - [`jmapbackend`]: a small JMAP server that only knows the master logins.
//! - [`oidc`]: a private OpenID provider (node-oidc-provider) issuing real OAuth tokens.
//! - [`redis`]: a private redis-server for the guard's shared store.
//! - [`ports`]: loopback port helpers.
//!
//! ```ignore
//! let dovecot = Dovecot::start();
//! let auth = AuthHttpServer::start(dovecot.addr(dovecot.imap_port()));
//! // ... start the proxy with auth.url() and dovecot's ports, then:
//! Client::imap(proxy_port)
//!     .login("alice@example.org", "alice-password")
//!     .actions(&["select", "fetch"])
//!     .run()
//!     .assert_ok();
//! assert!(dovecot.saw_master_login("alice@example.org"));
//! ```
//!
//! Everything here is synchronous and the servers run on their own threads,
//! so the helpers work from `#[test]` and `#[tokio::test]` alike (in async
//! tests they block the calling task briefly, e.g. ~0.1 s for `Dovecot::start`).

// Each test binary uses a different subset of the helpers.
#![allow(dead_code)]

pub mod authhttp;
pub mod clients;
pub mod dnsmasq;
pub mod dovecot;
pub mod httpbackend;
pub mod jmapbackend;
pub mod oidc;
pub mod ports;
pub mod proxy;
pub mod redis;
pub mod smtpsink;
