//! ManageSieve on the wire (RFC 5804 §4): commands and responses are lines whose strings may be
//! literals (`{n}` / `{n+}` at the end of a line, then n octets, then the line goes on). This
//! module finds where one command or response ends (bounded, split-independent), splits a
//! complete one into tokens, and writes strings back.

use zeroize::Zeroizing;

/// Bounds for one framed command or response.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Line bytes of one command (literal data excluded).
    pub line_max: usize,
    /// Largest single literal.
    pub literal_max: u64,
    /// All literal bytes of one command together.
    pub literal_total: u64,
}

/// What the framer found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One complete command or response, with its final line ending (wiped on drop: it may
    /// hold a password).
    Complete(Zeroizing<Vec<u8>>),
    /// The line part was over `line_max`; it was discarded to the end of the command.
    TooLong,
    /// A literal over the bounds was announced; its octets were not read. After `{n+}` (whose
    /// octets are on their way) nothing further is framed; after `{n}` (`sync`), framing goes
    /// on with what follows the announcement.
    LiteralTooLarge { sync: bool },
}

/// Trailing line bytes kept to spot a literal announcement (`{` 19 digits `+}` CR).
const TAIL: usize = 24;

/// A literal announced at the end of a line, given the line without its LF.
/// `Some((length, sync))`; `sync` is true for `{n}` (no `+`).
pub fn literal_at_end(line: &[u8]) -> Option<(u64, bool)> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let mut digits = &inner[open + 1..];
    let mut sync = true;
    if let Some(d) = digits.strip_suffix(b"+") {
        digits = d;
        sync = false;
    }
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, sync))
}

/// Finds command (or response) boundaries in a byte stream, holding at most one bounded command.
///
/// Each byte is scanned once, so feeding input byte by byte costs the same as feeding it whole
/// and gives the same frames.
#[derive(Debug)]
pub struct Framer {
    limits: Limits,
    buf: Zeroizing<Vec<u8>>,
    /// Bytes of `buf` already scanned; they belong to the command in progress.
    pos: usize,
    line_len: usize,
    literal_left: u64,
    literal_total: u64,
    in_quote: bool,
    escape: bool,
    tail: Vec<u8>,
    discarding: bool,
    dead: bool,
}

impl Framer {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buf: Zeroizing::new(Vec::new()),
            pos: 0,
            line_len: 0,
            literal_left: 0,
            literal_total: 0,
            in_quote: false,
            escape: false,
            tail: Vec::with_capacity(TAIL),
            discarding: false,
            dead: false,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.dead {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Whether any byte is waiting (a partial or complete command).
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty() || self.discarding
    }

    /// Unframed bytes, exactly as received; `None` while an over-long command is being
    /// discarded (what is left of it is not a command).
    pub fn take_rest(&mut self) -> Option<Vec<u8>> {
        if self.discarding || self.dead {
            return None;
        }
        self.reset_scan();
        Some(std::mem::take(&mut *self.buf))
    }

    fn reset_scan(&mut self) {
        self.pos = 0;
        self.line_len = 0;
        self.literal_left = 0;
        self.literal_total = 0;
        self.in_quote = false;
        self.escape = false;
        self.tail.clear();
        self.discarding = false;
    }

