//! Post-login framers for the splice. They keep the chokepoint closed after login: the backend
//! must never run a command the proxy did not see as one, above all `UNAUTHENTICATE`, which
//! would hand the client the backend's own login.
//!
//! The client side forwards only command lines that are well formed in a strict subset of the
//! syntax the backend (Stalwart) parses without error, naming a command from an allow-list.
//! Anything else is refused locally and never reaches the backend. Strict matters: the backend
//! answers a line it cannot parse with BAD and drops the rest of that read, so what followed a
//! rejected part of a line could be parsed there as a fresh command.
//!
//! A literal is never forwarded until the backend has asked for it. A non-synchronizing literal
//! (`{n+}`, `{n-}`) is forwarded as a synchronizing one, and the backend's `+` for it is kept from
//! the client; if the backend refuses the line instead, the literal is discarded. So both sides
//! always agree on where literals are. `IDLE` waits for its `+` the same way, and only `DONE`
//! may follow it.
//!
//! The backend side checks what comes back: a `+` nobody asked for, or a tagged completion for a
//! tag the proxy never forwarded, means the backend read the stream differently, and the session
//! is closed (see [`ResponseFramer::desync`]). It also strips `UNAUTHENTICATE` from capability
//! lists.
//!
//! Both framers are pure: bytes in, bytes to forward out. They share one small record of which
//! commands are outstanding ([`pair`]). Buffers are bounded: a command line is held up to
//! [`MAX_LINE`], a response line up to [`MAX_HELD_LINE`], and input that arrives while a
//! continuation is awaited up to [`MAX_STASH`] (the splice stops reading the client meanwhile).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use memchr::memchr;

/// Longest command line (one line of a command: up to a literal or the end) forwarded, with its
/// line end. The backend refuses an argument over 8,000 bytes, so no longer line can be one it
/// parses whole.
pub const MAX_LINE: usize = 8000;
/// Longest response line held for capability rewriting; longer lines stream through untouched.
pub const MAX_HELD_LINE: usize = 16 * 1024;
/// Client input held while the backend's answer to a literal or `IDLE` is awaited: the splice
/// reads nothing more meanwhile, so this is at most one read.
pub const MAX_STASH: usize = 128 * 1024;
/// Commands forwarded and not yet completed; at this many the client is not read until one
/// completes.
pub const MAX_OUTSTANDING: usize = 256;
/// Longest tag the backend accepts.
const MAX_TAG: usize = 128;
/// `limits.imap_command_max` by default (Stalwart's default IMAP request limit).
pub const DEFAULT_COMMAND_MAX: u64 = 50 * 1024 * 1024;
/// Local refusals produced by one `push`; the rest of the input waits, so a flood of bad lines
/// from a client that does not read its answers holds no more than a few.
const REFUSALS_PER_PUSH: usize = 8;

/// Commands forwarded after login: those of RFC 9051 and the extensions the backend implements,
/// except the ones that only belong before login. `UNAUTHENTICATE`, `LOGIN`, `AUTHENTICATE` and
/// `STARTTLS` are refused, and so is any command some backend version might not know (it would
/// answer the line with BAD in the middle, see the module doc).
const ALLOWED: &[&[u8]] = &[
    b"CAPABILITY",
    b"NOOP",
    b"LOGOUT",
    b"ENABLE",
    b"SELECT",
    b"EXAMINE",
    b"CREATE",
    b"DELETE",
    b"RENAME",
    b"SUBSCRIBE",
    b"UNSUBSCRIBE",
    b"LIST",
    b"LSUB",
    b"NAMESPACE",
    b"STATUS",
    b"APPEND",
    b"IDLE",
    b"CHECK",
    b"CLOSE",
    b"UNSELECT",
    b"EXPUNGE",
    b"SEARCH",
    b"FETCH",
    b"STORE",
    b"COPY",
    b"MOVE",
    b"SORT",
    b"THREAD",
    b"SETACL",
    b"DELETEACL",
    b"GETACL",
    b"LISTRIGHTS",
    b"MYRIGHTS",
    b"ID",
    b"GETQUOTA",
    b"GETQUOTAROOT",
];
/// Commands that may follow `UID`.
const UID_ALLOWED: &[&[u8]] = &[
    b"FETCH", b"STORE", b"COPY", b"MOVE", b"SEARCH", b"EXPUNGE", b"SORT", b"THREAD",
];

/// Literal announcement at the end of a line (`{N}` or `{N+}` / `{N-}` before CRLF): its
/// length and whether it is synchronizing (the sender waits for `+` before sending it). Loose
/// on purpose (whitespace may follow it, as the backend allows): it finds the literal of a
/// refused line, whose body must be skipped, and of a response.
fn literal_at_end(line: &[u8]) -> Option<(u64, bool)> {
    let line = line.strip_suffix(b"\n")?;
    let keep = line
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    let inner = line[..keep].strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let mut digits = &inner[open + 1..];
    let mut sync = true;
    if let Some(d) = digits
        .strip_suffix(b"+")
        .or_else(|| digits.strip_suffix(b"-"))
    {
        digits = d;
        sync = false;
    }
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, sync))
}

/// A tag character: RFC 9051's `tag` (ASTRING-CHAR except `+`), which excludes every byte the
/// backend treats specially in a tag.
fn is_tag_char(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && !b"(){%*\"\\+".contains(&b)
}

