//! ManageSieve splice filters. Invariants: no panic; the client filter's output does not depend
//! on the split and is bounded; with nothing asked, backend bytes pass unchanged; with the
//! client's commands outstanding, the backend side stays bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proto::sieve::splice_filters;
use portcullis::splice::{Downstream, Upstream};

fn client(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
    let (mut up, _) = splice_filters();
    let (mut fwd, mut abort) = (Vec::new(), false);
    for c in chunks {
        let o = up.push(c);
        assert!(o.replies.is_empty());
        fwd.extend(o.forward);
        abort |= o.abort;
    }
    (fwd, abort)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let cut = (data[0] as usize).min(input.len());
    let whole = client(&[input]);
    assert_eq!(whole, client(&[&input[..cut], &input[cut..]]));
    assert!(whole.0.len() <= 3 * input.len());

    let (_, mut down) = splice_filters();
    let mut out = Vec::new();
    down.push(&input[..cut], &mut out);
    down.push(&input[cut..], &mut out);
    assert!(input.starts_with(&out));

    // The same bytes as commands, then as their answers.
    let (mut up, mut down) = splice_filters();
    let _ = up.push(input);
    let mut out = Vec::new();
    down.push(input, &mut out);
    assert!(out.len() <= 64 + 16 * input.len());
});