    /// The next frame, or `None` if more input is needed.
    pub fn next_frame(&mut self) -> Option<Frame> {
        if self.dead {
            return None;
        }
        let frame = self.scan();
        if self.discarding {
            // Nothing of an over-long command is kept.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        frame
    }

    fn scan(&mut self) -> Option<Frame> {
        while self.pos < self.buf.len() {
            if self.literal_left > 0 {
                let take = ((self.buf.len() - self.pos) as u64).min(self.literal_left);
                self.pos += take as usize;
                self.literal_left -= take;
                continue;
            }
            let b = self.buf[self.pos];
            self.pos += 1;
            if b == b'\n' {
                let literal = if self.in_quote {
                    None
                } else {
                    literal_at_end(&self.tail)
                };
                self.in_quote = false;
                self.escape = false;
                self.tail.clear();
                match literal {
                    Some((n, sync)) => {
                        let total = self.literal_total.saturating_add(n);
                        if n > self.limits.literal_max || total > self.limits.literal_total {
                            if sync {
                                // The octets are not read: what follows is the next command.
                                self.buf.drain(..self.pos);
                                self.reset_scan();
                            } else {
                                self.dead = true;
                                self.buf.clear();
                                self.pos = 0;
                            }
                            return Some(Frame::LiteralTooLarge { sync });
                        }
                        self.literal_total = total;
                        self.literal_left = n;
                    }
                    None => {
                        let end = self.pos;
                        if self.discarding {
                            self.buf.drain(..end);
                            self.reset_scan();
                            return Some(Frame::TooLong);
                        }
                        let frame = Zeroizing::new(self.buf.drain(..end).collect::<Vec<u8>>());
                        self.reset_scan();
                        return Some(Frame::Complete(frame));
                    }
                }
                continue;
            }
            self.line_len += 1;
            if self.in_quote {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_quote = false;
                }
            } else if b == b'"' {
                self.in_quote = true;
            }
            if self.tail.len() == TAIL {
                self.tail.remove(0);
            }
            self.tail.push(b);
            if !self.discarding && self.line_len > self.limits.line_max {
                self.discarding = true;
            }
        }
        None
    }
}

/// One token of a complete command or response.
#[derive(Debug, PartialEq, Eq)]
pub enum Token {
    /// A bare word: a command name, a number, a status (`OK`) or a response code.
    Atom(Vec<u8>),
    /// A quoted string or a literal, unescaped (wiped on drop).
    Str(Zeroizing<Vec<u8>>),
    /// `(` and `)` around a response code (only when asked for).
    Open,
    Close,
}

/// Why a frame is not well-formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syntax;

fn is_atom_char(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'"' | b'{' | b'}' | b'(' | b')' | b'\\')
}

