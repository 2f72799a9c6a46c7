//! Every piece of text in a JSON request body, as a provider will see it.
//!
//! Rules that keep data from leaving (PII, residency) must not depend on which
//! fields the router happens to read: a card number in an assistant's
//! `tool_calls[].function.arguments`, a tool's description, a JSON schema, a
//! legacy `function_call` or any field a future endpoint adds reaches the
//! provider all the same. So this visits every string of the document — values
//! and object keys, at any depth — whatever its shape (chat completions,
//! embeddings' `input`, responses' `input`/`instructions`, ...).
//!
//! Strings that hold JSON themselves (tool-call arguments) are visited again,
//! decoded, when they contain escapes, so that `"a\\n4111 1111 1111 1111"` inside
//! them reads as a newline and a card, not as `n4111...`. Binary payloads are
//! skipped: base64 data URLs (`image_url.url`, ...) and long base64 values of
//! `data`/`file_data` keys (`input_audio`, `file` parts), which the provider
//! decodes rather than reads. (A text file sent as base64 is not decoded here.)
//!
//! The document must be valid JSON (callers have parsed it). It is not parsed
//! again: strings are found with a search for quotes and backslashes (a word at
//! a time over short gaps, SIMD over long ones), which keeps the scan of a 10 kB
//! chat to a fraction of a microsecond; each string is decoded as its closing
//! quote is searched for, in one pass.

use memchr::{memchr, memchr2};

/// How deep JSON held inside strings is unpacked (arguments inside arguments ...).
const MAX_NESTED: u8 = 3;
/// Base64 strings at least this long are taken for binary payloads.
const MIN_BLOB: usize = 256;

/// Appends each string (decoded) of the JSON document `json` to `out`, each
/// followed by a newline.
pub fn collect(json: &str, out: &mut String) {
    collect_nested(json, out, 0);
}

fn collect_nested(json: &str, out: &mut String, depth: u8) {
    let bytes = json.as_bytes();
    let mut blob_key = false;
    let mut at = 0;
    while let Some(open) = find_quote(bytes.get(at..).unwrap_or_default()) {
        let start = at + open + 1;
        let from = out.len();
        // A string that may be a binary payload (megabytes, then) is found before it is
        // copied; any other is decoded as its closing quote is searched for, in one pass.
        let maybe_blob = blob_key || bytes[start..].starts_with(b"data:");
        let (end, mut nested) = if maybe_blob {
            (closing_quote(bytes, start), false)
        } else {
            decode(json, start, out)
        };
        // Unterminated: not valid JSON; nothing more to read.
        let Some(end) = end else {
            out.truncate(from);
            return;
        };
        at = end + 1;
        let raw = &json[start..end];
        let is_key = bytes[at..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':');
        let skip = !is_key && (is_data_url(raw) || (blob_key && is_base64_blob(raw)));
        blob_key = is_key && matches!(raw, "data" | "file_data");
        if skip {
            out.truncate(from);
            continue;
        }
        if maybe_blob {
            nested = decode(json, start, out).1;
        }
        // JSON inside a string (tool-call arguments): its own escapes hide what they encode.
        if nested && depth < MAX_NESTED && looks_like_json(&out[from..]) {
            let inner = out[from..].to_owned();
            out.push('\n');
            collect_nested(&inner, out, depth + 1);
        } else {
            out.push('\n');
        }
    }
}

// Most gaps between strings (`": "`, `", "`) and most keys are shorter than a
// word, and each memchr call has a fixed cost of some fifty instructions: the
// first eight bytes are searched as one `u64` (SWAR) before memchr is called.
const ONES: u64 = u64::from_le_bytes([1; 8]);

/// A bit set at the top of each zero byte of `v` (and maybe of bytes after the
/// first zero one, which a borrow reaches: only the lowest set bit is exact).
#[inline]
fn zero_bytes(v: u64) -> u64 {
    v.wrapping_sub(ONES) & !v & (ONES << 7)
}

/// The first `"` in `bytes`, as `memchr(b'"', bytes)`.
#[inline]
pub(crate) fn find_quote(bytes: &[u8]) -> Option<usize> {
    let Some(word) = bytes.first_chunk::<8>() else {
        return bytes.iter().position(|&b| b == b'"');
    };
    let found = zero_bytes(u64::from_le_bytes(*word) ^ (ONES * u64::from(b'"')));
    if found != 0 {
        return Some(found.trailing_zeros() as usize / 8);
    }
    memchr(b'"', &bytes[8..]).map(|i| i + 8)
}