/// The line without its line end (CRLF or a bare LF).
fn body_of(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A literal that ends a forwarded line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Literal {
    len: u64,
    /// The client waits for `+` before sending it.
    sync: bool,
    /// Where its `{` is in the line.
    at: usize,
}

/// Checks the arguments of a command line (or the rest of one after a literal) against the
/// strict subset of the backend's tokenizer: arguments separated by spaces, quoted strings
/// closed on the same line, no control characters, and a `{` only as the literal that ends the
/// line. `ws` says whether the backend's last character counts as whitespace at the start
/// (after the command name, or after a literal), and `fetch` whether the backend tokenizes
/// `[]<>.` (only for `FETCH`, which keeps its last character there). Mirroring when a quoted
/// string starts keeps both sides in agreement on what is quoted. `offset` is where `args`
/// starts in the line. `Err` for anything outside the subset.
fn scan_args(args: &[u8], mut ws: bool, fetch: bool, offset: usize) -> Result<Option<Literal>, ()> {
    let mut quoted: Option<bool> = None; // Some(escaped) inside a quoted string
                                         // Whether the character before a `~` counted as whitespace (a `~{n}` literal8).
    let mut ws_before_tilde = false;
    for (i, &b) in args.iter().enumerate() {
        if let Some(escaped) = quoted {
            quoted = match b {
                b'"' if !escaped => {
                    ws = true;
                    None
                }
                b'\\' => Some(!escaped),
                0..=0x1f | 0x7f => return Err(()),
                _ => Some(false),
            };
            continue;
        }
        match b {
            b' ' => ws = true,
            b'"' if ws => quoted = Some(false),
            b'{' => {
                let after_tilde = i > 0 && args[i - 1] == b'~' && ws_before_tilde;
                if !(ws || after_tilde) {
                    return Err(());
                }
                return literal_here(&args[i..], offset + i).map(Some);
            }
            0..=0x1f | 0x7f => return Err(()),
            b'(' | b')' => {}
            b'[' | b']' | b'<' | b'>' | b'.' if fetch => {}
            b'~' => {
                ws_before_tilde = ws;
                ws = false;
            }
            _ => ws = false,
        }
        if b != b'~' {
            ws_before_tilde = false;
        }
    }
    if quoted.is_some() {
        return Err(());
    }
    Ok(None)
}

/// `rest` starts with `{`: it must be exactly `{digits}`, `{digits+}` or `{digits-}`, the
/// end of the line, with a length the backend can parse (`u32`).
fn literal_here(rest: &[u8], at: usize) -> Result<Literal, ()> {
    let inner = rest
        .strip_prefix(b"{")
        .and_then(|r| r.strip_suffix(b"}"))
        .ok_or(())?;
    let (digits, sync) = match inner.last() {
        Some(b'+' | b'-') => (&inner[..inner.len() - 1], false),
        _ => (inner, true),
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    let len: u32 = std::str::from_utf8(digits)
        .map_err(|_| ())?
        .parse()
        .map_err(|_| ())?;
    Ok(Literal {
        len: u64::from(len),
        sync,
        at,
    })
}

/// What a command's first line is.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// An empty line: the backend skips it; so does the proxy.
    Empty,
    /// Forward it.
    Command {
        tag_len: usize,
        idle: bool,
        /// `FETCH` or `UID FETCH` (the backend tokenizes brackets in it).
        fetch: bool,
        literal: Option<Literal>,
    },
    /// Answer it locally and forward nothing of it.
    Refuse {
        /// The reply, with its line end.
        reply: Vec<u8>,
    },
}

fn classify(line: &[u8]) -> Head {
    let body = body_of(line);
    if body.is_empty() {
        return Head::Empty;
    }
    let bad = |tag: &[u8], text: &str| {
        let mut reply = if tag.is_empty() {
            b"*".to_vec()
        } else {
            tag.to_vec()
        };
        reply.extend_from_slice(text.as_bytes());
        Head::Refuse { reply }
    };
    let tag_len = body.iter().take_while(|&&b| is_tag_char(b)).count();
    if tag_len == 0 || tag_len > MAX_TAG || body.get(tag_len) != Some(&b' ') {
        return bad(b"", " BAD Malformed command\r\n");
    }
    let tag = &body[..tag_len];
    let name_at = tag_len + 1;
    let word = |from: usize| {
        let len = body[from..]
            .iter()
            .take_while(|b| b.is_ascii_alphabetic())
            .count();
        (&body[from..from + len], from + len)
    };
    let (mut name, mut end) = word(name_at);
    let mut uid = false;
    if name.eq_ignore_ascii_case(b"UID") && body.get(end) == Some(&b' ') {
        uid = true;
        (name, end) = word(end + 1);
    }
    if name.is_empty() || !matches!(body.get(end), None | Some(b' ')) {
        return bad(tag, " BAD Malformed command\r\n");
    }
    if name.eq_ignore_ascii_case(b"UNAUTHENTICATE") {
        return bad(tag, " NO [CANNOT] UNAUTHENTICATE is not available\r\n");
    }
    let list = if uid { UID_ALLOWED } else { ALLOWED };
    if !list.iter().any(|n| name.eq_ignore_ascii_case(n)) {
        return bad(tag, " BAD Command unknown or not available after login\r\n");
    }
    let fetch = name.eq_ignore_ascii_case(b"FETCH");
    let idle = name.eq_ignore_ascii_case(b"IDLE");
    match scan_args(&body[end..], true, fetch, end) {
        Ok(literal) if !(idle && literal.is_some()) => Head::Command {
            tag_len,
            idle,
            fetch,
            literal,
        },
        _ => bad(tag, " BAD Command syntax not accepted here\r\n"),
    }
}

/// What both directions of one session know about the client's commands.
#[derive(Debug, Default)]
struct Exchange {
    /// Tags of forwarded commands not yet completed, oldest first.
    outstanding: VecDeque<Vec<u8>>,
    /// The forwarded command whose continuation request (`+`) is awaited.
    awaiting: Option<Awaiting>,
    /// The backend's answer to it: `true` for `+`, `false` for its tagged completion.
    answer: Option<bool>,
    /// The backend answered something the proxy never asked: the session must end.
    desync: bool,
}

#[derive(Debug)]
struct Awaiting {
    tag: Vec<u8>,
    /// Whether the client sees the `+` (it asked for it: a synchronizing literal, `IDLE`).
    relay: bool,
}

type Shared = Arc<Mutex<Exchange>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Exchange> {
    // Never held across an await or a panic-prone call; a poisoned lock's data is intact.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The two framers of one session, sharing what is outstanding. `command_max` is
/// `limits.imap_command_max`: no command larger than it (lines and literals) is forwarded.
pub fn pair(command_max: u64) -> (CommandFramer, ResponseFramer) {
    let shared = Shared::default();
    (
        CommandFramer::with(shared.clone(), command_max),
        ResponseFramer::with(shared),
    )
}

/// What is awaited from the backend before the client is read on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaited {
    Literal {
        len: u64,
        sync: bool,
    },
    Idle,
    /// `DONE` was forwarded: nothing more until `IDLE` has completed (should the backend
    /// have ended it on its own, `DONE` is a bad line to it, and nothing may follow it in
    /// the same read).
    IdleEnd,
}

/// Where the client→backend stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    /// Collecting a command's first line.
    Head,
    /// Collecting the rest of a command line after a literal.
    Rest,
    /// A line announcing a literal (or `IDLE`) was forwarded; the backend's answer decides
    /// what the next client bytes are.
    Await(Awaited),
    /// Inside a literal the backend asked for.
    Literal(u64),
    /// In `IDLE`: only `DONE` may come.
    Idling,
    /// Inside a refused command: discard to its end.
    DiscardLine,
    DiscardLiteral(u64),
}

/// What the client→backend framer decided about a chunk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientOutput {
    /// Bytes for the backend.
    pub forward: Vec<u8>,
    /// Complete replies to send to the client (at a response boundary).
    pub replies: Vec<Vec<u8>>,
    /// The client broke framing badly enough to close the session.
    pub abort: bool,
}

/// Client→backend framer.
#[derive(Debug)]
pub struct CommandFramer {
    state: ClientState,
    /// The line being collected.
    line: Vec<u8>,
    /// Tail of a refused line, to spot a literal announcement at its end.
    tail: Vec<u8>,
    /// The reply to a refused command, sent once the command has ended.
    refusal: Vec<u8>,
    /// Tag of the command being forwarded.
    tag: Vec<u8>,
    /// Whether that command is a `FETCH` (the backend tokenizes brackets in it).
    fetch: bool,
    /// Input received while the backend's answer was awaited.
    stash: Vec<u8>,
    /// Bytes of the command being forwarded so far, lines and literals.
    command_bytes: u64,
    /// `limits.imap_command_max`.
    command_max: u64,
    aborted: bool,
    shared: Shared,
}

impl Default for CommandFramer {
    fn default() -> Self {
        Self::new()
    }
}

const TAIL: usize = 32;

impl CommandFramer {
    /// A framer on its own (tests, fuzzing): nothing answers its continuations but
    /// [`CommandFramer::backend_answered`].
    pub fn new() -> Self {
        Self::with(Shared::default(), DEFAULT_COMMAND_MAX)
    }

    fn with(shared: Shared, command_max: u64) -> Self {
        Self {
            state: ClientState::Head,
            line: Vec::new(),
            tail: Vec::new(),
            refusal: Vec::new(),
            tag: Vec::new(),
            fetch: false,
            stash: Vec::new(),
            command_bytes: 0,
            command_max,
            aborted: false,
            shared,
        }
    }

