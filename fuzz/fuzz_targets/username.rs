//! The username validator and the log escaper. Invariants: an accepted name has no control
//! byte, separator, space, quote or backslash; an escaped log name has no line break.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::identity::{IdentityRules, LogName};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = IdentityRules::default().validate(data) {
        assert!(!s
            .bytes()
            .any(|b| b < 0x20 || b == 0x7f || b"%* \"\\".contains(&b)));
    }
    let shown = LogName(data).to_string();
    assert!(!shown.contains('\n') && !shown.contains('\r'));
});
