//! p50 / p99 latency of both predictions (task type + router scores) for a
//! 2,000-token chat, with the shipped models (target: p99 <= 50 us).
//!
//! `cargo run --release -p edgeroute-core --example classify_latency [calls [model_dir]]`
//! times each of `calls` (default 20,000) `Classifier::classify` calls
//! separately, after a warm-up, and prints percentiles. Criterion
//! (`cargo bench -p edgeroute-core --bench classify`) reports means only.

use std::time::Instant;

use edgeroute_core::Encoding;

#[path = "../benches/support/classify_workload.rs"]
mod workload;

fn main() {
    let calls: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let clf = workload::classifier(std::env::args().nth(2));
    let text = workload::chat_2000_tokens();
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
