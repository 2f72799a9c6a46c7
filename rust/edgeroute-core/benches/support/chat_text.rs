//! The decide bench's chat body and its message texts, shared by the benches.

pub const CHAT_2K: &[u8] = include_bytes!("../data/chat_2k.json");

/// The chat's message texts joined by newlines (what `bench/core_bench.py` hands tiktoken).
pub fn chat_text() -> String {
    let v: serde_json::Value = serde_json::from_slice(CHAT_2K).expect("valid body");
    let texts: Vec<&str> = v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    texts.join("\n")
}
