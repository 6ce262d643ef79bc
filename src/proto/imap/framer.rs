//! Post-login framers for the splice. They track only where commands and responses begin and
//! end (lines and literals), never their meaning, with two exceptions that keep the chokepoint
//! closed: a client `UNAUTHENTICATE` is refused locally (it would hand the client the backend's
//! own login), and `UNAUTHENTICATE` is removed from the backend's capability lists.
//!
//! Both are pure: bytes in, bytes to forward out. Buffers are bounded: a command is held only
//! until its name is known, a response line only up to [`MAX_HELD_LINE`].

use memchr::memchr;

/// Longest `tag SP command-name` prefix held before deciding (longer is a protocol abuse).
pub const MAX_COMMAND_HEAD: usize = 1024;
/// Longest response line held for capability rewriting; longer lines stream through untouched.
pub const MAX_HELD_LINE: usize = 16 * 1024;

/// Literal announcement at the end of a line (`{N}` or `{N+}` / `{N-}` before CRLF): its
/// length and whether it is synchronizing (the sender waits for `+` before sending it).
fn literal_at_end(line: &[u8]) -> Option<(u64, bool)> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
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

/// Where the client→backend stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    /// At the start of a new command: hold bytes until the command name is known.
    CommandStart,
    /// Inside a command line being forwarded.
    Line,
    /// Inside a literal being forwarded.
    Literal(u64),
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
    head: Vec<u8>,
    /// Tail of the current line, to spot a literal announcement at its end.
    tail: Vec<u8>,
    refused_tag: Vec<u8>,
}

impl Default for CommandFramer {
    fn default() -> Self {
        Self::new()
    }
}

const TAIL: usize = 32;

