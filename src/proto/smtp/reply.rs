//! Reading SMTP replies from the backend (RFC 5321 §4.2): `ddd-text` continuation lines, then
//! `ddd text`. Bounded in line length and line count, so a hostile or broken backend cannot make
//! the proxy buffer without end.

use crate::proto::line::{LineBuffer, TooLong};

/// Longest reply line accepted from the backend (RFC 5321 says 512; leave room).
pub const REPLY_LINE_MAX: usize = 2048;
/// Most lines in one multi-line reply (an EHLO reply has a few dozen at most).
pub const REPLY_LINES_MAX: usize = 128;

/// One complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of each line, after the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2yz.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// Why the backend's reply could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// Not `ddd[ -]`, a code that changed within one reply, or not UTF-8.
    Malformed,
    /// A line over [`REPLY_LINE_MAX`] or a reply over [`REPLY_LINES_MAX`] lines.
    TooLong,
}

/// Turns backend bytes into replies.
#[derive(Debug, Default)]
pub struct ReplyReader {
    lines: LineBuffer,
    code: Option<u16>,
    text: Vec<String>,
}

impl ReplyReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.lines.feed(bytes);
    }

    /// Whether unread bytes are waiting (a backend that talks after its STARTTLS reply).
    pub fn has_pending(&self) -> bool {
        self.lines.has_pending()
    }

    /// Bytes not yet consumed.
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.lines.take_rest()
    }

    /// The next complete reply, `None` if more input is needed.
    pub fn next_reply(&mut self) -> Option<Result<Reply, ReplyError>> {
        loop {
            let line = match self.lines.next_line(REPLY_LINE_MAX)? {
                Ok(line) => line,
                Err(TooLong) => return Some(Err(ReplyError::TooLong)),
            };
            let (code, last, text) = match split_line(&line) {
                Some(parts) => parts,
                None => return Some(Err(ReplyError::Malformed)),
            };
            if self.code.is_some_and(|c| c != code) {
                return Some(Err(ReplyError::Malformed));
            }
            if self.text.len() >= REPLY_LINES_MAX {
                return Some(Err(ReplyError::TooLong));
            }
            self.code = Some(code);
            self.text.push(text);
            if last {
                self.code = None;
                return Some(Ok(Reply {
                    code,
                    lines: std::mem::take(&mut self.text),
                }));
            }
        }
    }
}

/// `(code, is_last_line, text)` of one reply line.
fn split_line(line: &[u8]) -> Option<(u16, bool, String)> {
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let (last, rest) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return None,
    };
    let text = std::str::from_utf8(rest).ok()?;
    if text.chars().any(char::is_control) {
        return None;
    }
    Some((code, last, text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn replies(chunks: &[&[u8]]) -> Vec<Result<Reply, ReplyError>> {
        let mut r = ReplyReader::new();
        let mut out = Vec::new();
        for c in chunks {
            r.feed(c);
            while let Some(reply) = r.next_reply() {
                let stop = reply.is_err();
                out.push(reply);
                if stop {
                    return out;
                }
            }
        }
        out
    }

    #[test]
    fn multi_line_reply() {
        let got = replies(&[
            b"250-mx.example\r\n250-PIPE",
            b"LINING\r\n250 SIZE 100\r\n220 x\r\n",
        ]);
        assert_eq!(
            got,
            vec![
                Ok(Reply {
                    code: 250,
                    lines: vec!["mx.example".into(), "PIPELINING".into(), "SIZE 100".into()]
                }),
                Ok(Reply {
                    code: 220,
                    lines: vec!["x".into()]
                })
            ]
        );
        assert_eq!(
            replies(&[b"235\r\n"]),
            vec![Ok(Reply {
                code: 235,
                lines: vec![String::new()]
            })]
        );
    }

    #[test]
    fn malformed_replies() {
        assert_eq!(
            replies(&[b"250-a\r\n251 b\r\n"]),
            vec![Err(ReplyError::Malformed)]
        );
        assert_eq!(replies(&[b"25x ok\r\n"]), vec![Err(ReplyError::Malformed)]);
        assert_eq!(replies(&[b"250+ok\r\n"]), vec![Err(ReplyError::Malformed)]);
        assert_eq!(replies(&[b"650 ok\r\n"]), vec![Err(ReplyError::Malformed)]);
        assert_eq!(
            replies(&[b"250 a\x01b\r\n"]),
            vec![Err(ReplyError::Malformed)]
        );
        let long = [b"250 ".as_slice(), &[b'a'; REPLY_LINE_MAX + 10], b"\r\n"].concat();
        assert_eq!(replies(&[&long]), vec![Err(ReplyError::TooLong)]);
        let many = b"250-x\r\n".repeat(REPLY_LINES_MAX + 1);
        assert_eq!(replies(&[&many]), vec![Err(ReplyError::TooLong)]);
    }

    proptest! {
        #[test]
        fn split_independent(data in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..300) {
            let cut = cut.min(data.len());
            prop_assert_eq!(replies(&[&data]), replies(&[&data[..cut], &data[cut..]]));
        }
    }
}
