//! Token counting for routing decisions (context-window checks, token-range
//! rules, cost estimates).
//!
//! # What is exact and what is an estimate
//!
//! | part | status |
//! | --- | --- |
//! | text under `o200k_base` / `cl100k_base` | **exact**: identical to `tiktoken`'s `encode_ordinary` (the same vocabularies and merge, see `vocab.rs`; `tests/test_tokens.py` checks this against `tiktoken` with hypothesis) |
//! | chat framing of plain messages (`role`, string `content`, `name`) | **exact** per OpenAI's cookbook (`num_tokens_from_messages`): 3 tokens per message, the tokens of every string field, 1 more when a message has a `name`, 3 for the assistant reply priming |
//! | content given as an array of parts | text parts are counted one by one; image, audio and file parts are **not** counted (their cost depends on sizes the body does not carry) |
//! | `tools` (function definitions) | **estimate**: the cookbook's `num_tokens_for_tools` formula (see [`count_tools`]); OpenAI renders tools into an undocumented system-prompt format, and the formula was fitted to it for gpt-4o/gpt-4o-mini and gpt-4/gpt-3.5-turbo |
//! | `functions` (the legacy name of `tools`) and `response_format` | **estimate**: the tokens of their JSON text (the provider renders them into the prompt and bills them) |
//! | `tool_calls` of assistant messages | **estimate**: each call as a message of its own (3 tokens) plus its name and its JSON arguments |
//! | [`Encoding::ClaudeEstimate`], [`Encoding::GeminiEstimate`] | **estimate**: these vendors publish no tokenizer usable here; the whole prompt is counted with an OpenAI encoding and scaled up once at the end |

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::request::ChatRequest;
use crate::vocab::{Vocab, CL100K, O200K};

/// A tokenizer, named as in `tiktoken`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, o-series and later OpenAI models.
    O200kBase,
    /// GPT-4, GPT-3.5-turbo and the text-embedding-3 family.
    Cl100kBase,
    /// Anthropic Claude: no public tokenizer; `cl100k_base` count × 1.15, rounded up.
    /// Claude's vocabulary splits English text into slightly more pieces.
    ClaudeEstimate,
    /// Google Gemini: no public tokenizer in Rust; `o200k_base` count × 1.05, rounded up.
    GeminiEstimate,
}

impl Encoding {
    /// Parses a `tiktoken` encoding name or one of the estimate names.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "o200k_base" => Self::O200kBase,
            "cl100k_base" => Self::Cl100kBase,
            "claude_estimate" => Self::ClaudeEstimate,
            "gemini_estimate" => Self::GeminiEstimate,
            _ => return None,
        })
    }

    /// The encoding a model uses, from its name (the same prefixes `tiktoken` maps).
    pub fn for_model(model: &str) -> Self {
        let m = model.rsplit('/').next().unwrap_or(model);
        if m.starts_with("claude") {
            Self::ClaudeEstimate
        } else if m.starts_with("gemini") {
            Self::GeminiEstimate
        } else if m.starts_with("gpt-4o")
            || m.starts_with("gpt-4.1")
            || m.starts_with("gpt-4.5")
            || m.starts_with("gpt-5")
            || m.starts_with("chatgpt-4o")
            || m.starts_with("gpt-oss")
            || m.starts_with("o1")
            || m.starts_with("o3")
            || m.starts_with("o4")
        {
            Self::O200kBase
        } else if m.starts_with("gpt-4") || m.starts_with("gpt-3.5") || m.starts_with("text-embedding") {
            Self::Cl100kBase
        } else {
            Self::O200kBase
        }
    }

    /// The canonical name of this encoding.
    pub fn name(self) -> &'static str {
        match self {
            Self::O200kBase => "o200k_base",
            Self::Cl100kBase => "cl100k_base",
            Self::ClaudeEstimate => "claude_estimate",
            Self::GeminiEstimate => "gemini_estimate",
        }
    }

    /// Number of tokens in `text`.
    pub fn count(self, text: &str) -> usize {
        let (tok, percent) = self.base();
        scale(count_with(tok, text), percent)
    }

    /// Loads the tables now rather than on the first request.
    pub fn warm_up(self) {
        let _ = self.count("warm up: caf\u{e9} \u{1F600}"); // non-ASCII builds the Unicode class table
    }

    /// The OpenAI tokenizer this encoding counts with, and the percentage it scales the result by.
    fn base(self) -> (&'static Vocab, usize) {
        let vocab: &Vocab = match self {
            Self::O200kBase | Self::GeminiEstimate => &O200K,
            Self::Cl100kBase | Self::ClaudeEstimate => &CL100K,
        };
        (vocab, self.percent())
    }

    /// The percentage counts are scaled by. Apart from [`base`](Self::base): touching a
    /// vocabulary loads it (tens of MB, ~50 ms), and bounding a prompt needs none.
    fn percent(self) -> usize {
        match self {
            Self::O200kBase | Self::Cl100kBase => 100,
            Self::ClaudeEstimate => 115,
            Self::GeminiEstimate => 105,
        }
    }

    /// The cookbook's per-function constants for this encoding's model family.
    fn tool_overheads(self) -> ToolOverheads {
        match self {
            // gpt-4 / gpt-3.5-turbo in the cookbook.
            Self::Cl100kBase | Self::ClaudeEstimate => ToolOverheads {
                func_init: 10,
                ..GPT_4O_TOOLS
            },
            // gpt-4o / gpt-4o-mini in the cookbook.
            Self::O200kBase | Self::GeminiEstimate => GPT_4O_TOOLS,
        }
    }
}

