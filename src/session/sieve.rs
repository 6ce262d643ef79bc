//! ManageSieve: the pre-login machine (greeting with the backend's capabilities), the master
//! login and the order-preserving `UNAUTHENTICATE` filters, plugged into the shared runner.

use super::runner::{self, Plug};
use super::{ConnCtx, ListenerCtx, SharedRef};
use crate::authn::TlsInfo;
use crate::config::ListenerTls;
use crate::proto::sieve::{
    capability_from_string, default_capabilities, splice_filters, Capability, SieveOptions,
    SievePreAuth, SieveProbe,
};
use crate::stream::Conn;
use crate::Protocol;

/// Runs one ManageSieve connection to its end.
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
        Protocol::ManageSieve,
        |_, _| SieveProbe::new(),
    ))
    .await;
    let capabilities: Vec<Capability> = match learned {
        Some(caps) => caps.iter().map(|c| capability_from_string(c)).collect(),
        None => default_capabilities(),
    };
    let l = &shared.config.limits;
    let machine = SievePreAuth::new(SieveOptions {
        tls: conn.is_tls(),
        starttls: listener.tls == ListenerTls::Starttls,
        allow_plaintext_auth: listener.allow_plaintext_auth,
        rules: shared.rules.clone(),
        sasl: shared.sasl.clone(),
        max_auth_failures: l.max_auth_failures,
        max_protocol_errors: l.max_protocol_errors,
        capabilities,
    });
    let plug = Plug {
        protocol: Protocol::ManageSieve,
        machine,
        backend: |c: &crate::backend::Connector, account: &str, service| {
            c.sieve_machine(account, service)
        },
        filters: splice_filters,
    };
    runner::run(shared, listener, ctx, conn, tls, plug).await;
}
