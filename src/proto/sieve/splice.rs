//! After login: the client→backend filter ([`SieveUpstream`]) and the backend→client filter
//! ([`SieveDownstream`]).
//!
//! ManageSieve responses carry no tag: a client matches them to its commands by order. A reply
//! made up locally and inserted whenever the backend is quiet could therefore be taken for the
//! answer to an earlier command. So a refused command is replaced by `NOOP`, which the backend
//! answers in order, and the downstream filter swaps that answer for the refusal. Both filters
//! share the list of commands awaiting an answer (what each one was), which is also how the
//! downstream knows which response is a capability list.
//!
//! Refused: `UNAUTHENTICATE` (it would hand the client the backend's own login), a second
//! `AUTHENTICATE`, `STARTTLS`, and commands RFC 5804 does not define. Everything else goes
//! through byte for byte, with two exceptions that keep both sides framing the stream alike:
//! `{n}` literals are forwarded as `{n+}` (some servers answer `{n}` with an extra
//! `OK Ready` line, which would shift every later answer), and empty lines are dropped (servers
//! differ on whether they answer them).
//!
//! Literal octets are never parsed as commands. The filter does check that commands are
//! well-formed, strings included (RFC 5804 strings are UTF-8), and ends the session otherwise: a
//! backend that rejected a malformed string half-way through a line could resynchronise inside a
//! literal and run what the client hid there.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use super::wire::{literal_at_end, Utf8};
use crate::proto::imap::framer::ClientOutput;
use crate::splice::{Downstream, Upstream};

/// Longest command name.
const MAX_NAME: usize = 32;
/// Line bytes of one command (literal data excluded): short of any server's line limit, so the
/// backend never rejects a line this filter let through.
const MAX_LINE: usize = 4096;
/// Commands sent but not yet answered.
const MAX_OUTSTANDING: usize = 1024;
/// Longest response line held to look at its start; longer ones are decided on this prefix.
const MAX_HELD_LINE: usize = 16 * 1024;
/// Trailing bytes kept to spot a literal announcement.
const TAIL: usize = 24;

/// What a forwarded command was, for reading its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Capability,
    /// Replaced by `NOOP`; its answer becomes `NO "<text>"`.
    Refused(&'static str),
    Other,
}

type Queue = Arc<Mutex<VecDeque<Kind>>>;

/// The pair of filters for one spliced session.
pub fn splice_filters() -> (SieveUpstream, SieveDownstream) {
    let queue: Queue = Arc::default();
    (
        SieveUpstream::new(queue.clone()),
        SieveDownstream::new(queue),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    Str,
    Num,
}

/// Arguments a command takes: at least `min`, then `args` in order.
#[derive(Debug, Clone, Copy)]
struct Spec {
    min: usize,
    args: &'static [Arg],
}

const NONE: Spec = Spec { min: 0, args: &[] };

/// RFC 5804 commands allowed after login, or why one is refused.
fn lookup(name: &[u8]) -> Result<(Spec, Kind), &'static str> {
    use Arg::{Num, Str};
    let spec = |min, args| Spec { min, args };
    Ok(match name.to_ascii_uppercase().as_slice() {
        b"CAPABILITY" => (NONE, Kind::Capability),
        b"LOGOUT" | b"LISTSCRIPTS" => (NONE, Kind::Other),
        b"NOOP" => (spec(0, &[Str]), Kind::Other),
        b"HAVESPACE" => (spec(2, &[Str, Num]), Kind::Other),
        b"PUTSCRIPT" | b"RENAMESCRIPT" => (spec(2, &[Str, Str]), Kind::Other),
        b"CHECKSCRIPT" | b"SETACTIVE" | b"GETSCRIPT" | b"DELETESCRIPT" => {
            (spec(1, &[Str]), Kind::Other)
        }
        b"UNAUTHENTICATE" => return Err("UNAUTHENTICATE is not allowed"),
        b"AUTHENTICATE" => return Err("Already authenticated"),
        b"STARTTLS" => return Err("STARTTLS is not available after login"),
        _ => return Err("Unknown command"),
    })
}

/// The client sent something that is not a well-formed command.
#[derive(Debug)]
struct Malformed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    /// At a command start: its name is held until it ends.
    Name,
    /// An empty line's CR; LF expected.
    EmptyCr,
    /// After a space: another space, a token or the line end.
    Space,
    /// Right after a token: a space or the line end.
    AfterToken,
    Atom,
    Quoted {
        escape: bool,
    },
    LiteralSize {
        n: u64,
        digits: u8,
        plus: bool,
    },
    /// After `}`: CR or LF.
    LiteralClose {
        n: u64,
    },
    LiteralLf {
        n: u64,
    },
    Literal {
        left: u64,
    },
    /// CR at the line end; LF expected.
    Cr,
}