/// Splits a complete frame (as [`Framer`] delivers it) into tokens. Strict: tokens separated by
/// spaces, quoted strings with only `\"` and `\\` escapes and no CR, LF or NUL, literals exactly
/// `{n}` or `{n+}` followed by a line ending, strings valid UTF-8, the frame ending in CRLF or LF.
///
/// # Errors
/// [`Syntax`] for anything else.
pub fn tokenize(frame: &[u8], parens: bool) -> Result<Vec<Token>, Syntax> {
    let mut tokens = Vec::new();
    let mut i = 0;
    // A token may start here without a space before it.
    let mut may_start = true;
    loop {
        let b = *frame.get(i).ok_or(Syntax)?;
        match b {
            b'\n' if i + 1 == frame.len() => return Ok(tokens),
            b'\r' if i + 2 == frame.len() && frame[i + 1] == b'\n' => return Ok(tokens),
            b' ' => {
                i += 1;
                may_start = true;
                continue;
            }
            b'(' if parens => {
                tokens.push(Token::Open);
                i += 1;
                may_start = true;
                continue;
            }
            b')' if parens => {
                tokens.push(Token::Close);
                i += 1;
                may_start = false;
                continue;
            }
            _ if !may_start => return Err(Syntax),
            b'"' => {
                let mut s = Zeroizing::new(Vec::new());
                i += 1;
                loop {
                    match *frame.get(i).ok_or(Syntax)? {
                        b'"' => break,
                        b'\\' => {
                            let e = *frame.get(i + 1).ok_or(Syntax)?;
                            if e != b'"' && e != b'\\' {
                                return Err(Syntax);
                            }
                            s.push(e);
                            i += 2;
                        }
                        b'\r' | b'\n' | 0 => return Err(Syntax),
                        c => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                i += 1;
                if std::str::from_utf8(&s).is_err() {
                    return Err(Syntax);
                }
                tokens.push(Token::Str(s));
            }
            b'{' => {
                let close = frame[i..].iter().position(|&c| c == b'}').ok_or(Syntax)? + i;
                let mut digits = &frame[i + 1..close];
                if let Some(d) = digits.strip_suffix(b"+") {
                    digits = d;
                }
                if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit)
                {
                    return Err(Syntax);
                }
                let n: usize = std::str::from_utf8(digits)
                    .map_err(|_| Syntax)?
                    .parse()
                    .map_err(|_| Syntax)?;
                i = close + 1;
                if frame.get(i) == Some(&b'\r') {
                    i += 1;
                }
                if frame.get(i) != Some(&b'\n') {
                    return Err(Syntax);
                }
                i += 1;
                let end = i.checked_add(n).ok_or(Syntax)?;
                let data = frame.get(i..end).ok_or(Syntax)?;
                if std::str::from_utf8(data).is_err() {
                    return Err(Syntax);
                }
                tokens.push(Token::Str(Zeroizing::new(data.to_vec())));
                i = end;
            }
            c if is_atom_char(c) => {
                let start = i;
                while frame.get(i).is_some_and(|&c| is_atom_char(c)) {
                    i += 1;
                }
                tokens.push(Token::Atom(frame[start..i].to_vec()));
            }
            _ => return Err(Syntax),
        }
        may_start = false;
    }
}

/// Longest string written quoted; longer ones (and ones with CR, LF or NUL) go as a literal.
const QUOTED_MAX: usize = 1024;

/// Appends `s` as a ManageSieve string: quoted when RFC 5804 allows it, otherwise a literal.
pub fn push_string(out: &mut Vec<u8>, s: &[u8]) {
    if s.len() <= QUOTED_MAX && !s.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')) {
        out.push(b'"');
        for &b in s {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
        out.extend_from_slice(s);
    }
}

/// A UTF-8 validator that takes one byte at a time, for data that is never held (RFC 3629's
/// table: no overlong forms, no surrogates, nothing above U+10FFFF).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Utf8 {
    need: u8,
    lo: u8,
    hi: u8,
}

impl Utf8 {
    /// Adds a byte; false if the sequence can no longer be valid.
    pub fn push(&mut self, b: u8) -> bool {
        if self.need > 0 {
            if b < self.lo || b > self.hi {
                return false;
            }
            self.need -= 1;
            self.lo = 0x80;
            self.hi = 0xBF;
            return true;
        }
        let (need, lo, hi) = match b {
            0x00..=0x7F => return true,
            0xC2..=0xDF => (1, 0x80, 0xBF),
            0xE0 => (2, 0xA0, 0xBF),
            0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
            0xED => (2, 0x80, 0x9F),
            0xF0 => (3, 0x90, 0xBF),
            0xF1..=0xF3 => (3, 0x80, 0xBF),
            0xF4 => (3, 0x80, 0x8F),
            _ => return false,
        };
        *self = Self { need, lo, hi };
        true
    }

