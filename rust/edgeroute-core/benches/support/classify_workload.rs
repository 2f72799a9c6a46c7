//! The classifier workload shared by `benches/classify.rs` and
//! `examples/classify_latency.rs`, so that both time the same thing.

use std::path::PathBuf;

use edgeroute_core::classify::Classifier;
use edgeroute_core::Encoding;

/// The shipped models, or those in `dir`.
pub fn classifier(dir: Option<String>) -> Classifier {
    let dir = dir.map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../edgeroute/models"),
        PathBuf::from,
    );
    Classifier::from_bytes(
        &std::fs::read(dir.join("task.erlm")).expect("run python -m edgeroute.learn.build_models"),
        &std::fs::read(dir.join("router-gpt4-mixtral.erlm")).expect("router model"),
    )
    .expect("valid models")
}

/// A chat of about 2,000 tokens (o200k): prose, a code block and a question.
pub fn chat_2000_tokens() -> String {
    let para = "We are migrating the billing service from a monolith to three services. \
        The invoices table has 40 million rows and the nightly job now takes six hours. \
        Here is the current query and the error we get when the replica lags behind.\n";
    let code = "```python\ndef total(rows):\n    s = 0\n    for r in rows:\n        s += r['amount'] * (1 + r['tax'])\n    return round(s, 2)\n```\n";
    let mut s = String::new();
    let enc = Encoding::O200kBase;
    while enc.count(&s) < 2000 {
        s.push_str(para);
        s.push_str(code);
    }
    s.push_str("How should we partition the table, and what would you change in the code?");
    s
}
