//! The Dynamics webhook parser on arbitrary bytes: it must answer Ok or Err, never panic,
//! overflow the stack or run away, with and without the size-exceeded header.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (size_exceeded, body) = match data.split_first() {
        Some((flag, rest)) => (flag & 1 == 1, rest),
        None => (false, data),
    };
    if let Ok(n) = oppsync::dynamics::decode_notification(body, size_exceeded) {
        // A decoded notification always has a dedupe key, and decoding is deterministic.
        assert!(!n.dedupe_key.is_empty());
        let again = oppsync::dynamics::decode_notification(body, size_exceeded);
        assert!(again.is_ok_and(|m| m.dedupe_key == n.dedupe_key));
    }
    // Also as Dynamics sends it: the whole input as the body.
    let _ = oppsync::dynamics::decode_notification(data, false);
});
