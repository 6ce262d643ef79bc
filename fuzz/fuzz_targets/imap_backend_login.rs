//! The backend master login fed arbitrary backend bytes (a hostile or broken backend).
//! Invariants: no panic; the result does not depend on the split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proto::imap::{BackendEvent, BackendLogin};
use portcullis::secret::Secret;

fn run(chunks: &[&[u8]]) -> Option<BackendEvent> {
    let mut l = BackendLogin::new("alice@example.org", "proxy", "%", &Secret::from("s"), false);
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
    let whole = run(&[input]);
    let split = run(&[&input[..cut], &input[cut..]]);
    if whole.is_some() && split.is_some() {
        assert_eq!(whole, split);
    }
});