fn count_with(vocab: &Vocab, text: &str) -> usize {
    if text.is_empty() {
        0
    } else {
        vocab.count(text)
    }
}

fn scale(n: usize, percent: usize) -> usize {
    if percent == 100 {
        n
    } else {
        (n * percent).div_ceil(100)
    }
}

/// Tokens added per message by the chat format (`<|start|>{role}<|message|>`...`<|end|>`).
pub const TOKENS_PER_MESSAGE: usize = 3;
/// Extra token for a message that carries a `name`.
pub const TOKENS_PER_NAME: usize = 1;
/// Tokens that prime the assistant's reply (`<|start|>assistant<|message|>`).
pub const REPLY_PRIMING: usize = 3;

/// The constants of the cookbook's `num_tokens_for_tools`.
#[derive(Debug, Clone, Copy)]
struct ToolOverheads {
    /// Per function definition.
    func_init: isize,
    /// Once per function that has at least one parameter.
    prop_init: isize,
    /// Per parameter.
    prop_key: isize,
    /// Once per parameter that has an `enum` (negative: the cookbook's fit).
    enum_init: isize,
    /// Per enum value.
    enum_item: isize,
    /// Once for the whole tool list.
    func_end: isize,
}

const GPT_4O_TOOLS: ToolOverheads = ToolOverheads {
    func_init: 7,
    prop_init: 3,
    prop_key: 3,
    enum_init: -3,
    enum_item: 3,
    func_end: 12,
};

/// Prompt tokens of a chat request, as OpenAI bills them (see the module doc for
/// which parts are exact).
pub fn count_chat(req: &ChatRequest<'_>, enc: Encoding) -> usize {
    let (tok, percent) = enc.base();
    let count = |t: &str| count_with(tok, t);
    let mut total = REPLY_PRIMING;
    for m in &req.messages {
        total += TOKENS_PER_MESSAGE + count(&m.role);
        m.for_each_text(|t| total += count(t));
        if let Some(name) = &m.name {
            total += count(name) + TOKENS_PER_NAME;
        }
        for call in m.tool_calls.iter().flatten() {
            total += TOKENS_PER_MESSAGE + count(&call.function.name) + count(&call.function.arguments);
        }
    }
    if let Some(tools) = req.tools {
        total += count_tools_with(tools, tok, enc.tool_overheads());
    }
    for field in req.prompt_fields.iter().flatten() {
        total += count(field.get());
    }
    scale(total, percent)
}

/// Bounds on a chat's prompt tokens without running the tokenizer, for the many
/// requests whose routing does not depend on the exact count.
///
/// `upper` is a hard bound for the byte-level BPE encodings: every token covers
/// at least one byte, so the tokens of a text are at most its UTF-8 length (the
/// estimates scale that by their factor). `estimate` assumes four bytes a token,
/// OpenAI's rule of thumb for English.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBounds {
    /// No tokenizer can produce more tokens than this.
    pub upper: usize,
    /// A typical count.
    pub estimate: usize,
}