/// The first `"` or `\\` in `bytes`, as `memchr2(b'"', b'\\', bytes)`.
#[inline]
fn find_quote_or_backslash(bytes: &[u8]) -> Option<usize> {
    let Some(word) = bytes.first_chunk::<8>() else {
        return bytes.iter().position(|&b| b == b'"' || b == b'\\');
    };
    let word = u64::from_le_bytes(*word);
    let found = zero_bytes(word ^ (ONES * u64::from(b'"'))) | zero_bytes(word ^ (ONES * u64::from(b'\\')));
    if found != 0 {
        return Some(found.trailing_zeros() as usize / 8);
    }
    memchr2(b'"', b'\\', &bytes[8..]).map(|i| i + 8)
}

/// Where the JSON string whose body starts at `start` ends: its first quote not
/// escaped (None: unterminated).
fn closing_quote(bytes: &[u8], start: usize) -> Option<usize> {
    let mut at = start;
    loop {
        let i = at + find_quote_or_backslash(bytes.get(at..).unwrap_or_default())?;
        if bytes[i] == b'"' {
            return Some(i);
        }
        at = i + 2;
    }
}

/// Calls `f` with each string (decoded) of the JSON document `json`, as
/// [`collect`] joins them.
pub fn walk(json: &str, f: &mut dyn FnMut(&str)) {
    let mut out = String::new();
    collect(json, &mut out);
    out.lines().for_each(f);
}

/// The decoded text of a JSON string body without its quotes; see [`decode`].
#[cfg(test)]
fn unescape(raw: &str, out: &mut String) -> bool {
    decode(raw, 0, out).1
}

/// Appends the decoded text of the JSON string whose body starts at `start` in
/// `s`, up to its closing quote (the first one not escaped) or the end of `s`;
/// returns where that quote is, and whether the string holds a backslash
/// (escapes of its own, if it is JSON). An invalid escape is kept as written.
fn decode(s: &str, start: usize, out: &mut String) -> (Option<usize>, bool) {
    let mut backslash = false;
    let bytes = s.as_bytes();
    let mut at = start;
    while let Some(i) = find_quote_or_backslash(&bytes[at..]) {
        out.push_str(&s[at..at + i]);
        let e = at + i;
        if bytes[e] == b'"' {
            return (Some(e), backslash);
        }
        let simple = match bytes.get(e + 1) {
            Some(b'n') => Some('\n'),
            Some(b't') => Some('\t'),
            Some(b'r') => Some('\r'),
            Some(b'b') => Some('\u{8}'),
            Some(b'f') => Some('\u{c}'),
            Some(&c @ (b'"' | b'\\' | b'/')) => {
                backslash |= c == b'\\';
                Some(char::from(c))
            }
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            at = e + 2;
            continue;
        }
        let unit = |from: usize| s.get(from..from + 4).and_then(|h| u16::from_str_radix(h, 16).ok());
        match (bytes.get(e + 1), unit(e + 2)) {
            (Some(b'u'), Some(hi)) => {
                // A surrogate pair is two escapes; a lone surrogate reads as U+FFFD.
                let lo = (s.get(e + 6..e + 8) == Some("\\u")).then(|| unit(e + 8)).flatten();
                let pair = lo.filter(|lo| (0xD800..0xDC00).contains(&hi) && (0xDC00..0xE000).contains(lo));
                let units: &[u16] = match &pair {
                    Some(lo) => &[hi, *lo],
                    None => &[hi],
                };
                out.extend(char::decode_utf16(units.iter().copied()).map(|c| c.unwrap_or('\u{FFFD}')));
                at = e + if pair.is_some() { 12 } else { 6 };
            }
            _ => {
                out.push('\\');
                backslash = true;
                at = e + 1;
            }
        }
    }
    out.push_str(&s[at..]);
    (None, backslash)
}

fn looks_like_json(s: &str) -> bool {
    matches!(s.trim_start().as_bytes().first(), Some(b'{' | b'['))
}

