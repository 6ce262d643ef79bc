//! A bounded CRLF (or bare LF) line buffer for the line protocols (POP3, and later SMTP and
//! ManageSieve). An over-long line is discarded up to its end and reported once, in order, so
//! the protocol can answer it correctly; memory never exceeds the bound plus one read.

use zeroize::Zeroizing;

/// A line was longer than allowed (already discarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

/// Lines in, bounded.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    discarding: bool,
}

impl LineBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line without its line ending (wiped on drop: it may hold a password),
    /// `Some(Err(TooLong))` for a line over `max` bytes, `None` if more input is needed.
    pub fn next_line(&mut self, max: usize) -> Option<Result<Zeroizing<Vec<u8>>, TooLong>> {
        let nl = memchr::memchr(b'\n', &self.buf);
        if self.discarding {
            return match nl {
                Some(i) => {
                    self.buf.drain(..=i);
                    self.discarding = false;
                    Some(Err(TooLong))
                }
                None => {
                    self.buf.clear();
                    None
                }
            };
        }
        match nl {
            Some(i) if i > max => {
                self.buf.drain(..=i);
                Some(Err(TooLong))
            }
            Some(i) => {
                let mut line = Zeroizing::new(self.buf.drain(..=i).collect::<Vec<u8>>());
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some(Ok(line))
            }
            None if self.buf.len() > max => {
                self.buf.clear();
                self.discarding = true;
                None
            }
            None => None,
        }
    }

    /// Whether bytes are waiting (a partial or complete line).
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty() || self.discarding
    }

    /// Everything not yet consumed, for the hand-off to the backend after login.
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines(chunks: &[&[u8]], max: usize) -> Vec<Result<Vec<u8>, TooLong>> {
        let mut b = LineBuffer::new();
        let mut out = Vec::new();
        for c in chunks {
            b.feed(c);
            while let Some(l) = b.next_line(max) {
                out.push(l.map(|l| l.to_vec()));
            }
        }
        out
    }

    #[test]
    fn splits_and_bounds() {
        assert_eq!(
            lines(&[b"USER a\r\nPASS b\nQU", b"IT\r\n"], 10),
            vec![
                Ok(b"USER a".to_vec()),
                Ok(b"PASS b".to_vec()),
                Ok(b"QUIT".to_vec())
            ]
        );
        assert_eq!(
            lines(&[b"0123456789ABC", b"DEF\r\nNOOP\r\n"], 10),
            vec![Err(TooLong), Ok(b"NOOP".to_vec())]
        );
    }

    proptest! {
        #[test]
        fn every_split_gives_the_same_lines(data in proptest::collection::vec(any::<u8>(), 0..400), cut in 0usize..400) {
            let cut = cut.min(data.len());
            prop_assert_eq!(lines(&[&data], 32), lines(&[&data[..cut], &data[cut..]], 32));
        }
    }
}