/// Client→backend filter (see the module documentation).
#[derive(Debug)]
pub struct SieveUpstream {
    state: Up,
    name: Vec<u8>,
    /// The current command goes to the backend; otherwise it is dropped and replaced.
    forwarding: bool,
    refusal: &'static str,
    spec: Spec,
    args: usize,
    line_len: usize,
    utf8: Utf8,
    queue: Queue,
    aborted: bool,
}

impl SieveUpstream {
    fn new(queue: Queue) -> Self {
        Self {
            state: Up::Name,
            name: Vec::with_capacity(MAX_NAME),
            forwarding: true,
            refusal: "",
            spec: NONE,
            args: 0,
            line_len: 0,
            utf8: Utf8::default(),
            queue,
            aborted: false,
        }
    }

    fn emit(&self, b: u8, out: &mut ClientOutput) {
        if self.forwarding {
            out.forward.push(b);
        }
    }

    fn enqueue(&self, kind: Kind) -> Result<(), Malformed> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() >= MAX_OUTSTANDING {
            return Err(Malformed);
        }
        q.push_back(kind);
        Ok(())
    }

    /// The command name ended: forward it, or start dropping the command.
    fn decide(&mut self, out: &mut ClientOutput) -> Result<(), Malformed> {
        match lookup(&self.name) {
            Ok((spec, kind)) => {
                self.enqueue(kind)?;
                self.forwarding = true;
                self.spec = spec;
                out.forward.extend_from_slice(&self.name);
            }
            Err(text) => {
                self.forwarding = false;
                self.refusal = text;
            }
        }
        Ok(())
    }

    /// The command ended (its final LF was emitted).
    fn end(&mut self, out: &mut ClientOutput) -> Result<(), Malformed> {
        if self.forwarding {
            if self.args < self.spec.min {
                return Err(Malformed);
            }
        } else {
            self.enqueue(Kind::Refused(self.refusal))?;
            out.forward.extend_from_slice(b"NOOP\r\n");
        }
        self.state = Up::Name;
        self.name.clear();
        self.forwarding = true;
        self.args = 0;
        self.line_len = 0;
        Ok(())
    }

    fn line_end(&mut self, b: u8, out: &mut ClientOutput) -> Result<(), Malformed> {
        self.emit(b, out);
        match b {
            b'\r' => {
                self.state = Up::Cr;
                Ok(())
            }
            _ => self.end(out),
        }
    }

    fn token_start(&mut self, b: u8, out: &mut ClientOutput) -> Result<(), Malformed> {
        let arg = match b {
            b'"' | b'{' => Arg::Str,
            b'0'..=b'9' => Arg::Num,
            // A dropped command only needs to be framed, not checked.
            _ if !self.forwarding && b.is_ascii_alphanumeric() => Arg::Num,
            _ => return Err(Malformed),
        };
        if self.forwarding && self.spec.args.get(self.args) != Some(&arg) {
            return Err(Malformed);
        }
        self.args += 1;
        self.state = match b {
            b'"' => {
                self.utf8 = Utf8::default();
                Up::Quoted { escape: false }
            }
            b'{' => Up::LiteralSize {
                n: 0,
                digits: 0,
                plus: false,
            },
            _ => Up::Atom,
        };
        self.emit(b, out);
        Ok(())
    }

    fn start_literal(&mut self, n: u64) {
        self.utf8 = Utf8::default();
        self.state = if n == 0 {
            Up::AfterToken
        } else {
            Up::Literal { left: n }
        };
    }

    /// One byte outside literal data.
    fn byte(&mut self, b: u8, out: &mut ClientOutput) -> Result<(), Malformed> {
        if self.state != Up::Name {
            self.line_len += 1;
            if self.line_len > MAX_LINE {
                return Err(Malformed);
            }
        }
        match self.state {
            Up::Name => match b {
                b'A'..=b'Z' | b'a'..=b'z' if self.name.len() < MAX_NAME => self.name.push(b),
                b'\r' if self.name.is_empty() => self.state = Up::EmptyCr,
                b'\n' if self.name.is_empty() => {}
                b' ' | b'\r' | b'\n' if !self.name.is_empty() => {
                    self.decide(out)?;
                    if b == b' ' {
                        self.emit(b, out);
                        self.state = Up::Space;
                    } else {
                        self.line_end(b, out)?;
                    }
                }
                _ => return Err(Malformed),
            },
            Up::EmptyCr if b == b'\n' => self.state = Up::Name,
            Up::EmptyCr => return Err(Malformed),
            Up::Space => match b {
                b' ' => self.emit(b, out),
                b'\r' | b'\n' => self.line_end(b, out)?,
                _ => self.token_start(b, out)?,
            },
            Up::AfterToken | Up::Atom => match b {
                b' ' => {
                    self.emit(b, out);
                    self.state = Up::Space;
                }
                b'\r' | b'\n' => self.line_end(b, out)?,
                b'0'..=b'9' if self.state == Up::Atom => self.emit(b, out),
                _ if self.state == Up::Atom && !self.forwarding && b.is_ascii_alphanumeric() => {}
                _ => return Err(Malformed),
            },
            Up::Quoted { escape: true } => {
                if b != b'"' && b != b'\\' {
                    return Err(Malformed);
                }
                self.emit(b, out);
                self.state = Up::Quoted { escape: false };
            }
            Up::Quoted { escape: false } => {
                match b {
                    b'\\' => self.state = Up::Quoted { escape: true },
                    b'"' if self.utf8.complete() => self.state = Up::AfterToken,
                    b'"' | b'\r' | b'\n' | 0 => return Err(Malformed),
                    _ if !self.utf8.push(b) => return Err(Malformed),
                    _ => {}
                }
                self.emit(b, out);
            }
            Up::LiteralSize { n, digits, plus } => match b {
                b'0'..=b'9' if !plus && digits < 19 => {
                    self.state = Up::LiteralSize {
                        n: n * 10 + u64::from(b - b'0'),
                        digits: digits + 1,
                        plus,
                    };
                    self.emit(b, out);
                }
                b'+' if !plus && digits > 0 => {
                    self.state = Up::LiteralSize {
                        n,
                        digits,
                        plus: true,
                    };
                    self.emit(b, out);
                }
                b'}' if digits > 0 => {
                    if !plus {
                        self.emit(b'+', out);
                    }
                    self.emit(b, out);
                    self.state = Up::LiteralClose { n };
                }
                _ => return Err(Malformed),
            },
            Up::LiteralClose { n } => {
                self.emit(b, out);
                match b {
                    b'\r' => self.state = Up::LiteralLf { n },
                    b'\n' => self.start_literal(n),
                    _ => return Err(Malformed),
                }
            }
            Up::LiteralLf { n } if b == b'\n' => {
                self.emit(b, out);
                self.start_literal(n);
            }
            Up::Cr if b == b'\n' => {
                self.emit(b, out);
                self.end(out)?;
            }
            Up::LiteralLf { .. } | Up::Cr | Up::Literal { .. } => return Err(Malformed),
        }
        Ok(())
    }

    fn push_inner(&mut self, input: &[u8], out: &mut ClientOutput) -> Result<(), Malformed> {
        let mut i = 0;
        while i < input.len() {
            if let Up::Literal { left } = self.state {
                let take = ((input.len() - i) as u64).min(left) as usize;
                let data = &input[i..i + take];
                // Up to the first invalid byte, so that what was forwarded before the session is
                // ended does not depend on how the bytes were split into reads.
                let valid = data.iter().take_while(|&&b| self.utf8.push(b)).count();
                if self.forwarding {
                    out.forward.extend_from_slice(&data[..valid]);
                }
                if valid < take {
                    return Err(Malformed);
                }
                i += take;
                let left = left - take as u64;
                if left == 0 {
                    if !self.utf8.complete() {
                        return Err(Malformed);
                    }
                    self.state = Up::AfterToken;
                } else {
                    self.state = Up::Literal { left };
                }
                continue;
            }
            self.byte(input[i], out)?;
            i += 1;
        }
        Ok(())
    }

    /// True when no command is partly forwarded.
    pub fn at_boundary(&self) -> bool {
        self.state == Up::Name && self.name.is_empty()
    }
}

