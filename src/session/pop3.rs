//! POP3: the pre-login machine and the master login plugged into the shared runner; bytes
//! pass unchanged after login.

use super::runner::{self, Plug};
use super::{ConnCtx, ListenerCtx, SharedRef};
use crate::authn::TlsInfo;
use crate::config::ListenerTls;
use crate::proto::pop3::{Pop3Options, Pop3PreAuth};
use crate::splice::Passthrough;
use crate::stream::Conn;
use crate::Protocol;

/// Runs one POP3 connection to its end (a plain `fn`, for the reason given at [`runner::run`]).
pub fn run(
    shared: SharedRef,
    listener: ListenerCtx,
    ctx: ConnCtx,
    conn: Conn,
    tls: Option<TlsInfo>,
) -> impl std::future::Future<Output = ()> {
    let l = &shared.config.limits;
    let machine = Pop3PreAuth::new(Pop3Options {
        tls: conn.is_tls(),
        starttls: listener.tls == ListenerTls::Starttls,
        allow_plaintext_auth: listener.allow_plaintext_auth,
        rules: shared.rules.clone(),
        sasl: shared.sasl.clone(),
        max_auth_failures: l.max_auth_failures,
        max_protocol_errors: l.max_protocol_errors,
    });
    let plug = Plug {
        protocol: Protocol::Pop3,
        machine,
        backend: |c: &crate::backend::Connector, account: &str, service| {
            c.pop3_machine(account, service)
        },
        filters: || (Passthrough, Passthrough),
    };
    runner::run(shared, listener, ctx, conn, tls, plug)
}
