//! p50 / p99 latency of both predictions (task type + router scores) for a
//! 2,000-token chat, with the shipped models (target: p99 <= 50 us).
//!
//! `cargo run --release -p edgeroute-core --example classify_latency [calls [model_dir]]`
//! times each of `calls` (default 20,000) `Classifier::classify` calls
//! separately, after a warm-up, and prints percentiles. Criterion
//! (`cargo bench -p edgeroute-core --bench classify`) reports means only.

use std::path::PathBuf;
use std::time::Instant;

use edgeroute_core::classify::Classifier;
use edgeroute_core::Encoding;

fn classifier(dir: Option<String>) -> Classifier {
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

/// The same 2,000-token chat as `benches/classify.rs`: prose, a code block, a question.
fn chat_2000_tokens() -> String {
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

fn main() {
    let calls: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let clf = classifier(std::env::args().nth(2));
    let text = chat_2000_tokens();
    let tokens = Encoding::O200kBase.count(&text);
    for _ in 0..2_000 {
        std::hint::black_box(clf.classify(std::hint::black_box(&text)));
    }
    let mut ns: Vec<u128> = (0..calls)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(clf.classify(std::hint::black_box(&text)));
            t.elapsed().as_nanos()
        })
        .collect();
    ns.sort_unstable();
    let p = |q: f64| ns[((ns.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    println!(
        "classify (task + router), {tokens}-token chat ({} bytes), {calls} calls: \
         p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us",
        text.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0)
    );
}