/// [`TokenBounds`] of a chat request under `enc`.
pub fn bound_chat(req: &ChatRequest<'_>, enc: Encoding) -> TokenBounds {
    let mut bytes = 0usize;
    let mut framing = REPLY_PRIMING;
    for m in &req.messages {
        framing += TOKENS_PER_MESSAGE + TOKENS_PER_NAME;
        bytes += m.role.len() + m.name.as_ref().map_or(0, |n| n.len());
        m.for_each_text(|t| bytes += t.len());
        for call in m.tool_calls.iter().flatten() {
            framing += TOKENS_PER_MESSAGE;
            bytes += call.function.name.len() + call.function.arguments.len();
        }
    }
    if let Some(tools) = req.tools {
        bytes += tools.get().len();
    }
    bytes += req.prompt_fields.iter().flatten().map(|f| f.get().len()).sum::<usize>();
    let percent = enc.percent();
    TokenBounds {
        upper: scale(bytes + framing, percent),
        estimate: scale(bytes.div_ceil(4) + framing, percent),
    }
}

/// Tokens of a `tools` array by the cookbook's `num_tokens_for_tools`: per
/// function `func_init` plus the tokens of `"{name}:{description}"` (one final
/// `.` dropped); when it has parameters, `prop_init`, and per parameter
/// `prop_key` plus `"{key}:{type}:{description}"`, and for an `enum`
/// `enum_init` plus `enum_item` and the tokens of each value; finally `func_end`
/// once. An estimate (OpenAI's rendering of tools is not public).
///
/// Entries that are not `{"type": "function", ...}` definitions, and a `tools`
/// value that is not an array of objects, are counted as the tokens of their
/// JSON text. A missing description or type reads as empty; a non-string type or
/// enum value is counted by its JSON text.
pub fn count_tools(tools: &RawValue, enc: Encoding) -> usize {
    let (tok, percent) = enc.base();
    scale(count_tools_with(tools, tok, enc.tool_overheads()), percent)
}

#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(borrow, default)]
    function: Option<Function<'a>>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow, default)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    description: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    parameters: Option<Parameters<'a>>,
}

#[derive(Deserialize)]
struct Parameters<'a> {
    #[serde(borrow, default)]
    properties: Option<HashMap<Cow<'a, str>, Property<'a>>>,
}

#[derive(Deserialize)]
struct Property<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    description: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "enum")]
    values: Option<Vec<&'a RawValue>>,
}

/// A JSON string's value, or any other JSON value's text.
fn json_text(raw: &RawValue) -> Cow<'_, str> {
    serde_json::from_str::<Cow<'_, str>>(raw.get()).unwrap_or(Cow::Borrowed(raw.get()))
}

