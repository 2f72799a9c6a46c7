//! Reading an OpenAI chat-completions body straight from its bytes.
//!
//! Only the fields routing needs are decoded, borrowing from the body where the
//! JSON has no escapes; everything else is skipped. Message texts are decoded
//! once, here: counting, bounding, classifying and rule matching all read them. The byte span of the
//! `model` value is kept so that a pass-through request can be forwarded with
//! only that value replaced, without the proxy ever re-serialising the body.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{CoreError, Result};

/// One chat message, as far as routing cares.
#[derive(Debug, Deserialize)]
pub struct Message<'a> {
    /// `system`, `user`, `assistant`, `tool`, ...
    #[serde(borrow)]
    pub role: Cow<'a, str>,
    /// The text of the content (a string, or the `text` parts of an array).
    #[serde(borrow, default)]
    pub content: Content<'a>,
    /// The optional participant name.
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub name: Option<Cow<'a, str>>,
    /// Tool calls made by an assistant message.
    #[serde(borrow, default)]
    pub tool_calls: Option<Vec<ToolCall<'a>>>,
}

/// A tool call in an assistant message.
#[derive(Debug, Deserialize)]
pub struct ToolCall<'a> {
    /// The function called.
    #[serde(borrow)]
    pub function: FunctionCall<'a>,
}

/// The function part of a tool call.
#[derive(Debug, Deserialize)]
pub struct FunctionCall<'a> {
    /// Function name.
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    /// JSON-encoded arguments.
    #[serde(borrow, default)]
    pub arguments: Cow<'a, str>,
}

/// An optional string, borrowed from the body unless it has escapes. (`#[serde(borrow)]`
/// borrows a `Cow<str>` field only: through an `Option` it always allocates a copy.)
fn borrowed<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Text<'a>>::deserialize(d)?.map(|t| t.0))
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    // Read as raw text so that a wrong type gets our message naming the field (see `count`).
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
    #[serde(borrow, default)]
    best_of: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    functions: Option<&'a RawValue>,
    #[serde(borrow, default)]
    response_format: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prediction: Option<&'a RawValue>,
    #[serde(borrow, default)]
    service_tier: Option<&'a RawValue>,
}

/// The routing-relevant view of a chat-completions request.
#[derive(Debug)]
pub struct ChatRequest<'a> {
    /// The whole body, checked to be UTF-8 (what PII conditions scan).
    pub json: &'a str,
    /// The public model asked for.
    pub model: Cow<'a, str>,
    /// Byte range of the `model` value (quotes included) inside the body.
    pub model_span: (usize, usize),
    /// The conversation.
    pub messages: Vec<Message<'a>>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the client asked for a final usage chunk in the stream.
    pub include_usage: bool,
    /// The larger of `max_completion_tokens` and the older `max_tokens`: a server that reads
    /// only `max_tokens` writes that many whatever the other says, and budgets reserve for it.
    pub max_tokens: Option<u32>,
    /// Completions asked for: `n`, or `best_of` when larger; at least 1. Budgets and
    /// token limits reserve for this many.
    pub choices: u32,
    /// The end-user id the client supplied.
    pub user: Option<Cow<'a, str>>,
    /// Raw tool definitions, if any.
    pub tools: Option<&'a RawValue>,
    /// Other fields the provider renders into the prompt and bills as prompt tokens: the
    /// legacy `functions` (tools by another name) and `response_format` (its JSON schema).
    pub prompt_fields: [Option<&'a RawValue>; 2],
    /// Content parts of a type other than `text` (images, audio, files): their tokens are not
    /// in the text's count, and budgets read them from the body only when there are some.
    pub other_parts: u32,
    /// The Predicted Output (`prediction`) as written, when not null: the predicted tokens an
    /// answer rejects are billed as output beyond `max_tokens`, so budgets reserve for them.
    /// Found by the parse itself, a key spelt with escapes (`predict\u0069on`) included.
    pub prediction: Option<&'a RawValue>,
    /// The `service_tier` as written, when not null: the server checks which tiers clients may
    /// name (one billed above its deployments' price is refused), without parsing the body again.
    pub service_tier: Option<&'a RawValue>,
}

/// A count of choices (`n`, `best_of`): 1 when absent or null, else a JSON integer of at
/// least 1. Strict because budgets reserve for this many: a lenient upstream (many
/// OpenAI-compatible servers take `"4"` or `4.0` as 4) would write more than was reserved.
fn count(raw: Option<&RawValue>, name: &str) -> Result<u32> {
    match raw.map(RawValue::get) {
        None | Some("null") => Ok(1),
        Some(text) => match text.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(CoreError::BadRequest(format!(
                "Invalid value for '{name}': expected an integer from 1 to {}.",
                u32::MAX
            ))),
        },
    }
}