    /// The tag whose continuation request is awaited, if any (tests, fuzzing).
    pub fn awaited_tag(&self) -> Option<Vec<u8>> {
        lock(&self.shared).awaiting.as_ref().map(|a| a.tag.clone())
    }

    /// Whether the awaited answer may be a `+` (not after `DONE`, which only the tagged
    /// completion of `IDLE` answers) (tests, fuzzing).
    pub fn expects_continuation(&self) -> bool {
        self.state != ClientState::Await(Awaited::IdleEnd)
    }

    /// Records the backend's answer to the awaited command, as the response framer of a
    /// [`pair`] does: `true` for its `+`, `false` for its tagged completion (tests, fuzzing).
    pub fn backend_answered(&mut self, continued: bool) {
        let mut ex = lock(&self.shared);
        if ex.awaiting.is_some() {
            ex.answer = Some(continued);
        }
    }

    /// Whether the client must not be read now: the backend's answer to a literal or `IDLE` is
    /// awaited, or too many commands are outstanding. Applies an answer that has come; then
    /// [`CommandFramer::push`] (with no new input) forwards what was held.
    pub fn waiting(&mut self) -> bool {
        let mut ex = lock(&self.shared);
        if ex.desync || self.aborted {
            return false;
        }
        if let ClientState::Await(awaited) = self.state {
            let Some(continued) = ex.answer.take() else {
                return true;
            };
            ex.awaiting = None;
            self.state = match (awaited, continued) {
                (Awaited::Literal { len: 0, .. }, true) => ClientState::Rest,
                (Awaited::Literal { len, .. }, true) => ClientState::Literal(len),
                // The client waited for a `+` that did not come: it sends no literal.
                (Awaited::Literal { sync: true, .. }, false) => ClientState::Head,
                // It did not wait: its literal and the rest of its command go nowhere.
                (Awaited::Literal { len, sync: false }, false) => ClientState::DiscardLiteral(len),
                (Awaited::Idle, true) => ClientState::Idling,
                (Awaited::Idle | Awaited::IdleEnd, false) => ClientState::Head,
                (Awaited::IdleEnd, true) => {
                    // A second `+` for one IDLE: the backend is not where the proxy is.
                    ex.desync = true;
                    self.aborted = true;
                    return false;
                }
            };
            return false;
        }
        self.state == ClientState::Head
            && self.line.is_empty()
            && ex.outstanding.len() >= MAX_OUTSTANDING
    }

    /// Processes a chunk from the client (or, with `&[]`, what was held while waiting).
    pub fn push(&mut self, input: &[u8]) -> ClientOutput {
        let mut out = ClientOutput::default();
        if self.aborted || lock(&self.shared).desync {
            self.aborted = true;
            out.abort = true;
            return out;
        }
        if self.stash.is_empty() {
            let used = self.feed(input, &mut out);
            self.stash.extend_from_slice(&input[used..]);
        } else {
            let mut held = std::mem::take(&mut self.stash);
            held.extend_from_slice(input);
            let used = self.feed(&held, &mut out);
            held.drain(..used);
            self.stash = held;
        }
        if self.stash.len() > MAX_STASH {
            self.aborted = true;
        }
        if self.stash.is_empty() && self.stash.capacity() > 0 {
            self.stash = Vec::new();
        }
        out.abort |= self.aborted;
        out
    }

    /// Runs the state machine over `input` until it is used up or an answer from the backend
    /// is needed; returns how much was used.
    fn feed(&mut self, input: &[u8], out: &mut ClientOutput) -> usize {
        let mut used = 0;
        while used < input.len() && !self.aborted && out.replies.len() < REFUSALS_PER_PUSH {
            let rest = &input[used..];
            match self.state {
                ClientState::Head | ClientState::Rest | ClientState::Idling => {
                    if self.state == ClientState::Head
                        && self.line.is_empty()
                        && lock(&self.shared).outstanding.len() >= MAX_OUTSTANDING
                    {
                        return used;
                    }
                    let room = MAX_LINE - self.line.len();
                    let nl = memchr(b'\n', &rest[..rest.len().min(room)]);
                    let take = nl.map_or(rest.len().min(room), |i| i + 1);
                    self.line.extend_from_slice(&rest[..take]);
                    used += take;
                    if nl.is_some() {
                        let line = std::mem::take(&mut self.line);
                        self.line_done(&line, out);
                        self.line = line;
                        self.line.clear();
                    } else if self.line.len() >= MAX_LINE {
                        self.overlong();
                    }
                    if matches!(self.state, ClientState::Await(_)) {
                        return used;
                    }
                }
                ClientState::Await(_) => return used,
                ClientState::Literal(n) => {
                    let take = (rest.len() as u64).min(n) as usize;
                    out.forward.extend_from_slice(&rest[..take]);
                    used += take;
                    self.state = match n - take as u64 {
                        0 => ClientState::Rest,
                        left => ClientState::Literal(left),
                    };
                }
                ClientState::DiscardLine => {
                    let (take, ended) = match memchr(b'\n', rest) {
                        Some(i) => (i + 1, true),
                        None => (rest.len(), false),
                    };
                    self.remember_tail(&rest[..take]);
                    used += take;
                    if ended {
                        self.refused_line_ended(out);
                    }
                }
                ClientState::DiscardLiteral(n) => {
                    let take = (rest.len() as u64).min(n) as usize;
                    used += take;
                    self.state = match n - take as u64 {
                        0 => ClientState::DiscardLine,
                        left => ClientState::DiscardLiteral(left),
                    };
                }
            }
        }
        used
    }

    /// A whole line was collected in state `Head`, `Rest` or `Idling`.
    fn line_done(&mut self, line: &[u8], out: &mut ClientOutput) {
        match self.state {
            ClientState::Idling => {
                if body_of(line).eq_ignore_ascii_case(b"DONE") {
                    // Stalwart ends IDLE on the next four bytes being exactly `DONE` (it reads
                    // four at a time): the word goes first and in capitals, whatever the case
                    // the client wrote it in, so both sides leave IDLE at the same byte.
                    out.forward.extend_from_slice(b"DONE");
                    out.forward.extend_from_slice(&line[4..]);
                    let mut ex = lock(&self.shared);
                    ex.awaiting = Some(Awaiting {
                        tag: self.tag.clone(),
                        relay: true,
                    });
                    ex.answer = None;
                    self.state = ClientState::Await(Awaited::IdleEnd);
                } else {
                    self.aborted = true;
                }
            }
            ClientState::Rest => {
                // Part of this command is already with the backend: a bad rest cannot be
                // refused on its own, so the session ends.
                match scan_args(body_of(line), true, self.fetch, 0) {
                    Ok(literal) => {
                        self.command_bytes += line.len() as u64 + literal.map_or(0, |l| l.len);
                        if self.command_bytes + MAX_LINE as u64 > self.command_max {
                            self.aborted = true;
                        } else {
                            self.forward(line, literal, false, out);
                        }
                    }
                    Err(()) => self.aborted = true,
                }
            }
            _ => match classify(line) {
                Head::Empty => {}
                Head::Command {
                    tag_len,
                    idle,
                    fetch,
                    literal,
                } => {
                    let tag = &line[..tag_len];
                    let total = line.len() as u64 + literal.map_or(0, |l| l.len);
                    let refusal = if lock(&self.shared).outstanding.iter().any(|t| t == tag) {
                        // Answers are matched to commands by tag: a second command with the tag
                        // of one still running could be taken for it.
                        Some(" BAD Tag already in use by a command in progress\r\n")
                    } else if total + MAX_LINE as u64 > self.command_max {
                        Some(" BAD Command too large\r\n")
                    } else {
                        None
                    };
                    if let Some(text) = refusal {
                        self.refusal = [tag, text.as_bytes()].concat();
                        self.tail.clear();
                        self.remember_tail(line);
                        self.refused_line_ended(out);
                        return;
                    }
                    self.tag.clear();
                    self.tag.extend_from_slice(tag);
                    self.fetch = fetch;
                    self.command_bytes = total;
                    lock(&self.shared).outstanding.push_back(self.tag.clone());
                    self.forward(line, literal, idle, out);
                }
                Head::Refuse { reply } => {
                    self.refusal = reply;
                    self.tail.clear();
                    self.remember_tail(line);
                    self.refused_line_ended(out);
                }
            },
        }
    }

