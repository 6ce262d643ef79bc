//! IMAP: the pre-login machine, the master login and the `UNAUTHENTICATE` filters, plugged
//! into the shared runner.

use super::runner::{self, Plug};
use super::{ConnCtx, ListenerCtx, SharedRef};
use crate::authn::TlsInfo;
use crate::config::ListenerTls;
use crate::proto::imap::framer;
use crate::proto::imap::{ImapLimits, PreAuth, PreAuthOptions};
use crate::stream::Conn;
use crate::Protocol;

/// Runs one IMAP connection to its end (a plain `fn`, for the reason given at [`runner::run`]).
pub fn run(
    shared: SharedRef,
    listener: ListenerCtx,
    ctx: ConnCtx,
    conn: Conn,
    tls: Option<TlsInfo>,
) -> impl std::future::Future<Output = ()> {
    let l = &shared.config.limits;
    let limits = ImapLimits {
        line_max: l.imap_line_max,
        literal_max: l.imap_literal_max,
        literal_total: l.imap_preauth_literal_total,
        max_auth_failures: l.max_auth_failures,
        max_protocol_errors: l.max_protocol_errors,
        ..ImapLimits::default()
    };
    let machine = PreAuth::new(PreAuthOptions {
        limits,
        tls: conn.is_tls(),
        starttls: listener.tls == ListenerTls::Starttls,
        allow_plaintext_auth: listener.allow_plaintext_auth,
        rules: shared.rules.clone(),
        sasl: shared.sasl.clone(),
    });
    let plug = Plug {
        protocol: Protocol::Imap,
        machine,
        backend: |c: &crate::backend::Connector, account: &str, service| {
            c.imap_machine(account, service)
        },
        filters: {
            let command_max = shared.config.limits.imap_command_max;
            move || framer::pair(command_max)
        },
    };
    runner::run(shared, listener, ctx, conn, tls, plug)
}
