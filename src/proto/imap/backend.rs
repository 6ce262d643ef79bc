//! The master login to the backend, sans-I/O: consume the greeting, optionally STARTTLS, then
//! `AUTHENTICATE PLAIN` with `\0<canonical>%<master>\0<secret>` (empty authzid: Stalwart ignores
//! the authzid and would log in as the master itself), and collect the post-login capabilities.
//!
//! A backend that misbehaves (PREAUTH or BYE greeting, unexpected tags, bytes after its STARTTLS
//! OK, a continuation where none is due) aborts the login. Backend text never reaches the client.

use std::sync::{Arc, Mutex};

use imap_codec::fragmentizer::Fragmentizer;
use imap_codec::imap_types::response::{
    Capability, Code, Data, GreetingKind, Response, Status, StatusKind,
};
use imap_codec::{GreetingCodec, ResponseCodec};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// Largest backend response accepted during login.
const MAX_RESPONSE: u32 = 64 * 1024;

/// Why the backend login failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackendError {
    #[error("backend greeting was not OK")]
    BadGreeting,
    #[error("backend sent PREAUTH")]
    PreAuth,
    #[error("backend refused STARTTLS")]
    StartTlsRefused,
    #[error("backend sent bytes after its STARTTLS OK")]
    BytesAfterStartTls,
    #[error("backend refused the master login")]
    LoginRefused,
    #[error("backend sent an unparsable or unexpected response")]
    Protocol,
    #[error("backend closed the connection")]
    Closed,
}

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum BackendEvent {
    /// Write [`BackendLogin::take_output`], then read and [`BackendLogin::feed`].
    NeedInput,
    /// Write output, upgrade the backend connection to TLS, then call
    /// [`BackendLogin::tls_started`].
    StartTls,
    /// Logged in; the backend's post-login capabilities (unfiltered).
    LoggedIn(Vec<String>),
    Failed(BackendError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    StartTls,
    AwaitTls,
    Auth { sent_payload: bool },
    Capability,
    Done,
}

/// The last greeting and login reply a backend sent, with what was read from them.
///
/// A backend sends the same greeting and the same tagged `OK [CAPABILITY …]` on every
/// connection, and decoding their capability lists was the largest part of the proxy's own work
/// per login. A message is decoded only when its bytes differ from the remembered ones; equal
/// bytes give the same result, so nothing is taken on trust.
#[derive(Debug, Default)]
pub struct Memo {
    /// Greeting bytes, and whether it announced SASL-IR.
    greeting: Mutex<Option<(Vec<u8>, bool)>>,
    /// The tagged OK to our login, and the capabilities it carried.
    reply: Mutex<Option<(Vec<u8>, Vec<String>)>>,
}

impl Memo {
    fn greeting(&self, bytes: &[u8]) -> Option<bool> {
        let memo = self.greeting.lock().unwrap_or_else(|p| p.into_inner());
        memo.as_ref()
            .filter(|(seen, _)| seen.as_slice() == bytes)
            .map(|(_, sasl_ir)| *sasl_ir)
    }

    fn reply(&self, bytes: &[u8]) -> Option<Vec<String>> {
        let memo = self.reply.lock().unwrap_or_else(|p| p.into_inner());
        memo.as_ref()
            .filter(|(seen, _)| seen.as_slice() == bytes)
            .map(|(_, caps)| caps.clone())
    }
}

/// One master login.
#[derive(Debug)]
pub struct BackendLogin {
    memo: Option<Arc<Memo>>,
    frag: Fragmentizer,
    state: State,
    starttls: bool,
    sasl_ir: bool,
    payload: Zeroizing<String>,
    caps: Vec<String>,
    out: Vec<u8>,
}

impl BackendLogin {
    /// Prepares the login of `account` through `master`. `starttls`: upgrade the backend
    /// connection first.
    pub fn new(
        account: &str,
        master: &str,
        separator: &str,
        secret: &Secret,
        starttls: bool,
    ) -> Self {
        Self {
            memo: None,
            frag: Fragmentizer::new(MAX_RESPONSE),
            state: State::Greeting,
            starttls,
            sasl_ir: false,
            payload: crate::sasl::master_plain(account, master, separator, secret),
            caps: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Shares `memo` with the other logins to the same backend.
    #[must_use]
    pub fn with_memo(mut self, memo: Arc<Memo>) -> Self {
        self.memo = Some(memo);
        self
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.frag.enqueue_bytes(bytes);
    }

    /// The backend connection is TLS now: capabilities learnt before are forgotten.
    pub fn tls_started(&mut self) {
        self.sasl_ir = false;
        self.caps.clear();
        self.frag = Fragmentizer::new(MAX_RESPONSE);
        self.send_auth();
    }

    fn send_auth(&mut self) {
        self.out.extend_from_slice(b"P1 AUTHENTICATE PLAIN");
        if self.sasl_ir {
            self.out.push(b' ');
            self.out.extend_from_slice(self.payload.as_bytes());
            self.state = State::Auth { sent_payload: true };
        } else {
            self.state = State::Auth {
                sent_payload: false,
            };
        }
        self.out.extend_from_slice(b"\r\n");
    }

    /// Runs until the driver has something to do.
    pub fn advance(&mut self) -> BackendEvent {
        loop {
            if self.state == State::AwaitTls {
                return BackendEvent::StartTls;
            }
            if self.state == State::Done {
                return BackendEvent::Failed(BackendError::Protocol);
            }
            match self.frag.progress() {
                None => return BackendEvent::NeedInput,
                Some(_) if !self.frag.is_message_complete() => continue,
                Some(_) => {}
            }
            if let Some(ev) = self.message() {
                if !matches!(ev, BackendEvent::StartTls) {
                    self.state = State::Done;
                }
                return ev;
            }
        }
    }

    fn message(&mut self) -> Option<BackendEvent> {
        let fail = |e| Some(BackendEvent::Failed(e));
        if self.state == State::Greeting {
            let remembered = self
                .memo
                .as_ref()
                .and_then(|m| m.greeting(self.frag.message_bytes()));
            let sasl_ir = match remembered {
                Some(sasl_ir) => sasl_ir,
                None => {
                    let Ok(greeting) = self.frag.decode_message(&GreetingCodec::default()) else {
                        return fail(BackendError::BadGreeting);
                    };
                    match greeting.kind {
                        GreetingKind::Ok => {}
                        GreetingKind::PreAuth => return fail(BackendError::PreAuth),
                        GreetingKind::Bye => return fail(BackendError::BadGreeting),
                    }
                    let sasl_ir = matches!(&greeting.code, Some(Code::Capability(caps))
                        if caps.as_ref().iter().any(|c| matches!(c, Capability::SaslIr)));
                    if let Some(memo) = &self.memo {
                        *memo.greeting.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((self.frag.message_bytes().to_vec(), sasl_ir));
                    }
                    sasl_ir
                }
            };
            self.sasl_ir = sasl_ir;
            if self.starttls {
                self.out.extend_from_slice(b"P0 STARTTLS\r\n");
                self.state = State::StartTls;
            } else {
                self.send_auth();
            }
            return None;
        }
        if self.state == (State::Auth { sent_payload: true }) {
            if let Some(caps) = self
                .memo
                .as_ref()
                .and_then(|m| m.reply(self.frag.message_bytes()))
            {
                return Some(BackendEvent::LoggedIn(caps));
            }
        }
        let Ok(response) = self.frag.decode_message(&ResponseCodec::default()) else {
            return fail(BackendError::Protocol);
        };
        match (self.state, response) {
            (_, Response::Status(Status::Bye(_))) => fail(BackendError::Closed),
            (State::StartTls, Response::Status(Status::Tagged(t))) => {
                if t.tag.as_ref() != "P0" || t.body.kind != StatusKind::Ok {
                    return fail(BackendError::StartTlsRefused);
                }
                if self.frag.progress().is_some() || !self.frag.message_bytes().is_empty() {
                    return fail(BackendError::BytesAfterStartTls);
                }
                self.state = State::AwaitTls;
                Some(BackendEvent::StartTls)
            }
            (
                State::Auth {
                    sent_payload: false,
                },
                Response::CommandContinuationRequest(_),
            ) => {
                self.out.extend_from_slice(self.payload.as_bytes());
                self.out.extend_from_slice(b"\r\n");
                self.state = State::Auth { sent_payload: true };
                None
            }
            (State::Auth { .. } | State::Capability, Response::Data(Data::Capability(caps))) => {
                self.caps = names(caps.as_ref());
                None
            }
            (State::Auth { sent_payload: true }, Response::Status(Status::Tagged(t))) => {
                if t.tag.as_ref() != "P1" {
                    return fail(BackendError::Protocol);
                }
                if t.body.kind != StatusKind::Ok {
                    return fail(BackendError::LoginRefused);
                }
                if let Some(Code::Capability(caps)) = &t.body.code {
                    self.caps = names(caps.as_ref());
                    if let Some(memo) = &self.memo {
                        *memo.reply.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((self.frag.message_bytes().to_vec(), self.caps.clone()));
                    }
                }
                if self.caps.is_empty() {
                    self.out.extend_from_slice(b"P2 CAPABILITY\r\n");
                    self.state = State::Capability;
                    return None;
                }
                Some(BackendEvent::LoggedIn(std::mem::take(&mut self.caps)))
            }
            (State::Capability, Response::Status(Status::Tagged(t))) => {
                if t.tag.as_ref() != "P2" || t.body.kind != StatusKind::Ok {
                    return fail(BackendError::Protocol);
                }
                Some(BackendEvent::LoggedIn(std::mem::take(&mut self.caps)))
            }
            (_, Response::Status(Status::Untagged(_)) | Response::Data(_)) => None,
            _ => fail(BackendError::Protocol),
        }
    }

    /// Bytes the backend sent after the login completed (to forward to the client first).
    pub fn take_leftover(mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        loop {
            match self.frag.progress() {
                Some(_) => {
                    if self.frag.is_message_complete() {
                        rest.extend_from_slice(self.frag.message_bytes());
                    }
                }
                None => {
                    if !self.frag.is_message_complete() {
                        rest.extend_from_slice(self.frag.message_bytes());
                    }
                    return rest;
                }
            }
        }
    }
}

impl crate::proto::prelogin::BackendMachine for BackendLogin {
    fn advance(&mut self) -> BackendEvent {
        BackendLogin::advance(self)
    }
    fn feed(&mut self, bytes: &[u8]) {
        BackendLogin::feed(self, bytes);
    }
    fn take_output(&mut self) -> Vec<u8> {
        BackendLogin::take_output(self)
    }
    fn tls_started(&mut self) {
        BackendLogin::tls_started(self);
    }
    fn take_leftover(self) -> Vec<u8> {
        BackendLogin::take_leftover(self)
    }
}

fn names(caps: &[impl std::fmt::Display]) -> Vec<String> {
    caps.iter().map(|c| c.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(starttls: bool) -> BackendLogin {
        BackendLogin::new(
            "alice@example.org",
            "proxy",
            "%",
            &Secret::from("s3cret"),
            starttls,
        )
    }

    fn b64(raw: &[u8]) -> String {
        crate::sasl::encode_challenge(raw)
    }

    /// Runs one login through `memo` against `greeting` and `reply`; returns what was sent
    /// after the greeting and how it ended.
    fn memo_login(memo: &Arc<Memo>, greeting: &[u8], reply: &[u8]) -> (String, BackendEvent) {
        let mut l = login(false).with_memo(memo.clone());
        assert_eq!(l.advance(), BackendEvent::NeedInput);
        l.feed(greeting);
        let mut ev = l.advance();
        let mut sent = String::from_utf8(l.take_output()).unwrap();
        if ev == BackendEvent::NeedInput && !sent.contains(' ') {
            unreachable!("no AUTHENTICATE sent");
        }
        if sent == "P1 AUTHENTICATE PLAIN\r\n" {
            l.feed(b"+ \r\n");
            assert_eq!(l.advance(), BackendEvent::NeedInput);
            sent.push_str(&String::from_utf8(l.take_output()).unwrap());
        }
        if ev == BackendEvent::NeedInput {
            l.feed(reply);
            ev = l.advance();
        }
        (sent, ev)
    }

    #[test]
    fn memo_gives_the_same_results_and_never_confuses_other_bytes() {
        let memo = Arc::new(Memo::default());
        let greeting: &[u8] = b"* OK [CAPABILITY IMAP4rev1 SASL-IR] ready\r\n";
        let ok: &[u8] = b"P1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n";
        let first = memo_login(&memo, greeting, ok);
        let second = memo_login(&memo, greeting, ok);
        assert_eq!(first, second);
        assert_eq!(
            first.1,
            BackendEvent::LoggedIn(vec!["IMAP4REV1".into(), "IDLE".into()])
        );
        // A refusal after a remembered OK is still a refusal.
        let (_, refused) = memo_login(&memo, greeting, b"P1 NO [AUTHENTICATIONFAILED] no\r\n");
        assert_eq!(refused, BackendEvent::Failed(BackendError::LoginRefused));
        // A greeting without SASL-IR is decoded on its own: no initial response is sent.
        let (sent, ev) = memo_login(&memo, b"* OK [CAPABILITY IMAP4rev1] ready\r\n", ok);
        assert!(sent.starts_with("P1 AUTHENTICATE PLAIN\r\n"), "{sent}");
        assert_eq!(
            ev,
            BackendEvent::LoggedIn(vec!["IMAP4REV1".into(), "IDLE".into()])
        );
        // Other capabilities in the reply are read, not remembered ones.
        let (_, ev) = memo_login(
            &memo,
            greeting,
            b"P1 OK [CAPABILITY IMAP4rev2] Logged in\r\n",
        );
        assert_eq!(ev, BackendEvent::LoggedIn(vec!["IMAP4rev2".into()]));
        // A PREAUTH greeting still fails after an OK one was remembered.
        let mut l = login(false).with_memo(memo);
        l.advance();
        l.feed(b"* PREAUTH [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n");
        assert_eq!(l.advance(), BackendEvent::Failed(BackendError::PreAuth));
    }

    #[test]
    fn sasl_ir_login_with_capabilities_in_ok() {
        let mut l = login(false);
        assert_eq!(l.advance(), BackendEvent::NeedInput);
        l.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n");
        assert_eq!(l.advance(), BackendEvent::NeedInput);
        let sent = String::from_utf8(l.take_output()).unwrap();
        assert_eq!(
            sent,
            format!(
                "P1 AUTHENTICATE PLAIN {}\r\n",
                b64(b"\0alice@example.org%proxy\0s3cret")
            )
        );
        l.feed(b"P1 OK [CAPABILITY IMAP4rev1 IDLE UNAUTHENTICATE] Logged in\r\n* 1 EXISTS\r\n");
        match l.advance() {
            BackendEvent::LoggedIn(caps) => {
                assert!(caps.iter().any(|c| c == "IDLE"));
                assert!(caps
                    .iter()
                    .any(|c| c.eq_ignore_ascii_case("UNAUTHENTICATE")));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.take_leftover(), b"* 1 EXISTS\r\n");
    }

    #[test]
    fn continuation_login_and_capability_command() {
        let mut l = login(false);
        l.feed(b"* OK ready\r\n");
        assert_eq!(l.advance(), BackendEvent::NeedInput);
        assert_eq!(l.take_output(), b"P1 AUTHENTICATE PLAIN\r\n");
        l.feed(b"+ \r\n");
        assert_eq!(l.advance(), BackendEvent::NeedInput);
        assert!(l.take_output().starts_with(b"AGFsaWNl"));
        l.feed(b"P1 OK done\r\n");
        assert_eq!(l.advance(), BackendEvent::NeedInput);
        assert_eq!(l.take_output(), b"P2 CAPABILITY\r\n");
        l.feed(b"* CAPABILITY IMAP4rev1 IDLE\r\nP2 OK done\r\n");
        assert_eq!(
            l.advance(),
            BackendEvent::LoggedIn(vec!["IMAP4REV1".into(), "IDLE".into()])
        );
    }

    #[test]
    fn misbehaving_backends_abort() {
        for (greeting, err) in [
            (&b"* PREAUTH hi\r\n"[..], BackendError::PreAuth),
            (b"* BYE go away\r\n", BackendError::BadGreeting),
            (b"garbage\r\n", BackendError::BadGreeting),
        ] {
            let mut l = login(false);
            l.feed(greeting);
            assert_eq!(l.advance(), BackendEvent::Failed(err));
        }
        let mut l = login(false);
        l.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\nP1 NO [AUTHENTICATIONFAILED] no\r\n");
        assert_eq!(
            l.advance(),
            BackendEvent::Failed(BackendError::LoginRefused)
        );
        let mut l = login(false);
        l.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\nX9 OK what\r\n");
        assert_eq!(l.advance(), BackendEvent::Failed(BackendError::Protocol));
        let mut l = login(false);
        l.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n+ \r\n");
        assert_eq!(l.advance(), BackendEvent::Failed(BackendError::Protocol));
    }

    #[test]
    fn starttls_then_login_without_sasl_ir() {
        let mut l = login(true);
        l.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR STARTTLS] hi\r\n");
        assert_eq!(l.advance(), BackendEvent::NeedInput);
        assert_eq!(l.take_output(), b"P0 STARTTLS\r\n");
        l.feed(b"P0 OK go\r\n");
        assert_eq!(l.advance(), BackendEvent::StartTls);
        l.tls_started();
        assert_eq!(l.take_output(), b"P1 AUTHENTICATE PLAIN\r\n");
        let mut l = login(true);
        l.feed(b"* OK hi\r\nP0 OK go\r\n* injected\r\n");
        assert_eq!(
            l.advance(),
            BackendEvent::Failed(BackendError::BytesAfterStartTls)
        );
    }

    #[test]
    fn every_split_gives_the_same_result() {
        let transcript: &[u8] =
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n* 2 EXISTS\r\nP1 OK [CAPABILITY IMAP4rev1 IDLE] ok\r\n";
        for cut in 0..transcript.len() {
            let mut l = login(false);
            let mut result = None;
            for part in [&transcript[..cut], &transcript[cut..]] {
                l.feed(part);
                match l.advance() {
                    BackendEvent::NeedInput => {}
                    ev => result = Some(ev),
                }
            }
            assert_eq!(
                result,
                Some(BackendEvent::LoggedIn(vec![
                    "IMAP4REV1".into(),
                    "IDLE".into()
                ])),
                "cut at {cut}"
            );
        }
    }
}
