//! The first key a JSON body repeats within one object, and where.
//!
//! JSON leaves a repeated key to the reader: edgeroute's parsers (serde's
//! fields aside, orjson) keep the last value, some providers' the first. A
//! body saying `"max_tokens": 1, "max_tokens": 100000`, or a `file_id` twice
//! in a content part, was checked (budgets reserved, a file id refused, a
//! model allowed) by one value and served by the other. Such a body is refused
//! whole, whichever key it repeats and however deep.
//!
//! A byte scan, as [`crate::nesting_over`]: strings are skipped with a search
//! for their closing quote (a word at a time, SIMD over long ones); only keys
//! are kept, borrowed from the body unless they hold escapes (`"a\u0062"` is
//! `"ab"` to every parser), and compared with their object's other keys (a
//! hash set once an object has many). Bytes that are not JSON are scanned
//! the same way; the parser that follows reports them.

use std::borrow::Cow;
use std::collections::HashSet;

use crate::json_text::find_quote;

/// Keys an object holds before its keys are also put in a hash set.
const LINEAR_KEYS: usize = 16;

struct Frame<'a> {
    object: bool,
    /// Where this object's keys start in the scan's list of keys.
    keys_from: usize,
    /// An array's current element.
    index: usize,
    /// An object's keys, once it has more than [`LINEAR_KEYS`].
    set: Option<HashSet<Cow<'a, [u8]>>>,
}

/// The path (`messages[1].content[0].file.file_id`) of the first key `body`
/// repeats within one object, or None.
pub fn duplicate_key(body: &[u8]) -> Option<String> {
    let mut frames: Vec<Frame<'_>> = Vec::new();
    let mut keys: Vec<Cow<'_, [u8]>> = Vec::new();
    let mut expect_key = false;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'{' | b'[' => {
                let object = body[i] == b'{';
                frames.push(Frame {
                    object,
                    keys_from: keys.len(),
                    index: 0,
                    set: None,
                });
                expect_key = object;
            }
            b'}' | b']' => {
                if let Some(f) = frames.pop() {
                    keys.truncate(f.keys_from);
                }
                expect_key = false;
            }
            b',' => match frames.last_mut() {
                Some(f) if f.object => expect_key = true,
                Some(f) => f.index += 1,
                None => {}
            },
            b'"' => {
                let end = string_end(body, i + 1)?; // unterminated: the parser's to report
                if expect_key {
                    expect_key = false;
                    let key = decoded(&body[i + 1..end]);
                    if let Some(f) = frames.last_mut() {
                        let mine = &keys[f.keys_from..];
                        let seen = match &mut f.set {
                            Some(set) => !set.insert(key.clone()),
                            None => mine.contains(&key),
                        };
                        if seen {
                            return Some(path(&frames, &keys, &key));
                        }
                        if f.set.is_none() && mine.len() >= LINEAR_KEYS {
                            let mut set: HashSet<_> = mine.iter().cloned().collect();
                            set.insert(key.clone());
                            f.set = Some(set);
                        }
                    }
                    keys.push(key);
                }
                i = end;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Where the JSON string whose body starts at `start` ends: its first quote after an even run
/// of backslashes (None: unterminated). Quotes alone are searched for: a search stopping at
/// each backslash too (a chat's text has a `\n` every line) made twice the calls.
fn string_end(body: &[u8], start: usize) -> Option<usize> {
    let mut at = start;
    loop {
        let quote = at + find_quote(body.get(at..)?)?;
        let run = body[start..quote].iter().rev().take_while(|&&b| b == b'\\').count();
        if run % 2 == 0 {
            return Some(quote);
        }
        at = quote + 1;
    }
}

/// A key as parsers read it: its escapes decoded (its raw bytes when they do not decode).
fn decoded(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.contains(&b'\\') {
        return Cow::Borrowed(raw);
    }
    let quoted = [b"\"", raw, b"\""].concat();
    match serde_json::from_slice::<String>(&quoted) {
        Ok(s) => Cow::Owned(s.into_bytes()),
        Err(_) => Cow::Borrowed(raw),
    }
}

/// Where `key` sits: each enclosing object's current key and array's index, then `key`.
fn path(frames: &[Frame<'_>], keys: &[Cow<'_, [u8]>], key: &[u8]) -> String {
    let mut out = String::new();
    for (depth, f) in frames.iter().enumerate() {
        if f.object {
            let name: &[u8] = match frames.get(depth + 1) {
                Some(inner) => keys[..inner.keys_from].last().map_or(&b""[..], |k| k),
                None => key,
            };
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&String::from_utf8_lossy(name));
        } else {
            out.push_str(&format!("[{}]", f.index));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup(body: &str) -> Option<String> {
        duplicate_key(body.as_bytes())
    }

    #[test]
    fn repeated_keys_are_found_with_their_path() {
        assert_eq!(
            dup(r#"{"model":"a","messages":[],"model":"b"}"#).as_deref(),
            Some("model")
        );
        let part = r#"{"messages":[{"role":"user","content":"x"},{"role":"user","content":[
            {"type":"text","text":"hi"},{"type":"file","file":{"file_id":"f-1","file_id":""}}]}]}"#;
        assert_eq!(dup(part).as_deref(), Some("messages[1].content[1].file.file_id"));
        assert_eq!(
            dup(r#"[{"a":1},{"b":{"c":[1,{"d":1,"d":2}]}}]"#).as_deref(),
            Some("[1].b.c[1].d")
        );
    }

    #[test]
    fn escapes_spell_the_same_key() {
        assert_eq!(
            dup(r#"{"max_tokens":1,"max\u005ftokens":9}"#).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(dup(r#"{"a\"b":1,"a\u0022b":2}"#).as_deref(), Some("a\"b"));
        assert_eq!(dup(r#"{"a\\":1,"a\\\\":2}"#), None);
    }

    #[test]
    fn the_same_key_in_different_objects_is_no_repeat() {
        let body = r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}],
            "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],
            "role":"not a message's", "text": "\"role\": \"x\", \"role\": 1"}"#;
        assert_eq!(dup(body), None);
        // Keys after a nested object closes are still the outer object's.
        assert_eq!(dup(r#"{"a":{"b":1},"b":2,"c":{"a":1}}"#), None);
        assert_eq!(dup(r#"{"a":{"b":1},"b":2,"a":3}"#).as_deref(), Some("a"));
    }

    #[test]
    fn large_objects_are_checked_by_hash() {
        let mut body: String = (0..100).map(|i| format!(r#""k{i}":{i},"#)).collect();
        body = format!("{{{body}\"last\":0}}");
        assert_eq!(dup(&body), None);
        let repeated = body.replace(r#""last":0"#, r#""k3":0"#);
        assert_eq!(dup(&repeated).as_deref(), Some("k3"));
        let late = body.replace(r#""last":0"#, r#""k99":0"#);
        assert_eq!(dup(&late).as_deref(), Some("k99"));
    }

    #[test]
    fn bytes_that_are_not_json_do_not_panic() {
        for body in [
            "",
            "{",
            "}",
            "]]]",
            r#"{"a"#,
            r#"{"a":"b"#,
            "{\"a\\",
            r#"{,,"a":1,"a""#,
            "\"\\u12",
        ] {
            let _ = dup(body);
        }
        assert_eq!(dup(r#"{"a":1,"a""#).as_deref(), Some("a"));
    }
}
