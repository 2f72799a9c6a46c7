//! Token counting: exact for OpenAI's `o200k_base` and `cl100k_base` (identical
//! to `tiktoken`, via the `bpe-openai` crate's backtracking BPE), and a
//! documented estimate for providers whose tokenizer is not public.
//!
//! Chat prompts are counted with the overheads OpenAI's chat format adds: three
//! tokens per message for the role framing, one more when a message has a
//! `name`, and three for the assistant reply priming.

use crate::request::ChatRequest;

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
        if text.is_empty() {
            return 0;
        }
        match self {
            Self::O200kBase => bpe_openai::o200k_base().count(text),
            Self::Cl100kBase => bpe_openai::cl100k_base().count(text),
            Self::ClaudeEstimate => scale(bpe_openai::cl100k_base().count(text), 115),
            Self::GeminiEstimate => scale(bpe_openai::o200k_base().count(text), 105),
        }
    }

    /// Loads the tables now rather than on the first request.
    pub fn warm_up(self) {
        let _ = self.count("warm up");
    }
}

fn scale(n: usize, percent: usize) -> usize {
    (n * percent).div_ceil(100)
}

/// Tokens added per message by the chat format.
pub const TOKENS_PER_MESSAGE: usize = 3;
/// Extra token for a message that carries a `name`.
pub const TOKENS_PER_NAME: usize = 1;
/// Tokens that prime the assistant's reply.
pub const REPLY_PRIMING: usize = 3;

/// Prompt tokens of a chat request, as OpenAI bills them for plain messages.
///
/// Tool definitions and tool calls are counted as the tokens of their JSON text
/// (definitions) or of name plus arguments (calls); OpenAI's internal rendering
/// of tools is undocumented, so those parts are close estimates, not exact.
pub fn count_chat(req: &ChatRequest<'_>, enc: Encoding) -> usize {
    let mut total = REPLY_PRIMING;
    for m in &req.messages {
        total += TOKENS_PER_MESSAGE + enc.count(&m.role);
        m.for_each_text(|t| total += enc.count(t));
        if let Some(name) = &m.name {
            total += enc.count(name) + TOKENS_PER_NAME;
        }
        for call in m.tool_calls.iter().flatten() {
            total += enc.count(&call.function.name) + enc.count(&call.function.arguments) + TOKENS_PER_MESSAGE;
        }
    }
    if let Some(tools) = req.tools {
        total += enc.count(tools.get());
    }
    total
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
    }

    #[test]
    fn model_map() {
        assert_eq!(Encoding::for_model("gpt-4o-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("gpt-4-turbo"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("openai/gpt-3.5-turbo"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("claude-sonnet-4"), Encoding::ClaudeEstimate);
    }
}