impl<'a> ChatRequest<'a> {
    /// Decode `body`; errors read as the API's own 400 messages.
    pub fn parse(body: &'a [u8]) -> Result<Self> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(CoreError::BadRequest(
                "The request body is empty; expected a JSON object.".into(),
            ));
        }
        // One SIMD UTF-8 check of the whole body instead of one per string, which
        // is what parsing from bytes does (a third of the parse on a long chat).
        let text = simdutf8::basic::from_utf8(body).map_err(|_| {
            let e = std::str::from_utf8(body).expect_err("invalid UTF-8");
            CoreError::BadRequest(format!("The request body is not valid UTF-8: {e}"))
        })?;
        let raw: Body<'a> = serde_json::from_str(text)
            .map_err(|e| CoreError::BadRequest(format!("The request body is not valid JSON for this endpoint: {e}")))?;
        let model_raw = raw
            .model
            .ok_or_else(|| CoreError::BadRequest("Missing required parameter: 'model'.".into()))?;
        let model: Cow<'a, str> = serde_json::from_str(model_raw.get())
            .map_err(|_| CoreError::BadRequest("Invalid type for 'model': expected a string.".into()))?;
        let messages = raw
            .messages
            .ok_or_else(|| CoreError::BadRequest("Missing required parameter: 'messages'.".into()))?;
        if messages.is_empty() {
            return Err(CoreError::BadRequest(
                "Invalid 'messages': empty array. Expected an array with minimum length 1.".into(),
            ));
        }
        // RawValue borrows from `body`, so its offset is a plain pointer difference.
        let start = model_raw.get().as_ptr() as usize - body.as_ptr() as usize;
        let model_span = (start, start + model_raw.get().len());
        let other_parts = messages.iter().map(|m| m.content.other_parts()).sum();
        Ok(Self {
            json: text,
            model,
            model_span,
            messages,
            stream: raw.stream.unwrap_or(false),
            include_usage: raw.stream_options.is_some_and(|o| o.include_usage),
            max_tokens: raw.max_completion_tokens.max(raw.max_tokens), // None < Some(_)
            choices: count(raw.n, "n")?.max(count(raw.best_of, "best_of")?),
            user: raw.user,
            tools: raw.tools,
            prompt_fields: [raw.functions, raw.response_format],
            other_parts,
            prediction: raw.prediction.filter(|p| p.get() != "null"),
            service_tier: raw.service_tier.filter(|t| t.get() != "null"),
        })
    }
}

impl Message<'_> {
    /// Calls `f` with each piece of text in the message content.
    pub fn for_each_text(&self, mut f: impl FnMut(&str)) {
        match &self.content {
            Content::Empty | Content::Other => {}
            Content::Text(t) => f(t),
            Content::Parts(parts, _) => parts.iter().for_each(|t| f(t)),
        }
    }
}

impl Content<'_> {
    /// The parts of a type other than `text` (see [`ChatRequest::other_parts`]).
    pub fn other_parts(&self) -> u32 {
        match self {
            Content::Parts(_, n) => *n,
            _ => 0,
        }
    }
}

/// The text of a message's content. Content that is neither a string nor an
/// array (or array entries that are not `{"type": "text", "text": ...}`) holds no
/// text for routing; the upstream judges whether it is valid.
#[derive(Debug, Default)]
pub enum Content<'a> {
    /// Null, missing, or no text parts.
    #[default]
    Empty,
    /// A plain string.
    Text(Cow<'a, str>),
    /// The texts of the `text` parts, in order, and how many parts have another type.
    Parts(Vec<Cow<'a, str>>, u32),
    /// One entry of a content array whose `type` is a string other than `text`.
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(ContentVisitor { part: false })
    }
}

/// Reads message content (`part: false`) or one entry of a content array
/// (`part: true`, where only a `{"type": "text", "text": "..."}` object counts),
/// skipping anything else without an error.
#[derive(Clone, Copy)]
struct ContentVisitor {
    part: bool,
}

