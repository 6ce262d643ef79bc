//! IMAP: the pre-login state machine ([`PreAuth`]), the backend master login ([`BackendLogin`])
//! and the post-login framers used by the splice ([`framer`]).

mod backend;
pub mod framer;
mod preauth;

pub use crate::proto::prelogin::{Close, Event, Failure, Refusal};
pub use backend::{BackendError, BackendEvent, BackendLogin, Memo as BackendMemo};
pub use preauth::{ImapLimits, PreAuth, PreAuthOptions};

/// Capabilities the proxy removes from what the backend offers after login: UNAUTHENTICATE
/// would hand the client the backend's own login; the rest only the proxy decides.
pub fn keep_post_login_capability(cap: &str) -> bool {
    let is = |name: &str| cap.eq_ignore_ascii_case(name);
    let auth = cap
        .get(..5)
        .is_some_and(|head| head.eq_ignore_ascii_case("AUTH="));
    !(is("UNAUTHENTICATE") || is("STARTTLS") || is("LOGINDISABLED") || is("SASL-IR") || auth)
}