fn count_tools_with(tools: &RawValue, tok: &Vocab, k: ToolOverheads) -> usize {
    let Ok(list) = serde_json::from_str::<Vec<&RawValue>>(tools.get()) else {
        return count_with(tok, tools.get());
    };
    if list.is_empty() {
        return 0;
    }
    let count = |t: &str| count_with(tok, t) as isize;
    let mut total = k.func_end;
    let mut line = String::new();
    for raw in list {
        let Some(f) = serde_json::from_str::<Tool<'_>>(raw.get())
            .ok()
            .and_then(|t| t.function)
        else {
            total += count(raw.get());
            continue;
        };
        total += k.func_init;
        let desc = f.description.as_deref().unwrap_or("");
        line.clear();
        line.push_str(&f.name);
        line.push(':');
        line.push_str(desc.strip_suffix('.').unwrap_or(desc));
        total += count(&line);
        let props = f.parameters.and_then(|p| p.properties).unwrap_or_default();
        if props.is_empty() {
            continue;
        }
        total += k.prop_init;
        for (key, p) in &props {
            total += k.prop_key;
            if let Some(values) = &p.values {
                total += k.enum_init;
                for v in values {
                    total += k.enum_item + count(&json_text(v));
                }
            }
            let desc = p.description.as_deref().unwrap_or("");
            line.clear();
            line.push_str(key);
            line.push(':');
            line.push_str(&p.kind.map(json_text).unwrap_or_default());
            line.push(':');
            line.push_str(desc.strip_suffix('.').unwrap_or(desc));
            total += count(&line);
        }
    }
    total.max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_counts() {
        // Values from tiktoken 0.14.
        assert_eq!(Encoding::O200kBase.count("hello world"), 2);
        assert_eq!(Encoding::Cl100kBase.count("hello world"), 2);
        assert_eq!(Encoding::O200kBase.count(""), 0);
    }

    #[test]
    fn chat_overheads() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]}"#;
        let req = ChatRequest::parse(body).unwrap();
        // 3 (priming) + 3 (message) + 1 ("user") + 2 ("hello world")
        assert_eq!(count_chat(&req, Encoding::O200kBase), 9);
        let named = br#"{"model":"gpt-4o","messages":[{"role":"user","name":"bob","content":"hello world"}]}"#;
        let req = ChatRequest::parse(named).unwrap();
        // + 1 ("bob") + 1 (name)
        assert_eq!(count_chat(&req, Encoding::O200kBase), 11);
    }

    #[test]
    fn functions_and_response_format_are_prompt() {
        let plain = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]}"#;
        let with = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}],
            "functions":[{"name":"f","description":"hello world"}],
            "response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"description":"hello"}}}}"#;
        let (plain, with) = (ChatRequest::parse(plain).unwrap(), ChatRequest::parse(with).unwrap());
        let text = |raw: &str| Encoding::O200kBase.count(raw);
        let extra = text(r#"[{"name":"f","description":"hello world"}]"#)
            + text(r#"{"type":"json_schema","json_schema":{"name":"x","schema":{"description":"hello"}}}"#);
        assert_eq!(
            count_chat(&with, Encoding::O200kBase),
            count_chat(&plain, Encoding::O200kBase) + extra
        );
        let bytes = |r: &ChatRequest<'_>| bound_chat(r, Encoding::O200kBase).upper;
        assert!(bytes(&with) > bytes(&plain) + 100);
    }

    #[test]
    fn estimates_scale_once() {
        let body = br#"{"model":"c","messages":[{"role":"user","content":"hello world"}]}"#;
        let req = ChatRequest::parse(body).unwrap();
        // 9 with cl100k_base, × 1.15 rounded up.
        assert_eq!(count_chat(&req, Encoding::ClaudeEstimate), 11);
    }

    #[test]
    fn tools_follow_the_cookbook() {
        // The cookbook's example: get_current_weather(location, unit enum [celsius, fahrenheit]).
        let tools = r#"[{"type":"function","function":{"name":"get_current_weather",
            "description":"Get the current weather in a given location",
            "parameters":{"type":"object","properties":{
                "location":{"type":"string","description":"The city and state, e.g. San Francisco, CA"},
                "unit":{"type":"string","description":"The unit of temperature to return","enum":["celsius","fahrenheit"]}},
            "required":["location"]}}}]"#;
        let raw: &RawValue = serde_json::from_str(tools).unwrap();
        let e = Encoding::O200kBase;
        let expected = 12
            + 7
            + e.count("get_current_weather:Get the current weather in a given location")
            + 3
            + 3
            + e.count("location:string:The city and state, e.g. San Francisco, CA")
            + 3
            + e.count("unit:string:The unit of temperature to return")
            - 3
            + 3
            + e.count("celsius")
            + 3
            + e.count("fahrenheit");
        assert_eq!(count_tools(raw, e), expected);
        let other: &RawValue = serde_json::from_str(r#"[{"type":"web_search"}]"#).unwrap();
        assert_eq!(count_tools(other, e), 12 + e.count(r#"{"type":"web_search"}"#));
        let empty: &RawValue = serde_json::from_str("[]").unwrap();
        assert_eq!(count_tools(empty, e), 0);
    }

    #[test]
    fn model_map() {
        assert_eq!(Encoding::for_model("gpt-4o-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("gpt-4-turbo"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("openai/gpt-3.5-turbo"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("claude-sonnet-4"), Encoding::ClaudeEstimate);
    }
}