    /// The end of a refused line was seen (in `tail`): a non-synchronizing literal announced
    /// there is discarded too. Nobody answers "+" to a refused command, so the client never
    /// sends a synchronizing one: what follows it is its next command.
    fn refused_line_ended(&mut self, out: &mut ClientOutput) {
        self.state = match literal_at_end(&self.tail) {
            Some((n, false)) => ClientState::DiscardLiteral(n),
            _ => ClientState::Head,
        };
        self.tail.clear();
        self.finish_refusal_if_done(out);
    }

    /// Forwards a checked line; a literal at its end (always as a synchronizing one) or `IDLE`
    /// makes the framer wait for the backend.
    fn forward(
        &mut self,
        line: &[u8],
        literal: Option<Literal>,
        idle: bool,
        out: &mut ClientOutput,
    ) {
        let awaited = match literal {
            Some(lit) => {
                let ending = &line[body_of(line).len()..];
                out.forward.extend_from_slice(&line[..lit.at]);
                out.forward
                    .extend_from_slice(format!("{{{}}}", lit.len).as_bytes());
                out.forward.extend_from_slice(ending);
                Some((
                    Awaited::Literal {
                        len: lit.len,
                        sync: lit.sync,
                    },
                    lit.sync,
                ))
            }
            None => {
                out.forward.extend_from_slice(line);
                idle.then_some((Awaited::Idle, true))
            }
        };
        self.state = match awaited {
            Some((awaited, relay)) => {
                let mut ex = lock(&self.shared);
                ex.awaiting = Some(Awaiting {
                    tag: self.tag.clone(),
                    relay,
                });
                ex.answer = None;
                ClientState::Await(awaited)
            }
            None => ClientState::Head,
        };
    }

    /// A line reached [`MAX_LINE`] without ending.
    fn overlong(&mut self) {
        if self.state != ClientState::Head {
            // Inside a command already partly forwarded, or in IDLE.
            self.aborted = true;
            return;
        }
        let line = std::mem::take(&mut self.line);
        let tag_len = line.iter().take_while(|&&b| is_tag_char(b)).count();
        self.refusal = if tag_len > 0 && tag_len <= MAX_TAG && line.get(tag_len) == Some(&b' ') {
            line[..tag_len].to_vec()
        } else {
            b"*".to_vec()
        };
        self.refusal
            .extend_from_slice(b" BAD Command line too long\r\n");
        self.tail.clear();
        self.remember_tail(&line);
        self.state = ClientState::DiscardLine;
    }

    fn remember_tail(&mut self, bytes: &[u8]) {
        self.tail
            .extend_from_slice(&bytes[bytes.len().saturating_sub(TAIL)..]);
        if self.tail.len() > TAIL {
            self.tail.drain(..self.tail.len() - TAIL);
        }
    }

    fn finish_refusal_if_done(&mut self, out: &mut ClientOutput) {
        // A refused command is answered once it has ended.
        if !self.refusal.is_empty() && self.state == ClientState::Head {
            out.replies.push(std::mem::take(&mut self.refusal));
        }
    }

    /// Whether input is held that a `push(&[])` would now make progress on (it stopped at a
    /// limit, not at an awaited answer).
    pub fn holding(&mut self) -> bool {
        !self.stash.is_empty() && !self.waiting() && !self.aborted
    }

    /// True when no command is partly forwarded (a safe point to stop).
    pub fn at_boundary(&self) -> bool {
        self.state == ClientState::Head && self.line.is_empty()
    }

    /// Bytes of an open literal that `push` would forward unchanged (an `APPEND` body), so
    /// they may also reach the backend without it (see [`Self::skip_literal`]). Only a
    /// literal the backend asked for counts: nothing is offered while its answer is awaited,
    /// or while input is held, and a refused command's literal is discarded, not forwarded.
    pub fn literal_left(&self) -> u64 {
        match self.state {
            ClientState::Literal(n) if self.stash.is_empty() => n,
            _ => 0,
        }
    }