    /// Whether the bytes so far end on a character boundary.
    pub fn complete(&self) -> bool {
        self.need == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const L: Limits = Limits {
        line_max: 64,
        literal_max: 32,
        literal_total: 48,
    };

    fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::new(L);
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c);
            while let Some(frame) = f.next_frame() {
                out.push(frame);
            }
        }
        out
    }

    fn complete(s: &[u8]) -> Frame {
        Frame::Complete(Zeroizing::new(s.to_vec()))
    }

    #[test]
    fn frames_lines_and_literals() {
        assert_eq!(
            frames(&[b"NOOP\r\nAUTHENTICATE \"PLAIN\" {4+}\r\na\nb\n\r\nX \"{3}\"\n"]),
            vec![
                complete(b"NOOP\r\n"),
                complete(b"AUTHENTICATE \"PLAIN\" {4+}\r\na\nb\n\r\n"),
                complete(b"X \"{3}\"\n"),
            ]
        );
        // A LF inside a quoted string ends the (broken) command; no literal is assumed.
        assert_eq!(
            frames(&[b"X \"a {2}\nNOOP\n"]),
            vec![complete(b"X \"a {2}\n"), complete(b"NOOP\n")]
        );
    }

    #[test]
    fn over_long_lines_are_discarded_to_their_end() {
        let mut input = vec![b'x'; 100];
        input.extend_from_slice(b" {3+}\r\nabc\r\nNOOP\r\n");
        assert_eq!(
            frames(&[&input]),
            vec![Frame::TooLong, complete(b"NOOP\r\n")]
        );
    }

    #[test]
    fn over_large_literals_stop_framing() {
        assert_eq!(
            frames(&[b"A {33+}\r\nNOOP\r\n"]),
            vec![Frame::LiteralTooLarge { sync: false }]
        );
        assert_eq!(
            frames(&[b"A {30}\r\n", &[b'a'; 30], b" {30}\r\nNOOP\r\n"]),
            vec![Frame::LiteralTooLarge { sync: true }, complete(b"NOOP\r\n")]
        );
        assert_eq!(
            frames(&[b"A {99999999999999999999}\r\n"]),
            vec![complete(b"A {99999999999999999999}\r\n")]
        );
    }

    #[test]
    fn tokens() {
        let t = tokenize(b"Authenticate \"PL\\\"AIN\" {3+}\r\nabc 12\r\n", false).unwrap();
        assert_eq!(
            t,
            vec![
                Token::Atom(b"Authenticate".to_vec()),
                Token::Str(Zeroizing::new(b"PL\"AIN".to_vec())),
                Token::Str(Zeroizing::new(b"abc".to_vec())),
                Token::Atom(b"12".to_vec()),
            ]
        );
        assert_eq!(
            tokenize(b"OK (TAG {2}\r\nab) \"x\"\r\n", true).unwrap(),
            vec![
                Token::Atom(b"OK".to_vec()),
                Token::Open,
                Token::Atom(b"TAG".to_vec()),
                Token::Str(Zeroizing::new(b"ab".to_vec())),
                Token::Close,
                Token::Str(Zeroizing::new(b"x".to_vec())),
            ]
        );
        for bad in [
            &b"A \"x\\n\"\r\n"[..],
            b"A \"x\"\"y\"\r\n",
            b"A \"x\0\"\r\n",
            b"A \"\xff\"\r\n",
            b"A {2}x\r\nab\r\n",
            b"A {5}\r\nab\r\n",
            b"A {-1}\r\n\r\n",
            b"A\rB\r\n",
            b"A (B)\r\n",
            b"A",
        ] {
            assert_eq!(tokenize(bad, false), Err(Syntax), "{bad:?}");
        }
    }

    #[test]
    fn strings_round_trip() {
        for s in [&b""[..], b"a\"b\\c", b"line\r\nbreak", &[b'x'; 2000]] {
            let mut out = b"X ".to_vec();
            push_string(&mut out, s);
            out.extend_from_slice(b"\r\n");
            let t = tokenize(&out, false).unwrap();
            assert_eq!(t[1], Token::Str(Zeroizing::new(s.to_vec())));
        }
    }

    proptest! {
        #[test]
        fn every_split_gives_the_same_frames(data in proptest::collection::vec(any::<u8>(), 0..400), cut in 0usize..400) {
            let cut = cut.min(data.len());
            prop_assert_eq!(frames(&[&data]), frames(&[&data[..cut], &data[cut..]]));
        }

        #[test]
        fn utf8_matches_std(data in proptest::collection::vec(any::<u8>(), 0..12)) {
            let mut v = Utf8::default();
            let ok = data.iter().all(|&b| v.push(b)) && v.complete();
            prop_assert_eq!(ok, std::str::from_utf8(&data).is_ok());
        }

        #[test]
        fn tokenize_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = tokenize(&data, true);
        }
    }
}
