//! The backend leg of submission: greeting, `EHLO`, optional `STARTTLS` (and `EHLO` again), then
//! `AUTH PLAIN` as the master user for the canonical account. The same machine, in probe mode,
//! stops after `EHLO` and says `QUIT`: that is how the proxy learns the keywords it mirrors.

use super::reply::{Reply, ReplyReader};
use crate::proto::imap::{BackendError, BackendEvent};
use crate::proto::prelogin::BackendMachine;
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Ehlo { after_tls: bool },
    StartTls,
    AwaitTls,
    Auth,
    Done,
}

/// What the machine does once `EHLO` is answered.
#[derive(Debug)]
enum Goal {
    Login(zeroize::Zeroizing<String>),
    Probe,
}

/// The submission master login (or capability probe), sans-I/O.
#[derive(Debug)]
pub struct SmtpBackendLogin {
    replies: ReplyReader,
    state: State,
    starttls: bool,
    helo_name: String,
    goal: Goal,
    keywords: Vec<String>,
    out: Vec<u8>,
}

impl SmtpBackendLogin {
    /// Logs in as `account` through the master user; `helo_name` is the proxy's own name.
    pub fn login(
        account: &str,
        master: &str,
        separator: &str,
        secret: &Secret,
        helo_name: &str,
        starttls: bool,
    ) -> Self {
        Self::new(
            Goal::Login(crate::sasl::master_plain(
                account, master, separator, secret,
            )),
            helo_name,
            starttls,
        )
    }

    /// Learns the backend's `EHLO` keywords without logging in.
    pub fn probe(helo_name: &str, starttls: bool) -> Self {
        Self::new(Goal::Probe, helo_name, starttls)
    }

    fn new(goal: Goal, helo_name: &str, starttls: bool) -> Self {
        Self {
            replies: ReplyReader::new(),
            state: State::Greeting,
            starttls,
            helo_name: helo_name.to_owned(),
            goal,
            keywords: Vec::new(),
            out: Vec::new(),
        }
    }

    fn ehlo(&mut self, after_tls: bool) {
        self.out.extend_from_slice(b"EHLO ");
        self.out.extend_from_slice(self.helo_name.as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.state = State::Ehlo { after_tls };
    }

    /// Acts on one reply; `Some` when the driver has something to do.
    fn on_reply(&mut self, reply: Reply) -> Option<BackendEvent> {
        let state = self.state;
        self.state = State::Done;
        match state {
            State::Greeting if reply.code == 220 => self.ehlo(false),
            State::Greeting => return Some(BackendEvent::Failed(BackendError::BadGreeting)),
            State::Ehlo { .. } if reply.code != 250 => {
                return Some(BackendEvent::Failed(BackendError::Protocol))
            }
            State::Ehlo { after_tls } => {
                self.keywords = reply.lines.into_iter().skip(1).collect();
                if self.starttls && !after_tls {
                    self.out.extend_from_slice(b"STARTTLS\r\n");
                    self.state = State::StartTls;
                    return None;
                }
                match &self.goal {
                    Goal::Probe => {
                        self.out.extend_from_slice(b"QUIT\r\n");
                        return Some(BackendEvent::LoggedIn(std::mem::take(&mut self.keywords)));
                    }
                    Goal::Login(payload) => {
                        self.out.extend_from_slice(b"AUTH PLAIN ");
                        self.out.extend_from_slice(payload.as_bytes());
                        self.out.extend_from_slice(b"\r\n");
                        self.state = State::Auth;
                    }
                }
            }
            State::StartTls if reply.code != 220 => {
                return Some(BackendEvent::Failed(BackendError::StartTlsRefused))
            }
            State::StartTls if self.replies.has_pending() => {
                return Some(BackendEvent::Failed(BackendError::BytesAfterStartTls))
            }
            State::StartTls => {
                self.state = State::AwaitTls;
                return Some(BackendEvent::StartTls);
            }
            State::Auth if reply.code == 235 => {
                return Some(BackendEvent::LoggedIn(std::mem::take(&mut self.keywords)))
            }
            State::Auth => return Some(BackendEvent::Failed(BackendError::LoginRefused)),
            State::AwaitTls | State::Done => {
                return Some(BackendEvent::Failed(BackendError::Protocol))
            }
        }
        None
    }
}

impl BackendMachine for SmtpBackendLogin {
    fn advance(&mut self) -> BackendEvent {
        loop {
            match self.state {
                State::AwaitTls => return BackendEvent::StartTls,
                State::Done => return BackendEvent::Failed(BackendError::Protocol),
                _ => {}
            }
            let reply = match self.replies.next_reply() {
                None => return BackendEvent::NeedInput,
                Some(Err(_)) => return BackendEvent::Failed(BackendError::Protocol),
                Some(Ok(reply)) => reply,
            };
            if let Some(ev) = self.on_reply(reply) {
                return ev;
            }
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.replies.feed(bytes);
    }

    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn tls_started(&mut self) {
        self.replies = ReplyReader::new();
        self.ehlo(true);
    }

    fn take_leftover(mut self) -> Vec<u8> {
        self.replies.take_rest()
    }
}
