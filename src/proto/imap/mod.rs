//! IMAP: the pre-login state machine ([`PreAuth`]), the backend master login ([`BackendLogin`])
//! and the post-login framers used by the splice ([`framer`]).

mod backend;
pub mod framer;
mod preauth;

pub use crate::proto::prelogin::{Close, Event, Failure, Refusal};
pub use backend::{BackendError, BackendEvent, BackendLogin};
pub use preauth::{ImapLimits, PreAuth, PreAuthOptions};

/// Capabilities the proxy removes from what the backend offers after login: UNAUTHENTICATE
/// would hand the client the backend's own login; the rest only the proxy decides.
pub fn keep_post_login_capability(cap: &str) -> bool {
    let upper = cap.to_ascii_uppercase();
    !(upper == "UNAUTHENTICATE"
        || upper == "STARTTLS"
        || upper == "LOGINDISABLED"
        || upper == "SASL-IR"
        || upper.starts_with("AUTH="))
}
