//! The end of a dot-terminated body (`CRLF . CRLF`: a POP3 multi-line answer, an SMTP `DATA`
//! body) found across reads without splitting the bytes into lines, as a real client or MTA
//! streaming a large message would.

use memchr::memmem;

const END: &[u8] = b"\r\n.\r\n";

/// The last bytes seen, for a terminator split between two reads.
pub struct DotEnd {
    carry: Vec<u8>,
}

impl DotEnd {
    /// A body that starts right after a line's CRLF, which counts towards the terminator (an
    /// empty body is just `.` CRLF).
    pub fn new() -> DotEnd {
        DotEnd {
            carry: b"\r\n".to_vec(),
        }
    }

    /// How many bytes of `buf` belong to the body up to and including the terminator, if it
    /// ends in `buf`; otherwise all of `buf` is body and `None` is returned.
    pub fn scan(&mut self, buf: &[u8]) -> Option<usize> {
        let mut joint = self.carry.clone();
        joint.extend_from_slice(&buf[..buf.len().min(END.len() - 1)]);
        let end = match memmem::find(&joint, END) {
            Some(i) => Some(i + END.len() - self.carry.len()),
            None => memmem::find(buf, END).map(|i| i + END.len()),
        };
        let take = end.unwrap_or(buf.len());
        self.carry
            .extend_from_slice(&buf[take.saturating_sub(END.len() - 1)..take]);
        let keep = self.carry.len().saturating_sub(END.len() - 1);
        self.carry.drain(..keep);
        end
    }
}

#[cfg(test)]
mod tests {
    use super::DotEnd;

    /// Feeds `body` in pieces of `step` bytes; returns where the terminator ended.
    fn end_in_pieces(body: &[u8], step: usize) -> Option<usize> {
        let mut d = DotEnd::new();
        let mut at = 0;
        for piece in body.chunks(step) {
            if let Some(n) = d.scan(piece) {
                return Some(at + n);
            }
            at += piece.len();
        }
        None
    }

    #[test]
    fn finds_the_terminator_wherever_the_reads_split_it() {
        let body = b"line one\r\n..stuffed\r\nlast\r\n.\r\nNEXT";
        for step in 1..body.len() {
            assert_eq!(
                end_in_pieces(body, step),
                Some(body.len() - 4),
                "step {step}"
            );
        }
    }

    #[test]
    fn an_empty_body_ends_at_its_first_line() {
        assert_eq!(end_in_pieces(b".\r\nMAIL", 1), Some(3));
        assert_eq!(end_in_pieces(b".\r\nMAIL", 100), Some(3));
    }

    #[test]
    fn a_dot_stuffed_line_is_not_the_end() {
        assert_eq!(end_in_pieces(b"a\r\n..\r\nb\r\n", 2), None);
    }
}