    /// Accounts for `n` literal bytes that went to the backend without `push`: the same state
    /// as pushing them (bytes beyond the open literal are not literal and are ignored).
    pub fn skip_literal(&mut self, n: u64) {
        if let ClientState::Literal(left) = self.state {
            self.state = match left.saturating_sub(n) {
                0 => ClientState::Rest,
                left => ClientState::Literal(left),
            };
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    LineStart,
    /// Streaming a line too long to hold.
    Line,
    Literal(u64),
}

/// Backend→client framer: strips `UNAUTHENTICATE` from capability lists and reports response
/// boundaries, where locally generated replies may be inserted.
#[derive(Debug)]
pub struct ResponseFramer {
    state: ServerState,
    held: Vec<u8>,
    tail: Vec<u8>,
    /// Shared with the session's [`CommandFramer`] (see [`pair`]); without it (tests,
    /// fuzzing) responses are not matched to commands.
    shared: Option<Shared>,
    desync: bool,
}

impl Default for ResponseFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseFramer {
    /// A framer on its own, which matches no response to a command (tests, fuzzing).
    pub fn new() -> Self {
        Self {
            state: ServerState::LineStart,
            held: Vec::new(),
            tail: Vec::new(),
            shared: None,
            desync: false,
        }
    }

    fn with(shared: Shared) -> Self {
        Self {
            shared: Some(shared),
            ..Self::new()
        }
    }

    /// The backend sent a `+` nobody asked for, or completed a tag the proxy never forwarded:
    /// it read the client's bytes differently from the proxy. Nothing more is passed on, and
    /// the session must end.
    pub fn desync(&self) -> bool {
        self.desync
    }

    /// At the start of each response: matches it to what the client side forwarded, and says
    /// whether the client sees it (a `+` for a literal the client did not wait for is kept).
    fn response_start(&mut self, line: &[u8]) -> bool {
        let Some(shared) = &self.shared else {
            return true;
        };
        let mut ex = lock(shared);
        match line.first() {
            Some(b'*') => return true,
            Some(b'+') => {
                if ex.answer.is_none() {
                    if let Some(a) = &ex.awaiting {
                        let relay = a.relay;
                        ex.answer = Some(true);
                        return relay;
                    }
                }
                ex.desync = true;
                self.desync = true;
                return false;
            }
            _ => {}
        }
        let tag_len = line
            .iter()
            .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
            .unwrap_or(line.len());
        let tag = &line[..tag_len];
        let Some(i) = ex.outstanding.iter().position(|t| t == tag) else {
            ex.desync = true;
            self.desync = true;
            return false;
        };
        ex.outstanding.remove(i);
        if ex.answer.is_none() && ex.awaiting.as_ref().is_some_and(|a| a.tag == tag) {
            ex.answer = Some(false);
        }
        true
    }

    /// True between responses: nothing is held and no line or literal is open.
    pub fn at_boundary(&self) -> bool {
        self.state == ServerState::LineStart && self.held.is_empty()
    }

    /// Bytes of an open literal still to come. `push` passes them on unchanged, so they may
    /// also reach the client without it (see [`Self::skip_literal`]).
    pub fn literal_left(&self) -> u64 {
        match self.state {
            ServerState::Literal(n) => n,
            _ => 0,
        }
    }

    /// Accounts for `n` literal bytes that went to the client without `push`: the same state
    /// as pushing them (bytes beyond the open literal are not literal and are ignored).
    pub fn skip_literal(&mut self, n: u64) {
        if let ServerState::Literal(left) = self.state {
            let left = left.saturating_sub(n);
            self.state = if left == 0 {
                ServerState::Line
            } else {
                ServerState::Literal(left)
            };
        }
    }

    /// Processes a chunk from the backend, appending what to send to the client to `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() && !self.desync {
            match self.state {
                ServerState::LineStart => {
                    let room = MAX_HELD_LINE - self.held.len();
                    let nl = memchr(b'\n', &input[..input.len().min(room)]);
                    match nl {
                        Some(i) => {
                            self.held.extend_from_slice(&input[..=i]);
                            input = &input[i + 1..];
                            let line = std::mem::take(&mut self.held);
                            let lit = literal_at_end(&line);
                            if self.response_start(&line) {
                                strip_unauthenticate(&line, out);
                            }
                            self.held = line;
                            self.held.clear();
                            if let Some((n, _)) = lit {
                                self.state = ServerState::Literal(n);
                            }
                        }
                        None if input.len() >= room => {
                            // Too long to hold: stream it untouched. Its start is matched
                            // all the same (and a `+` this long is passed on, not kept).
                            let mut start = std::mem::take(&mut self.held);
                            start.extend_from_slice(&input[..room.min(64)]);
                            self.response_start(&start);
                            start.truncate(start.len() - room.min(64));
                            self.held = start;
                            if self.desync {
                                return;
                            }
                            out.extend_from_slice(&self.held);
                            out.extend_from_slice(&input[..room]);
                            self.tail.clear();
                            let mut t = std::mem::take(&mut self.held);
                            t.extend_from_slice(&input[..room]);
                            self.tail
                                .extend_from_slice(&t[t.len().saturating_sub(TAIL)..]);
                            input = &input[room..];
                            self.state = ServerState::Line;
                        }
                        None => {
                            self.held.extend_from_slice(input);
                            input = &[];
                        }
                    }
                }
                ServerState::Line => {
                    let (chunk, ended) = match memchr(b'\n', input) {
                        Some(i) => (&input[..=i], true),
                        None => (input, false),
                    };
                    out.extend_from_slice(chunk);
                    self.tail.extend_from_slice(chunk);
                    if self.tail.len() > TAIL {
                        self.tail.drain(..self.tail.len() - TAIL);
                    }
                    input = &input[chunk.len()..];
                    if ended {
                        self.state = match literal_at_end(&self.tail) {
                            Some((n, _)) => ServerState::Literal(n),
                            None => ServerState::LineStart,
                        };
                        self.tail.clear();
                    }
                }
                ServerState::Literal(n) => {
                    let take = (input.len() as u64).min(n) as usize;
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let left = n - take as u64;
                    // After a literal the response line continues; it is not a new response.
                    self.state = if left == 0 {
                        ServerState::Line
                    } else {
                        ServerState::Literal(left)
                    };
                }
            }
        }
    }
}

