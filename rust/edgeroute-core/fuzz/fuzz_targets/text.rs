//! The text scanners on arbitrary text: pretokenizer pieces cover the text exactly,
//! PII redaction and the JSON text scan return; never a panic.
#![no_main]

use edgeroute_core::{json_text, pii, pretokenize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    assert_eq!(pretokenize::o200k_base(&text).map(str::len).sum::<usize>(), text.len());
    assert_eq!(pretokenize::cl100k_base(&text).map(str::len).sum::<usize>(), text.len());
    let _ = pii::redact(&text);
    let mut out = String::new();
    json_text::collect(&text, &mut out);
});