impl Upstream for SieveUpstream {
    fn push(&mut self, input: &[u8]) -> ClientOutput {
        let mut out = ClientOutput::default();
        if self.aborted || self.push_inner(input, &mut out).is_err() {
            self.aborted = true;
            out.abort = true;
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    /// At a line start: the line's beginning is held until it can be read.
    LineStart,
    /// Inside a line, streaming to its LF.
    Line,
    Literal(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    No,
    Bye,
}

/// `OK`, `NO` or `BYE` at the start of a response line.
fn status_of(line: &[u8]) -> Option<Status> {
    let word_end = line
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(line.len());
    if !matches!(line.get(word_end), None | Some(b' ' | b'(' | b'\r' | b'\n')) {
        return None;
    }
    let word = &line[..word_end];
    if word.eq_ignore_ascii_case(b"OK") {
        Some(Status::Ok)
    } else if word.eq_ignore_ascii_case(b"NO") {
        Some(Status::No)
    } else if word.eq_ignore_ascii_case(b"BYE") {
        Some(Status::Bye)
    } else {
        None
    }
}

/// A capability line naming `UNAUTHENTICATE` (RFC 8437).
fn is_unauthenticate(line: &[u8]) -> bool {
    const CAP: &[u8] = b"\"UNAUTHENTICATE\"";
    line.len() > CAP.len()
        && line[..CAP.len()].eq_ignore_ascii_case(CAP)
        && matches!(line[CAP.len()], b' ' | b'\r' | b'\n')
}

/// Backend→client filter (see the module documentation).
#[derive(Debug)]
pub struct SieveDownstream {
    queue: Queue,
    state: Down,
    held: Vec<u8>,
    tail: Vec<u8>,
    /// What the response in progress answers; `None` between responses.
    kind: Option<Kind>,
    /// The current line is passed on (otherwise dropped).
    pass: bool,
    /// The current line is a status line: the response ends with it.
    status: Option<Status>,
}

impl SieveDownstream {
    fn new(queue: Queue) -> Self {
        Self {
            queue,
            state: Down::LineStart,
            held: Vec::new(),
            tail: Vec::with_capacity(TAIL),
            kind: None,
            pass: true,
            status: None,
        }
    }

    fn remember_tail(&mut self, bytes: &[u8]) {
        if bytes.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&bytes[bytes.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(bytes);
            if self.tail.len() > TAIL {
                self.tail.drain(..self.tail.len() - TAIL);
            }
        }
    }

    /// Decides about a line from its beginning.
    fn begin_line(&mut self) {
        let kind = *self.kind.get_or_insert_with(|| {
            self.queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front()
                .unwrap_or(Kind::Other)
        });
        self.status = status_of(&self.held);
        self.pass = match kind {
            Kind::Refused(_) => self.status == Some(Status::Bye),
            Kind::Capability => !is_unauthenticate(&self.held),
            Kind::Other => true,
        };
    }

    /// The line ended (no literal follows its LF).
    fn end_line(&mut self, out: &mut Vec<u8>) {
        if let Some(status) = self.status.take() {
            if let Some(Kind::Refused(text)) = self.kind {
                if status != Status::Bye {
                    out.extend_from_slice(b"NO \"");
                    out.extend_from_slice(text.as_bytes());
                    out.extend_from_slice(b"\"\r\n");
                }
            }
            self.kind = None;
        }
        self.pass = true;
        self.state = Down::LineStart;
    }

    /// After a segment's LF: a literal follows, or the line ends.
    fn segment_end(&mut self, out: &mut Vec<u8>) {
        let lf = self.tail.len().saturating_sub(1);
        let literal = literal_at_end(&self.tail[..lf]);
        self.tail.clear();
        match literal {
            Some((n, _)) if n > 0 => self.state = Down::Literal(n),
            Some(_) => self.state = Down::Line,
            None => self.end_line(out),
        }
    }

    fn push_inner(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.state {
                Down::LineStart => {
                    let room = MAX_HELD_LINE - self.held.len();
                    let window = &input[..input.len().min(room)];
                    match memchr::memchr(b'\n', window) {
                        Some(i) => {
                            self.held.extend_from_slice(&input[..=i]);
                            input = &input[i + 1..];
                            self.begin_line();
                            let held = std::mem::take(&mut self.held);
                            if self.pass {
                                out.extend_from_slice(&held);
                            }
                            self.tail.clear();
                            self.remember_tail(&held);
                            self.held = held;
                            self.held.clear();
                            self.segment_end(out);
                        }
                        None if input.len() >= room => {
                            // Too long to hold: decide on what is held and stream the rest.
                            self.held.extend_from_slice(window);
                            input = &input[window.len()..];
                            self.begin_line();
                            let held = std::mem::take(&mut self.held);
                            if self.pass {
                                out.extend_from_slice(&held);
                            }
                            self.tail.clear();
                            self.remember_tail(&held);
                            self.held = held;
                            self.held.clear();
                            self.state = Down::Line;
                        }
                        None => {
                            self.held.extend_from_slice(input);
                            input = &[];
                        }
                    }
                }
                Down::Line => {
                    let (chunk, ended) = match memchr::memchr(b'\n', input) {
                        Some(i) => (&input[..=i], true),
                        None => (input, false),
                    };
                    if self.pass {
                        out.extend_from_slice(chunk);
                    }
                    self.remember_tail(chunk);
                    input = &input[chunk.len()..];
                    if ended {
                        self.segment_end(out);
                    }
                }
                Down::Literal(n) => {
                    let take = (input.len() as u64).min(n) as usize;
                    if self.pass {
                        out.extend_from_slice(&input[..take]);
                    }
                    input = &input[take..];
                    let left = n - take as u64;
                    // After a literal the line goes on.
                    self.state = if left == 0 {
                        Down::Line
                    } else {
                        Down::Literal(left)
                    };
                }
            }
        }
    }
}

impl Downstream for SieveDownstream {
    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.push_inner(input, out);
    }

    fn at_boundary(&self) -> bool {
        self.state == Down::LineStart && self.held.is_empty()
    }
}