/// Copies `line` to `out`, dropping an `UNAUTHENTICATE` token if the line is a capability
/// response (`* CAPABILITY …`) or carries a `[CAPABILITY …]` code.
fn strip_unauthenticate(line: &[u8], out: &mut Vec<u8>) {
    let is_cap = {
        let upper_prefix: Vec<u8> = line.iter().take(256).map(u8::to_ascii_uppercase).collect();
        upper_prefix.starts_with(b"* CAPABILITY ")
            || memchr::memmem::find(&upper_prefix, b"[CAPABILITY ").is_some()
    };
    if !is_cap {
        out.extend_from_slice(line);
        return;
    }
    let needle = b"UNAUTHENTICATE";
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        let boundary_before = i > 0 && line[i - 1] == b' ';
        if boundary_before
            && rest.len() >= needle.len()
            && rest[..needle.len()].eq_ignore_ascii_case(needle)
        {
            let after = rest.get(needle.len()).copied();
            if matches!(after, Some(b' ' | b']' | b'\r' | b'\n')) {
                // Drop the token and the space before it.
                out.pop();
                i += needle.len();
                continue;
            }
        }
        out.push(line[i]);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn collect(all: &mut ClientOutput, o: ClientOutput) {
        all.forward.extend(o.forward);
        all.replies.extend(o.replies);
        all.abort |= o.abort;
    }

    /// Pushes `input` and, while a continuation is awaited, answers it as a backend would
    /// (`continued`: `+`; otherwise the command's tagged completion).
    fn push_answering(
        f: &mut CommandFramer,
        input: &[u8],
        continued: bool,
        all: &mut ClientOutput,
    ) {
        collect(all, f.push(input));
        loop {
            if f.awaited_tag().is_some() && !all.abort {
                f.backend_answered(continued && f.expects_continuation());
                assert!(!f.waiting());
            } else if all.abort || !f.holding() {
                break;
            }
            collect(all, f.push(&[]));
        }
    }

    /// The client side alone, every literal and `IDLE` granted by the backend.
    fn run_client(chunks: &[&[u8]]) -> ClientOutput {
        let mut f = CommandFramer::new();
        let mut all = ClientOutput::default();
        for c in chunks {
            push_answering(&mut f, c, true, &mut all);
        }
        all
    }

    /// A session's two framers; the backend's lines go through the response framer.
    struct Session {
        up: CommandFramer,
        down: ResponseFramer,
        forwarded: Vec<u8>,
        to_client: Vec<u8>,
        replies: Vec<Vec<u8>>,
        abort: bool,
    }

    impl Session {
        fn new() -> Self {
            let (up, down) = pair(DEFAULT_COMMAND_MAX);
            Self {
                up,
                down,
                forwarded: Vec::new(),
                to_client: Vec::new(),
                replies: Vec::new(),
                abort: false,
            }
        }
        fn client(&mut self, bytes: &[u8]) {
            let o = self.up.push(bytes);
            self.take(o);
        }
        fn backend(&mut self, bytes: &[u8]) {
            self.down.push(bytes, &mut self.to_client);
            if !self.up.waiting() {
                loop {
                    let o = self.up.push(&[]);
                    self.take(o);
                    if !self.up.holding() {
                        break;
                    }
                }
            }
        }
        fn lines_forwarded(&self) -> usize {
            self.forwarded.iter().filter(|&&b| b == b'\n').count()
        }
        fn take(&mut self, o: ClientOutput) {
            self.forwarded.extend(o.forward);
            self.replies.extend(o.replies);
            self.abort |= o.abort;
        }
    }

    #[test]
    fn unauthenticate_is_refused_locally() {
        let o = run_client(&[b"a1 SELECT INBOX\r\nb2 UNAUTHENTICATE\r\nc3 NOOP\r\n"]);
        assert_eq!(o.forward, b"a1 SELECT INBOX\r\nc3 NOOP\r\n");
        assert_eq!(
            o.replies,
            vec![b"b2 NO [CANNOT] UNAUTHENTICATE is not available\r\n".to_vec()]
        );
        let o = run_client(&[b"x unauthenticate\r\n"]);
        assert!(o.forward.is_empty());
        assert_eq!(o.replies.len(), 1);
    }

    #[test]
    fn literal_bytes_are_never_commands() {
        let body = b"b UNAUTHENTICATE\r\n";
        let mut input = format!("a APPEND INBOX {{{}}}\r\n", body.len()).into_bytes();
        input.extend_from_slice(body);
        input.extend_from_slice(b"\r\nc NOOP\r\n");
        let o = run_client(&[&input]);
        assert_eq!(o.forward, input);
        assert!(o.replies.is_empty());
    }

    #[test]
    fn every_split_gives_the_same_result() {
        let input: &[u8] =
            b"a SELECT {3}\r\nabc x\r\nb UNAUTHENTICATE\r\nc APPEND x {4+}\r\nb UN\r\n";
        let whole = run_client(&[input]);
        for cut in 0..input.len() {
            let o = run_client(&[&input[..cut], &input[cut..]]);
            assert_eq!(o, whole, "cut at {cut}");
        }
        assert_eq!(whole.replies.len(), 1);
        assert_eq!(
            whole.forward,
            b"a SELECT {3}\r\nabc x\r\nc APPEND x {4}\r\nb UN\r\n"
        );
    }

    #[test]
    fn refused_command_with_sync_literal_does_not_eat_the_next_command() {
        let o = run_client(&[b"b UNAUTHENTICATE {5}\r\nc NOOP\r\n"]);
        assert_eq!(o.forward, b"c NOOP\r\n");
        assert_eq!(o.replies.len(), 1);
        let o = run_client(&[b"b UNAUTHENTICATE {5+}\r\nc NOO\r\nd NOOP\r\n"]);
        assert_eq!(o.forward, b"d NOOP\r\n");
    }

    #[test]
    fn overlong_lines_are_refused_and_never_forwarded() {
        let mut input = b"a SELECT ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 9000));
        input.extend_from_slice(b" {20+}\r\nb UNAUTHENTICATE\r\n..\r\nc NOOP\r\n");
        let o = run_client(&[&input]);
        assert_eq!(o.forward, b"c NOOP\r\n");
        assert_eq!(o.replies, vec![b"a BAD Command line too long\r\n".to_vec()]);
        assert!(!o.abort);
        let o = run_client(&[&vec![b'a'; 9000], b"\r\nc NOOP\r\n"]);
        assert_eq!(o.forward, b"c NOOP\r\n");
        assert_eq!(o.replies, vec![b"* BAD Command line too long\r\n".to_vec()]);
    }

    /// Every way the backend would still read `UNAUTHENTICATE` as the command: leading or
    /// doubled whitespace, tabs, `UID`, any case. None of them is forwarded.
    #[test]
    fn unauthenticate_in_any_spelling_never_reaches_the_backend() {
        for line in [
            &b" a UNAUTHENTICATE\r\n"[..],
            b"a  UNAUTHENTICATE\r\n",
            b"a UID UNAUTHENTICATE\r\n",
            b"a uid unauthenticate\r\n",
            b"a UNAUTHENTICATE\t\r\n",
            b"a\tb UNAUTHENTICATE\r\n",
            b"a\rb UNAUTHENTICATE\r\n",
            b"a UnAuThEnTiCaTe\n",
            b"\ta UNAUTHENTICATE\r\n",
            b"a UNAUTHENTICATE \r\n",
        ] {
            let o = run_client(&[line, b"z NOOP\r\n"]);
            assert_eq!(
                o.forward,
                b"z NOOP\r\n",
                "{:?}",
                String::from_utf8_lossy(line)
            );
            assert_eq!(o.replies.len(), 1, "{:?}", String::from_utf8_lossy(line));
        }
    }

    /// Only commands of the allow-list pass; the ones of the login phase do not.
    #[test]
    fn unknown_and_login_phase_commands_are_refused_locally() {
        for line in [
            &b"a XYZZY\r\n"[..],
            b"a LOGIN user pass\r\n",
            b"a AUTHENTICATE PLAIN\r\n",
            b"a STARTTLS\r\n",
            b"a UID CAPABILITY\r\n",
            b"a COMPRESS DEFLATE\r\n",
            b"a NOOP1\r\n",
            b"a NOOP(\r\n",
            b"DONE\r\n",
            b"+ x\r\n",
        ] {
            let o = run_client(&[line]);
            assert!(o.forward.is_empty(), "{:?}", String::from_utf8_lossy(line));
            assert_eq!(o.replies.len(), 1);
        }
        let o = run_client(&[b"\r\n\r\na uid fetch 1:* (FLAGS)\r\nb Select INBOX\r\n"]);
        assert_eq!(o.forward, b"a uid fetch 1:* (FLAGS)\r\nb Select INBOX\r\n");
        assert!(o.replies.is_empty());
    }

    /// A literal after a line the backend would not parse as announcing one: refused, and its
    /// bytes (which the backend would read as commands) are discarded.
    #[test]
    fn lines_outside_the_strict_syntax_are_refused_with_their_literal() {
        for head in [
            &b"a XYZZY {18+}\r\n"[..],
            b"a NOOP x{18+}\r\n",
            b"a SELECT {18+} \r\n",
            b"a SELECT {abc} {18+}\r\n",
            b"a SELECT \"open {18+}\r\n",
            b"a SELECT {} {18+}\r\n",
            b"a SELECT\tINBOX {18+}\r\n",
            b"a SELECT IN\x01BOX {18+}\r\n",
            b"a FETCH 1 BODY[ \"x \"{5x {18+}\r\n",
        ] {
            let mut input = head.to_vec();
            input.extend_from_slice(b"b UNAUTHENTICATE\r\n\r\nc NOOP\r\n");
            let o = run_client(&[&input]);
            assert_eq!(
                o.forward,
                b"c NOOP\r\n",
                "{:?}",
                String::from_utf8_lossy(head)
            );
            assert_eq!(o.replies.len(), 1, "{:?}", String::from_utf8_lossy(head));
        }
        // A length the backend cannot parse: refused, and the client's bytes are its literal.
        // It is answered once that literal has ended.
        let o = run_client(&[b"a SELECT {99999999999+}\r\nb UNAUTHENTICATE\r\n"]);
        assert!(o.forward.is_empty());
        assert!(o.replies.is_empty());
        // Within the syntax: quoted braces, literal8, a literal after a parenthesis.
        let o = run_client(&[
            b"a SELECT \"x {5} \\\" y\"\r\nb APPEND INBOX ~{2}\r\nhi\r\nc APPEND INBOX ({1}\r\nx)\r\n",
        ]);
        assert!(o.replies.is_empty(), "{:?}", o.replies);
        assert!(!o.abort);
    }

    /// A non-synchronizing literal goes to the backend as a synchronizing one and waits for
    /// its `+`, which the client never sees; refused by the backend, it is discarded.
    #[test]
    fn non_sync_literals_wait_for_the_backend_and_its_plus_is_kept_from_the_client() {
        let mut s = Session::new();
        s.client(b"a APPEND INBOX {18+}\r\nb UNAUTHENTICATE\r\n\r\nc NOOP\r\n");
        assert_eq!(s.forwarded, b"a APPEND INBOX {18}\r\n");
        assert!(s.up.waiting());
        assert_eq!(s.up.literal_left(), 0, "nothing is offered before the +");
        s.backend(b"* 3 EXISTS\r\n+ Ready for literal\r\n");
        assert_eq!(s.to_client, b"* 3 EXISTS\r\n");
        assert_eq!(
            s.forwarded,
            b"a APPEND INBOX {18}\r\nb UNAUTHENTICATE\r\n\r\nc NOOP\r\n"
        );
        s.backend(b"a OK appended\r\nc OK noop\r\n");
        assert!(!s.down.desync());
        assert!(s.replies.is_empty());

        // The backend refuses the line: the literal is dropped with the rest of the command.
        let mut s = Session::new();
        s.client(b"a APPEND INBOX {18+}\r\nb UNAUTHENTICATE\r\n (x)\r\nc NOOP\r\n");
        s.backend(b"a BAD no\r\n");
        assert_eq!(s.forwarded, b"a APPEND INBOX {18}\r\nc NOOP\r\n");
        assert_eq!(s.to_client, b"a BAD no\r\n");

        // A synchronizing literal: the client sees the +; refused, it sends no literal.
        let mut s = Session::new();
        s.client(b"a APPEND INBOX {5}\r\n");
        s.backend(b"+ go\r\n");
        assert_eq!(s.to_client, b"+ go\r\n");
        s.client(b"hello\r\n");
        assert_eq!(s.forwarded, b"a APPEND INBOX {5}\r\nhello\r\n");
        let mut s = Session::new();
        s.client(b"a APPEND NOSUCH {5}\r\n");
        s.backend(b"a NO [TRYCREATE] no\r\n");
        s.client(b"b NOOP\r\n");
        assert_eq!(s.forwarded, b"a APPEND NOSUCH {5}\r\nb NOOP\r\n");
    }

    /// The backend reading the stream differently shows in its answers: a `+` or a tag the
    /// proxy never sent. Nothing after it reaches the client, and the client side stops.
    #[test]
    fn answers_nobody_asked_for_end_the_session() {
        let mut s = Session::new();
        s.client(b"a NOOP\r\n");
        s.backend(b"* OK x\r\n+ Ready\r\na OK done\r\n");
        assert!(s.down.desync());
        assert_eq!(s.to_client, b"* OK x\r\n");
        s.client(b"b NOOP\r\n");
        assert!(s.abort);
        assert_eq!(s.forwarded, b"a NOOP\r\n");

        let mut s = Session::new();
        s.client(b"a NOOP\r\n");
        s.backend(b"a OK done\r\nx OK unauthenticated\r\n");
        assert!(s.down.desync());
        assert_eq!(s.to_client, b"a OK done\r\n");

        // A tag completes once.
        let mut s = Session::new();
        s.client(b"a NOOP\r\n");
        s.backend(b"a OK\r\n");
        assert!(!s.down.desync());
        s.backend(b"a OK\r\n");
        assert!(s.down.desync());
    }

    /// `IDLE` waits for its `+` (which the client sees), then only `DONE` is accepted.
    #[test]
    fn idle_waits_for_its_continuation_and_only_done_ends_it() {
        let mut s = Session::new();
        s.client(b"a IDLE\r\nDONE\r\nb NOOP\r\n");
        assert_eq!(s.forwarded, b"a IDLE\r\n");
        s.backend(b"+ idling\r\n");
        assert_eq!(s.to_client, b"+ idling\r\n");
        // After DONE nothing until IDLE has completed.
        assert_eq!(s.forwarded, b"a IDLE\r\nDONE\r\n");
        s.backend(b"a OK done\r\n");
        assert_eq!(s.forwarded, b"a IDLE\r\nDONE\r\nb NOOP\r\n");
        s.backend(b"b OK\r\n");
        assert!(!s.down.desync() && !s.abort);

        // Any case from the client; the backend gets the capitals it compares with.
        let mut s = Session::new();
        s.client(b"a IDLE\r\n");
        s.backend(b"+ idling\r\n");
        s.client(b"done\nb NOOP\r\n");
        s.backend(b"a OK\r\n");
        assert_eq!(s.forwarded, b"a IDLE\r\nDONE\nb NOOP\r\n");

        // A second + for the same IDLE: the backend is elsewhere.
        let mut s = Session::new();
        s.client(b"a IDLE\r\n");
        s.backend(b"+ idling\r\n");
        s.client(b"DONE\r\nb NOOP\r\n");
        s.backend(b"+ again\r\n");
        assert!(s.abort || s.down.desync());
        assert_eq!(s.forwarded, b"a IDLE\r\nDONE\r\n");

        let mut s = Session::new();
        s.client(b"a IDLE\r\n");
        s.backend(b"+ idling\r\n");
        s.client(b"b UNAUTHENTICATE\r\n");
        assert!(s.abort);
        assert_eq!(s.forwarded, b"a IDLE\r\n");

        // Refused by the backend: the next line is a command again.
        let mut s = Session::new();
        s.client(b"a IDLE\r\nb NOOP\r\n");
        s.backend(b"a BAD not now\r\n");
        assert_eq!(s.forwarded, b"a IDLE\r\nb NOOP\r\n");
    }

    /// At most [`MAX_OUTSTANDING`] commands are in flight; the rest waits for completions.
    #[test]
    fn outstanding_commands_are_bounded() {
        let mut s = Session::new();
        let many: Vec<u8> = (0..MAX_OUTSTANDING + 10)
            .flat_map(|i| format!("t{i} NOOP\r\n").into_bytes())
            .collect();
        s.client(&many);
        assert!(s.up.waiting());
        assert_eq!(s.lines_forwarded(), MAX_OUTSTANDING);
        s.backend(b"t0 OK\r\n");
        assert_eq!(s.lines_forwarded(), MAX_OUTSTANDING + 1);
    }

    /// A tag may not be reused while its command runs: its answer could be taken for the
    /// other's (the backend's `a OK` for a NOOP read as the refusal of an awaited literal).
    #[test]
    fn a_tag_in_use_is_refused_and_free_again_once_completed() {
        let mut s = Session::new();
        s.client(b"a NOOP\r\na APPEND INBOX {21}\r\nc APPEND INBOX {20}\r\n");
        assert_eq!(s.forwarded, b"a NOOP\r\nc APPEND INBOX {20}\r\n");
        assert_eq!(
            s.replies,
            vec![b"a BAD Tag already in use by a command in progress\r\n".to_vec()]
        );
        // `a OK` completes the NOOP and says nothing about c's literal.
        s.backend(b"a OK\r\n");
        assert!(s.up.waiting());
        s.client(b"x");
        assert_eq!(s.forwarded, b"a NOOP\r\nc APPEND INBOX {20}\r\n");
        let mut s = Session::new();
        s.client(b"a NOOP\r\n");
        s.backend(b"a OK\r\n");
        s.client(b"a NOOP\r\n");
        assert_eq!(s.forwarded, b"a NOOP\r\na NOOP\r\n");
    }

    /// A command larger than the backend accepts would be refused in the middle of a line;
    /// it is refused before any of it is forwarded, or the session ends if part already was.
    #[test]
    fn commands_over_the_size_limit_never_reach_the_backend_whole() {
        let (up, down) = pair(100_000);
        let mut s = Session {
            up,
            down,
            ..Session::new()
        };
        let mut input = b"a APPEND INBOX {95000+}\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 95_000));
        input.extend_from_slice(b"\r\nb NOOP\r\n");
        s.client(&input);
        assert_eq!(s.forwarded, b"b NOOP\r\n");
        assert_eq!(s.replies, vec![b"a BAD Command too large\r\n".to_vec()]);
        s.backend(b"b OK\r\n");
        s.client(b"c APPEND INBOX (\\Seen) {50000}\r\n");
        s.backend(b"+ go\r\n");
        s.client(&[b'y'; 50_000]);
        s.client(b" {45000}\r\n");
        assert!(s.abort, "a second literal past the limit was forwarded");
        assert!(!s.forwarded.ends_with(b"{45000}\r\n"));
    }

    /// A flood of refused lines produces a few replies per push; the rest waits.
    #[test]
    fn refusals_are_produced_a_few_at_a_time() {
        let mut f = CommandFramer::new();
        let flood = b"x\r\n".repeat(10_000);
        let o = f.push(&flood);
        assert_eq!(o.replies.len(), REFUSALS_PER_PUSH);
        assert!(f.holding());
        let mut total = o.replies.len();
        while f.holding() {
            total += f.push(&[]).replies.len();
        }
        assert_eq!(total, 10_000);
    }

    #[test]
    fn capability_lists_lose_unauthenticate() {
        let mut f = ResponseFramer::new();
        let mut out = Vec::new();
        f.push(b"* CAPABILITY IMAP4rev1 UNAUTHENTICATE IDLE\r\n", &mut out);
        f.push(
            b"a OK [CAPABILITY IMAP4rev1 IDLE UNAUTHENTICATE] done\r\n",
            &mut out,
        );
        f.push(b"* OK mention of UNAUTHENTICATE in text\r\n", &mut out);
        assert_eq!(
            out,
            b"* CAPABILITY IMAP4rev1 IDLE\r\na OK [CAPABILITY IMAP4rev1 IDLE] done\r\n* OK mention of UNAUTHENTICATE in text\r\n"
        );
        assert!(f.at_boundary());
    }

    #[test]
    fn response_literals_pass_untouched() {
        let mut f = ResponseFramer::new();
        let mut out = Vec::new();
        let msg = b"* CAPABILITY UNAUTHENTICATE\r\n";
        let mut input = format!("* 1 FETCH (BODY[] {{{}}}\r\n", msg.len()).into_bytes();
        input.extend_from_slice(msg);
        input.extend_from_slice(b")\r\n");
        for b in &input {
            f.push(std::slice::from_ref(b), &mut out);
            if out.len() < input.len() - 3 && out.len() > 30 {
                assert!(!f.at_boundary());
            }
        }
        assert_eq!(out, input);
        assert!(f.at_boundary());
    }

    proptest! {
        #[test]
        fn client_framer_never_panics_and_forwards_a_subsequence(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            cut in 0usize..2000,
        ) {
            let cut = cut.min(data.len());
            let o = run_client(&[&data[..cut], &data[cut..]]);
            prop_assert!(o.forward.len() <= data.len());
        }

        #[test]
        fn response_framer_is_identity_without_capability_lines(
            data in proptest::collection::vec(any::<u8>(), 0..4000),
        ) {
            let mut f = ResponseFramer::new();
            let mut out = Vec::new();
            f.push(&data, &mut out);
            let upper: Vec<u8> = data.to_ascii_uppercase();
            if memchr::memmem::find(&upper, b"CAPABILITY").is_none() {
                // Whatever was not held at the end was forwarded unchanged.
                prop_assert!(data.starts_with(&out));
            }
        }

        /// What the splice relies on for zero-copy bodies: sending the open literal's bytes
        /// past the framer (`literal_left`, `skip_literal`) gives the client the same bytes
        /// and leaves the framer where pushing them would have.
        #[test]
        fn skipping_literal_bytes_equals_pushing_them(
            parts in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..200),
                    (0usize..3000).prop_map(|n| format!("* 1 FETCH (BODY[] {{{n}}}\r\n").into_bytes()
                        .into_iter().chain(std::iter::repeat_n(b'x', n)).chain(*b")\r\n").collect()),
                ],
                0..8,
            ),
            chunk in 1usize..700,
            skip_share in 1u64..4,
        ) {
            let data: Vec<u8> = parts.concat();
            let mut pushed = ResponseFramer::new();
            let mut expected = Vec::new();
            for c in data.chunks(chunk) {
                pushed.push(c, &mut expected);
            }
            let mut skipping = ResponseFramer::new();
            let mut got = Vec::new();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let left = skipping.literal_left();
                if left > 0 {
                    // Part of the literal goes around the framer, as a splice would send it.
                    let n = (left / skip_share).max(1).min(rest.len() as u64) as usize;
                    got.extend_from_slice(&rest[..n]);
                    skipping.skip_literal(n as u64);
                    rest = &rest[n..];
                } else {
                    let n = chunk.min(rest.len());
                    skipping.push(&rest[..n], &mut got);
                    rest = &rest[n..];
                }
            }
            prop_assert_eq!(got, expected);
            prop_assert_eq!(skipping.state, pushed.state);
            prop_assert_eq!(skipping.at_boundary(), pushed.at_boundary());
        }

        /// The same for the client side (`APPEND` bodies to the backend), with refused
        /// commands in the mix: their literals are never offered for skipping.
        #[test]
        fn skipping_command_literal_bytes_equals_pushing_them(
            parts in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..200),
                    (0usize..3000, any::<bool>(), any::<bool>()).prop_map(|(n, sync, refused)| {
                        let name = if refused { "UNAUTHENTICATE" } else { "APPEND INBOX" };
                        let plus = if sync { "" } else { "+" };
                        format!("t {name} {{{n}{plus}}}\r\n").into_bytes()
                            .into_iter().chain(std::iter::repeat_n(b'x', n)).chain(*b"\r\n").collect()
                    }),
                ],
                0..8,
            ),
            chunk in 1usize..700,
            skip_share in 1u64..4,
        ) {
            let data: Vec<u8> = parts.concat();
            let mut pushed = CommandFramer::new();
            let mut expected = ClientOutput::default();
            for c in data.chunks(chunk) {
                push_answering(&mut pushed, c, true, &mut expected);
            }
            let mut skipping = CommandFramer::new();
            let mut got = ClientOutput::default();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let left = skipping.literal_left();
                if left > 0 {
                    let n = (left / skip_share).max(1).min(rest.len() as u64) as usize;
                    got.forward.extend_from_slice(&rest[..n]);
                    skipping.skip_literal(n as u64);
                    rest = &rest[n..];
                } else {
                    let n = chunk.min(rest.len());
                    push_answering(&mut skipping, &rest[..n], true, &mut got);
                    rest = &rest[n..];
                    if got.abort {
                        break;
                    }
                }
            }
            if !expected.abort {
                prop_assert_eq!(got, expected);
                prop_assert_eq!(skipping.state, pushed.state);
                prop_assert_eq!(skipping.at_boundary(), pushed.at_boundary());
            }
        }
    }

    #[test]
    fn refused_literals_are_never_offered_for_skipping() {
        let mut f = CommandFramer::new();
        let o = f.push(b"b UNAUTHENTICATE {100000+}\r\n");
        assert!(o.forward.is_empty());
        assert_eq!(f.literal_left(), 0);
        f.skip_literal(10);
        let o = f.push(b"x");
        assert!(o.forward.is_empty(), "discarded literal byte was forwarded");
        let mut f = CommandFramer::new();
        f.push(b"a APPEND INBOX {100000+}\r\n");
        assert_eq!(f.literal_left(), 0, "offered before the backend asked");
        f.backend_answered(true);
        assert!(!f.waiting());
        assert_eq!(f.literal_left(), 100_000);
        f.skip_literal(99_999);
        assert_eq!(f.literal_left(), 1);
        assert_eq!(f.push(b"x\r\nc NOOP\r\n").forward, b"x\r\nc NOOP\r\n");
        assert!(f.at_boundary());
    }
}