impl CommandFramer {
    pub fn new() -> Self {
        Self {
            state: ClientState::CommandStart,
            head: Vec::new(),
            tail: Vec::with_capacity(TAIL),
            refused_tag: Vec::new(),
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

    /// After a line ended: the state for what follows it.
    fn after_line(&mut self, discarding: bool) -> ClientState {
        let lit = literal_at_end(&self.tail);
        self.tail.clear();
        match (lit, discarding) {
            (Some((n, _)), false) => ClientState::Literal(n),
            // Nobody answers "+" to a refused command, so the client never sends a
            // synchronizing literal: what follows is its next command.
            (Some((_, true)), true) => ClientState::CommandStart,
            (Some((n, false)), true) => ClientState::DiscardLiteral(n),
            (None, _) => ClientState::CommandStart,
        }
    }

    /// Decides on a held command head. `None`: not enough bytes yet.
    fn decide(head: &[u8]) -> Option<bool> {
        let sp = memchr(b' ', head);
        let Some(sp) = sp else {
            // No space yet: a line without one (`DONE`) ends the decision at its end.
            return memchr(b'\n', head).map(|_| false);
        };
        let rest = &head[sp + 1..];
        let end = rest
            .iter()
            .position(|&b| b == b' ' || b == b'\r' || b == b'\n');
        let end = end?;
        Some(rest[..end].eq_ignore_ascii_case(b"UNAUTHENTICATE"))
    }

    /// Processes a chunk from the client.
    pub fn push(&mut self, mut input: &[u8]) -> ClientOutput {
        let mut out = ClientOutput::default();
        while !input.is_empty() {
            match self.state {
                ClientState::CommandStart => {
                    let room = MAX_COMMAND_HEAD + 1 - self.head.len();
                    let take = input.len().min(room);
                    let nl = memchr(b'\n', &input[..take]);
                    let take = nl.map_or(take, |i| i + 1);
                    self.head.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    match Self::decide(&self.head) {
                        None if self.head.len() > MAX_COMMAND_HEAD => {
                            out.abort = true;
                            return out;
                        }
                        None => {}
                        Some(refuse) => {
                            let head = std::mem::take(&mut self.head);
                            let line_done = head.ends_with(b"\n");
                            if refuse {
                                let tag_end = memchr(b' ', &head).unwrap_or(0);
                                self.refused_tag = head[..tag_end].to_vec();
                                self.remember_tail(&head);
                                self.state = if line_done {
                                    self.after_line(true)
                                } else {
                                    ClientState::DiscardLine
                                };
                            } else {
                                out.forward.extend_from_slice(&head);
                                self.remember_tail(&head);
                                self.state = if line_done {
                                    self.after_line(false)
                                } else {
                                    ClientState::Line
                                };
                            }
                            self.finish_refusal_if_done(&mut out);
                        }
                    }
                }
                ClientState::Line | ClientState::DiscardLine => {
                    let discarding = self.state == ClientState::DiscardLine;
                    let (chunk, ended) = match memchr(b'\n', input) {
                        Some(i) => (&input[..=i], true),
                        None => (input, false),
                    };
                    if !discarding {
                        out.forward.extend_from_slice(chunk);
                    }
                    self.remember_tail(chunk);
                    input = &input[chunk.len()..];
                    if ended {
                        self.state = self.after_line(discarding);
                        self.finish_refusal_if_done(&mut out);
                    }
                }
                ClientState::Literal(n) | ClientState::DiscardLiteral(n) => {
                    let discarding = matches!(self.state, ClientState::DiscardLiteral(_));
                    let take = (input.len() as u64).min(n) as usize;
                    if !discarding {
                        out.forward.extend_from_slice(&input[..take]);
                    }
                    input = &input[take..];
                    let left = n - take as u64;
                    self.state = match (left, discarding) {
                        (0, false) => ClientState::Line,
                        (0, true) => ClientState::DiscardLine,
                        (l, false) => ClientState::Literal(l),
                        (l, true) => ClientState::DiscardLiteral(l),
                    };
                }
            }
        }
        out
    }

    fn finish_refusal_if_done(&mut self, out: &mut ClientOutput) {
        if self.refused_tag.is_empty() {
            return;
        }
        // A refused command is answered once it has ended.
        if self.state == ClientState::CommandStart {
            let mut reply = std::mem::take(&mut self.refused_tag);
            reply.extend_from_slice(b" NO [CANNOT] UNAUTHENTICATE is not available\r\n");
            out.replies.push(reply);
        }
    }

    /// True when no command is partly forwarded (a safe point to stop).
    pub fn at_boundary(&self) -> bool {
        self.state == ClientState::CommandStart && self.head.is_empty()
    }

    /// Bytes of an open literal that `push` would forward unchanged (an `APPEND` body), so
    /// they may also reach the backend without it (see [`Self::skip_literal`]). The literal
    /// of a refused command is discarded, never forwarded, so it does not count.
    pub fn literal_left(&self) -> u64 {
        match self.state {
            ClientState::Literal(n) => n,
            _ => 0,
        }
    }

    /// Accounts for `n` literal bytes that went to the backend without `push`: the same state
    /// as pushing them (bytes beyond the open literal are not literal and are ignored).
    pub fn skip_literal(&mut self, n: u64) {
        if let ClientState::Literal(left) = self.state {
            let left = left.saturating_sub(n);
            self.state = if left == 0 {
                ClientState::Line
            } else {
                ClientState::Literal(left)
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
}

impl Default for ResponseFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseFramer {
    pub fn new() -> Self {
        Self {
            state: ServerState::LineStart,
            held: Vec::new(),
            tail: Vec::with_capacity(TAIL),
        }
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
        while !input.is_empty() {
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
                            strip_unauthenticate(&line, out);
                            self.held = line;
                            self.held.clear();
                            if let Some((n, _)) = lit {
                                self.state = ServerState::Literal(n);
                            }
                        }
                        None if input.len() >= room => {
                            // Too long to hold: stream it untouched.
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

    fn run_client(chunks: &[&[u8]]) -> ClientOutput {
        let mut f = CommandFramer::new();
        let mut all = ClientOutput::default();
        for c in chunks {
            let o = f.push(c);
            all.forward.extend(o.forward);
            all.replies.extend(o.replies);
            all.abort |= o.abort;
        }
        all
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
            b"a LOGIN {3}\r\nabc x\r\nb UNAUTHENTICATE\r\nDONE\r\nc APPEND x {4+}\r\nb UN\r\n";
        let whole = run_client(&[input]);
        for cut in 0..input.len() {
            let o = run_client(&[&input[..cut], &input[cut..]]);
            assert_eq!(o, whole, "cut at {cut}");
        }
        assert_eq!(whole.replies.len(), 1);
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
    fn huge_tag_aborts() {
        let o = run_client(&[&vec![b'a'; 5000]]);
        assert!(o.abort);
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
                let o = pushed.push(c);
                expected.forward.extend_from_slice(&o.forward);
                expected.replies.extend(o.replies);
                expected.abort |= o.abort;
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
                    let o = skipping.push(&rest[..n]);
                    got.forward.extend_from_slice(&o.forward);
                    got.replies.extend(o.replies);
                    got.abort |= o.abort;
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
        assert_eq!(f.literal_left(), 100_000);
        f.skip_literal(99_999);
        assert_eq!(f.literal_left(), 1);
        assert_eq!(f.push(b"x\r\nc NOOP\r\n").forward, b"x\r\nc NOOP\r\n");
        assert!(f.at_boundary());
    }
}