/// A base64 data URL: an encoded image, audio clip or file, its payload (all after
/// `;base64,`) base64 alone. Its head alone is not one: prose after a `data:...;base64,`
/// prefix was skipped whole, the card number and address in it unread by the PII rules.
fn is_data_url(s: &str) -> bool {
    if !s.starts_with("data:") || s.len() < MIN_BLOB {
        return false;
    }
    let head = s.get(..256).unwrap_or(s);
    let Some(at) = head.find(";base64,") else {
        return false;
    };
    // The JSON as sent: `\/` is an escaped `/`; any other escape (`\u0020`) is no base64's.
    let payload = &s.as_bytes()[at + 8..];
    let escaped_slash = |i: usize| payload.get(i + 1) == Some(&b'/');
    payload
        .iter()
        .enumerate()
        .all(|(i, &b)| base64_byte(b) || (b == b'\\' && escaped_slash(i)))
}

/// A long base64 string.
fn is_base64_blob(s: &str) -> bool {
    s.len() >= MIN_BLOB && s.bytes().all(base64_byte)
}

/// A character of base64, standard or URL-safe (a `\/` escape's backslash is the JSON's).
fn base64_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(json: &str) -> Vec<String> {
        let mut out = Vec::new();
        walk(json, &mut |s| out.push(s.to_owned()));
        out
    }

    #[test]
    fn every_key_and_string_value_at_any_depth() {
        let got = texts(r#"{"a":[1,"x",{"b\u00e9":null,"c":["y",true]}],"d":2.5, "e" : "\"q\\"}"#);
        assert_eq!(got, ["a", "x", "bé", "c", "y", "d", "e", "\"q\\"]);
    }

    #[test]
    fn escapes_decode_like_serde_json() {
        for s in [
            r#""plain""#,
            r#""a\nb\tc\rd\be\ff\/g\"h\\i""#,
            r#""\u0040 \u00e9 \ud83d\ude80 \u6771""#,
            r#""\\u0040""#,
            r#""""#,
        ] {
            let want: String = serde_json::from_str(s).unwrap();
            let mut got = String::new();
            unescape(&s[1..s.len() - 1], &mut got);
            assert_eq!(got, want, "{s}");
        }
        let mut got = String::new();
        assert!(unescape(r"lone \ud83d x \q", &mut got));
        assert_eq!(got, "lone \u{FFFD} x \\q");
    }

    #[test]
    fn what_may_be_a_payload_but_is_not_one_is_read_decoded() {
        // After a `data` key, and starting `data:`, a string is found before it is copied;
        // one that is no payload after all (short, or not base64) is read as any other.
        let json = r#"{"data":"x\n4111 1111 1111 1111","url":"data:a\tb","file_data":"{\"k\":\"v\\nw\"}"}"#;
        let got = texts(json);
        assert_eq!(got[..4], ["data", "x", "4111 1111 1111 1111", "url"]);
        assert_eq!(got[4], "data:a\tb");
        assert_eq!(got[5..], ["file_data", "{\"k\":\"v\\nw\"}", "k", "v", "w"]);
        let blob = "QUJD".repeat(100);
        assert_eq!(
            texts(&format!(r#"{{"data":"{blob}","u":"data:image/png;base64,{blob}"}}"#)),
            ["data", "u"]
        );
    }

    #[test]
    fn json_inside_strings_is_unpacked_when_escaped() {
        let got = texts(r#"{"arguments":"{\"note\":\"hi\\nthere\"}"}"#);
        assert_eq!(got, ["arguments", "{\"note\":\"hi\\nthere\"}", "note", "hi", "there"]);
        // Without escapes inside, the string already reads as the provider's model will read it.
        assert_eq!(texts(r#"["{\"a\":\"b\"}"]"#), ["{\"a\":\"b\"}"]);
    }

    #[test]
    fn binary_payloads_are_skipped() {
        let blob = "QUJD".repeat(100);
        let json = format!(
            r#"[{{"url":"data:image/png;base64,{blob}"}}, {{"data":"{blob}"}}, {{"file_data" : "{blob}"}}, "short"]"#
        );
        assert_eq!(texts(&json), ["url", "data", "file_data", "short"]);
        // The same characters anywhere else, or prose under those keys, are text.
        assert_eq!(texts(&format!(r#"["{blob}"]"#)).len(), 1);
        assert_eq!(texts(&format!(r#"{{"data":"{}"}}"#, "word ".repeat(100))).len(), 2);
        // A data URL's head before prose is no payload (red team, session 35): the prose is
        // read, spaces written as escapes too; a payload's escaped `\/` is still a payload's.
        let prose = format!(
            "data:text/plain;base64,SGk= my card is 4111 1111 1111 1111 {}",
            "ok ".repeat(90)
        );
        assert_eq!(texts(&format!(r#"["{prose}"]"#)), [prose.as_str()]);
        let escaped = format!(
            r#"data:text/plain;base64,SGk=\u0020card\u00204111111111111111{}"#,
            "A".repeat(300)
        );
        assert_eq!(texts(&format!(r#"["{escaped}"]"#)).len(), 1);
        let slashes = format!(r#"data:image/png;base64,{}"#, r"QU\/D".repeat(100));
        assert!(texts(&format!(r#"["{slashes}"]"#)).is_empty());
    }

    #[test]
    fn survives_bad_json() {
        for bad in [r#"{"a":"#, r#"{"a\"#, r#"""#, "", r#""\u12"#, r#"["\"]"#] {
            texts(bad);
        }
    }

    proptest::proptest! {
        /// On any JSON document, the text collected is serde_json's strings (keys and
        /// values, in document order, decoded the same way) joined by newlines.
        #[test]
        fn collects_what_serde_json_parses(v in json_value()) {
            fn strings(v: &serde_json::Value, out: &mut String) {
                match v {
                    serde_json::Value::String(s) => { out.push_str(s); out.push('\n'); }
                    serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
                    serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| {
                        out.push_str(k);
                        out.push('\n');
                        strings(x, out);
                    }),
                    _ => {}
                }
            }
            let mut want = String::new();
            strings(&v, &mut want);
            let json = v.to_string();
            // Nested JSON is unpacked only below the top level: compare the top level alone.
            let mut got = String::new();
            collect_nested(&json, &mut got, MAX_NESTED);
            proptest::prop_assert_eq!(got, want, "{}", json);
        }
    }

    proptest::proptest! {
        /// The word-at-a-time searches find what a plain search finds.
        #[test]
        fn searches_find_the_first_match(bytes in proptest::collection::vec(
            proptest::prop_oneof![proptest::strategy::Just(b'"'), proptest::strategy::Just(b'\\'), proptest::prelude::any::<u8>()],
            0..40,
        ), from in 0usize..40) {
            let bytes = bytes.get(from..).unwrap_or_default();
            proptest::prop_assert_eq!(find_quote(bytes), bytes.iter().position(|&b| b == b'"'));
            proptest::prop_assert_eq!(
                find_quote_or_backslash(bytes),
                bytes.iter().position(|&b| b == b'"' || b == b'\\')
            );
        }
    }

    proptest::proptest! {
        /// On any text, valid JSON or not (stray or invalid escapes, unterminated
        /// strings), decoding while searching for the closing quote reads what finding
        /// that quote first and decoding the string after did.
        #[test]
        fn one_pass_decodes_as_two(text in "[a-z\"\\\\nu0-9dD:{ ]{0,40}") {
            fn two_passes(json: &str, out: &mut String) {
                let bytes = json.as_bytes();
                let mut at = 0;
                while let Some(open) = memchr(b'"', bytes.get(at..).unwrap_or_default()) {
                    let start = at + open + 1;
                    let mut end = start;
                    loop {
                        match memchr2(b'"', b'\\', bytes.get(end..).unwrap_or_default()) {
                            Some(i) if bytes[end + i] == b'\\' => end += i + 2,
                            Some(i) => {
                                end += i;
                                break;
                            }
                            None => return,
                        }
                    }
                    at = end + 1;
                    unescape(&json[start..end], out);
                    out.push('\n');
                }
            }
            let mut want = String::new();
            two_passes(&text, &mut want);
            let mut got = String::new();
            collect_nested(&text, &mut got, MAX_NESTED);
            proptest::prop_assert_eq!(got, want, "{:?}", text);
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[a-z\"\\\\/\n\t\u{1}é🚀 :,{}\\[\\]]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z\"\\\\é:]{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