impl<'de> de::DeserializeSeed<'de> for ContentVisitor {
    type Value = Content<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ContentVisitor {
    type Value = Content<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("message content")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> std::result::Result<Self::Value, E> {
        Ok(if self.part {
            Content::Empty
        } else {
            Content::Text(Cow::Borrowed(v))
        })
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok(if self.part {
            Content::Empty
        } else {
            Content::Text(Cow::Owned(v.to_owned()))
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Self::Value, A::Error> {
        let (mut parts, mut other) = (Vec::new(), 0u32);
        while let Some(part) = seq.next_element_seed(ContentVisitor { part: true })? {
            match (self.part, part) {
                (false, Content::Text(t)) => parts.push(t),
                (false, Content::Other) => other = other.saturating_add(1),
                _ => {}
            }
        }
        Ok(if parts.is_empty() && other == 0 {
            Content::Empty
        } else {
            Content::Parts(parts, other)
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let (mut is_text, mut other, mut text) = (false, false, None);
        let value = ContentVisitor { part: false };
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match (self.part, key.as_ref()) {
                (true, "type") => match map.next_value_seed(value)? {
                    Content::Text(t) => (is_text, other) = (t == "text", t != "text"),
                    _ => (is_text, other) = (false, false),
                },
                (true, "text") => text = Some(map.next_value_seed(value)?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(match text {
            Some(t @ Content::Text(_)) if is_text => t,
            _ if other => Content::Other,
            _ => Content::Empty,
        })
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(Content::Empty)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<Self::Value, E> {
        Ok(Content::Empty)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<Self::Value, E> {
        Ok(Content::Empty)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<Self::Value, E> {
        Ok(Content::Empty)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<Self::Value, E> {
        Ok(Content::Empty)
    }
}

/// Returns `body` with the bytes in `span` replaced by the JSON string `model`.
pub fn rewrite_model(body: &[u8], span: (usize, usize), model: &str) -> Vec<u8> {
    let (head, quoted, tail) = model_parts(body, span, model);
    let mut out = Vec::with_capacity(head.len() + quoted.len() + tail.len());
    out.extend_from_slice(head);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(tail);
    out
}

/// [`rewrite_model`]'s three parts, for a caller that copies them once into a buffer of its own
/// (a body is megabytes at most, and each copy of it is time on the caller's event loop).
pub fn model_parts<'a>(body: &'a [u8], span: (usize, usize), model: &str) -> (&'a [u8], String, &'a [u8]) {
    let quoted = serde_json::to_string(model).expect("strings always serialise");
    (&body[..span.0], quoted, &body[span.1..])
}

/// Whether the JSON in `body` nests arrays and objects more than `limit` deep. A byte scan
/// that skips strings (a SIMD search for their quotes and escapes): no parse, no allocation,
/// so a caller can check any body before a parser with a lower nesting bound than its own
/// (orjson reads 1,024 levels and writes 254) meets it. Bytes that are not JSON are scanned
/// the same way, and a bracket the document does not close counts as open.
pub fn nesting_over(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => loop {
                // The string's end: the next quote not escaped.
                let rest = body.get(i + 1..).unwrap_or_default(); // an escape may end the body
                match memchr::memchr2(b'"', b'\\', rest) {
                    None => return false,
                    Some(at) if body[i + 1 + at] == b'\\' => i += at + 2,
                    Some(at) => {
                        i += at + 1;
                        break;
                    }
                }
            },
            _ => {}
        }
        i += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(!nesting_over(deep(128).as_bytes(), 128));
        assert!(nesting_over(deep(129).as_bytes(), 128));
        let wrapped = format!(r#"{{"a": "{}", "b": {}}}"#, "[{".repeat(500), deep(10));
        assert!(!nesting_over(wrapped.as_bytes(), 128)); // brackets in a string are text
        let escaped = format!(r#"{{"a": "\"{}\\", "b": {}}}"#, "[".repeat(300), deep(127));
        assert!(!nesting_over(escaped.as_bytes(), 128)); // an escaped quote does not end it
        assert!(nesting_over(
            format!(r#"{{"a": "x", "b": {}}}"#, deep(128)).as_bytes(),
            128
        ));
        assert!(!nesting_over(br#"{"unclosed": "[[[["#, 2));
        assert!(!nesting_over(b"", 0));
        // A body that ends inside a string, after an escape: scanned to its end, no panic.
        assert!(nesting_over(b"[\"ends in an escape\\", 0));
        assert!(!nesting_over(b"\"\\", 5));
    }

    #[test]
    fn parses_and_rewrites_model() {
        let body = br#"{"model": "gpt-4o", "messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let req = ChatRequest::parse(body).unwrap();
        assert_eq!(req.model, "gpt-4o");
        assert!(req.stream);
        let out = rewrite_model(body, req.model_span, "gpt-4o-2024-08-06");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "gpt-4o-2024-08-06");
        assert_eq!(v["messages"][0]["content"], "hi");
    }

    #[test]
    fn choices_are_n_or_best_of_and_at_least_one() {
        let choices = |extra: &str| {
            let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
            ChatRequest::parse(body.as_bytes()).unwrap().choices
        };
        assert_eq!(choices(""), 1);
        assert_eq!(choices(r#","n":4"#), 4);
        assert_eq!(choices(r#","n":2,"best_of":5"#), 5);
        assert_eq!(choices(r#","n":null"#), 1);
    }

    #[test]
    fn max_tokens_is_the_larger_bound_given() {
        let max = |extra: &str| {
            let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
            ChatRequest::parse(body.as_bytes()).unwrap().max_tokens
        };
        assert_eq!(max(""), None);
        assert_eq!(max(r#","max_tokens":7"#), Some(7));
        assert_eq!(max(r#","max_completion_tokens":9"#), Some(9));
        assert_eq!(max(r#","max_tokens":200,"max_completion_tokens":1"#), Some(200));
        assert_eq!(max(r#","max_tokens":1,"max_completion_tokens":200"#), Some(200));
    }

    #[test]
    fn prediction_is_found_as_written() {
        let prediction = |extra: &str| {
            let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
            ChatRequest::parse(body.as_bytes())
                .unwrap()
                .prediction
                .map(|p| p.get().to_owned())
        };
        assert_eq!(prediction(""), None);
        assert_eq!(prediction(r#","prediction":null"#), None);
        let given = r#"{"type":"content","content":"a b"}"#;
        assert_eq!(prediction(&format!(r#","prediction":{given}"#)).as_deref(), Some(given));
        // A key spelt with an escape is the upstream's `prediction` too.
        assert_eq!(prediction(r#","predict\u0069on":5"#).as_deref(), Some("5"));
    }

    #[test]
    fn choices_that_are_not_positive_integers_are_bad_requests() {
        for extra in [
            r#""n":0"#,
            r#""n":-1"#,
            r#""n":"3""#,
            r#""n":3.0"#,
            r#""n":true"#,
            r#""best_of":"3""#,
        ] {
            let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{extra}}}"#);
            let err = ChatRequest::parse(body.as_bytes()).unwrap_err().to_string();
            assert!(err.starts_with("Invalid value for '"), "{extra}: {err}");
        }
    }

    #[test]
    fn names_and_users_are_borrowed_unless_escaped() {
        let body = br#"{"model":"m","user":"u\u0031","messages":[{"role":"user","name":"ann","content":"x"},{"role":"user","name":null}]}"#;
        let req = ChatRequest::parse(body).unwrap();
        assert!(matches!(req.messages[0].name, Some(Cow::Borrowed("ann"))));
        assert_eq!(req.messages[1].name, None);
        assert!(matches!(req.user.as_deref(), Some("u1")));
        let body = br#"{"model":"m","messages":[{"role":"user","name":7}]}"#;
        assert!(matches!(ChatRequest::parse(body), Err(CoreError::BadRequest(_))));
    }

    #[test]
    fn escaped_model_names_decode() {
        let body = br#"{"model":"a\u0062c","messages":[{"role":"user","content":"x"}]}"#;
        assert_eq!(ChatRequest::parse(body).unwrap().model, "abc");
    }

    #[test]
    fn missing_fields_are_bad_requests() {
        for body in [
            &b""[..],
            b"{",
            br#"{"messages":[]}"#,
            br#"{"model":"m"}"#,
            br#"{"model":1,"messages":[{"role":"user"}]}"#,
            br#"{"model":"m","messages":[]}"#,
        ] {
            assert!(
                matches!(ChatRequest::parse(body), Err(CoreError::BadRequest(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn text_parts_are_visited() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"b"}]}]}"#;
        let req = ChatRequest::parse(body).unwrap();
        let mut seen = String::new();
        req.messages[0].for_each_text(|t| seen.push_str(t));
        assert_eq!(seen, "ab");
    }

    #[test]
    fn parts_other_than_text_are_counted() {
        let body = br#"{"model":"m","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},
                {"typ\u0065":"input\u005faudio"},{"type":"file","text":"not text"},{"type":7},{"type":"text"},"bare"]},
            {"role":"user","content":[{"type":"image_url","image_url":{"url":"y"}}]}]}"#;
        let req = ChatRequest::parse(body).unwrap();
        let counts: Vec<u32> = req.messages.iter().map(|m| m.content.other_parts()).collect();
        assert_eq!(counts, [0, 3, 1]);
        assert_eq!(req.other_parts, 4);
        let text = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"}]}]}"#;
        assert_eq!(ChatRequest::parse(text).unwrap().other_parts, 0);
    }

    #[test]
    fn odd_content_holds_no_text_and_is_not_an_error() {
        let body = br#"{"model":"m","messages":[
            {"role":"user","content":7},
            {"role":"user","content":{"text":"no"}},
            {"role":"user","content":[1,"bare",null,{"type":"image_url","text":"no"},{"text":"no"},
                {"type":"text","text":["no"]},{"text":"yes\n","type":"text"}]},
            {"role":"user","content":"esc\u00e9"}]}"#;
        let req = ChatRequest::parse(body).unwrap();
        let mut seen = Vec::new();
        for m in &req.messages {
            m.for_each_text(|t| seen.push(t.to_string()));
        }
        assert_eq!(seen, ["yes\n", "esc\u{e9}"]);
    }
}
