//! The backend master login fed arbitrary backend bytes (a hostile or broken backend).
//! Invariants: no panic; the result does not depend on the split; a shared memo of earlier
//! greetings and replies (see `BackendMemo`) never changes a result.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use portcullis::proto::imap::{BackendEvent, BackendLogin, BackendMemo};
use portcullis::secret::Secret;

fn run(chunks: &[&[u8]], memo: Option<&Arc<BackendMemo>>) -> Option<BackendEvent> {
    let mut l = BackendLogin::new("alice@example.org", "proxy", "%", &Secret::from("s"), false);
    if let Some(memo) = memo {
        l = l.with_memo(memo.clone());
    }
    for c in chunks {
        l.feed(c);
        match l.advance() {
            BackendEvent::NeedInput => {}
            BackendEvent::StartTls => l.tls_started(),
            ev => return Some(ev),
        }
        let _ = l.take_output();
    }
    None
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let cut = (data[0] as usize).min(input.len());
    let whole = run(&[input], None);
    let split = run(&[&input[..cut], &input[cut..]], None);
    if whole.is_some() && split.is_some() {
        assert_eq!(whole, split);
    }
    // The same bytes through a memo, twice: the first run fills it, the second may use it.
    let memo = Arc::new(BackendMemo::default());
    let first = run(&[input], Some(&memo));
    let second = run(&[input], Some(&memo));
    assert_eq!(first, whole);
    assert_eq!(second, whole);
});
