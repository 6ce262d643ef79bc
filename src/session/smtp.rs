//! SMTP submission: the pre-login machine and the master login plugged into the shared
//! runner; bytes pass unchanged after login.

use std::sync::Arc;

use super::runner::{self, Plug};
use super::{ConnCtx, ListenerCtx, SharedRef};
use crate::authn::TlsInfo;
use crate::config::ListenerTls;
use crate::proto::smtp::{client_keywords, SmtpOptions, SmtpPreAuth, DEFAULT_KEYWORDS};
use crate::splice::Passthrough;
use crate::stream::Conn;
use crate::Protocol;

/// Runs one submission connection to its end.
pub async fn run(
    shared: SharedRef,
    listener: ListenerCtx,
    ctx: ConnCtx,
    conn: Conn,
    tls: Option<TlsInfo>,
) {
    // Boxed: this task keeps its largest state for the life of the session.
    let learned = Box::pin(super::learned_capabilities(
        &shared,
        Protocol::Submission,
        |c, service| c.smtp_probe(service),
    ))
    .await;
    let keywords = match learned {
        Some(k) => client_keywords(&k),
        None => DEFAULT_KEYWORDS.iter().map(|k| (*k).to_owned()).collect(),
    };
    let l = &shared.config.limits;
    let machine = SmtpPreAuth::new(SmtpOptions {
        tls: conn.is_tls(),
        starttls: listener.tls == ListenerTls::Starttls,
        allow_plaintext_auth: listener.allow_plaintext_auth,
        rules: shared.rules.clone(),
        sasl: shared.sasl.clone(),
        max_auth_failures: l.max_auth_failures,
        max_protocol_errors: l.max_protocol_errors,
        hostname: shared.config.server.hostname.clone(),
        keywords: Arc::new(keywords),
    });
    let plug = Plug {
        protocol: Protocol::Submission,
        machine,
        backend: |c: &crate::backend::Connector, account: &str, service| {
            c.smtp_machine(account, service)
        },
        filters: || (Passthrough, Passthrough),
    };
    runner::run(shared, listener, ctx, conn, tls, plug).await;
}
