//! Post-login framers. Invariants: no panic; the client framer's decisions do not depend on the
//! split (with the backend granting or refusing every literal and `IDLE`, as the first byte
//! says) and it forwards no more than it received; the response framer passes input without
//! capability lines through unchanged, and sending an open literal's bytes around it
//! (`literal_left`/`skip_literal`, as the zero-copy splice does) gives the client the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proto::imap::framer::{pair, CommandFramer, ResponseFramer};

fn client(chunks: &[&[u8]], grant: bool) -> (Vec<u8>, Vec<Vec<u8>>, bool) {
    let mut f = CommandFramer::new();
    let (mut fwd, mut replies, mut abort) = (Vec::new(), Vec::new(), false);
    for c in chunks {
        let mut o = f.push(c);
        loop {
            fwd.extend(o.forward);
            replies.extend(o.replies);
            abort |= o.abort;
            if abort {
                break;
            }
            if f.awaited_tag().is_some() {
                f.backend_answered(grant && f.expects_continuation());
                assert!(!f.waiting());
            } else if !f.holding() {
                break;
            }
            o = f.push(&[]);
        }
        if abort {
            break;
        }
    }
    (fwd, replies, abort)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let cut = (data[0] as usize).min(input.len());
    let grant = data[0] & 1 == 1;
    let whole = client(&[input], grant);
    let split = client(&[&input[..cut], &input[cut..]], grant);
    if !whole.2 && !split.2 {
        assert_eq!(whole, split);
    }
    assert!(whole.0.len() <= input.len());

    // A session's pair: client bytes, then backend bytes; whatever they are, nothing panics
    // and nothing follows a desync.
    let (mut up, mut down) = pair(portcullis::proto::imap::framer::DEFAULT_COMMAND_MAX);
    let _ = up.push(&input[..cut]);
    let mut out = Vec::new();
    down.push(&input[cut..], &mut out);
    if down.desync() {
        let mut more = Vec::new();
        down.push(b"* OK more\r\n", &mut more);
        assert!(more.is_empty());
        assert!(up.push(b"a NOOP\r\n").abort);
    } else {
        let _ = up.waiting();
        let _ = up.push(&[]);
    }

    let mut r = ResponseFramer::new();
    let mut out = Vec::new();
    r.push(&input[..cut], &mut out);
    r.push(&input[cut..], &mut out);
    let upper = input.to_ascii_uppercase();
    if !upper.windows(10).any(|w| w == b"CAPABILITY") {
        assert!(input.starts_with(&out));
    }

    // The same input with every literal byte past the first `cut % 7` of each run skipped.
    let keep = u64::from(data[0] % 7);
    let mut s = ResponseFramer::new();
    let mut got = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let left = s.literal_left();
        let n = if left > keep {
            let n = usize::try_from(left - keep).unwrap_or(usize::MAX).min(rest.len());
            got.extend_from_slice(&rest[..n]);
            s.skip_literal(n as u64);
            n
        } else {
            let n = rest.len().min(cut.max(1));
            s.push(&rest[..n], &mut got);
            n
        };
        rest = &rest[n..];
    }
    let mut whole_out = Vec::new();
    ResponseFramer::new().push(input, &mut whole_out);
    assert_eq!(got, whole_out);
});
