//! Latency of both predictions (task type + router scores) for a 2,000-token chat.
//!
//! `cargo bench -p edgeroute-core --bench classify`. Besides criterion's
//! estimates it prints p50/p99 over 20,000 timed calls (target: p99 <= 50 us).

use std::time::Instant;

use criterion::{criterion_group, Criterion};
use edgeroute_core::classify::Features;
use edgeroute_core::Encoding;

#[path = "support/classify_workload.rs"]
mod workload;

fn bench(c: &mut Criterion) {
    let clf = workload::classifier(None);
    let text = workload::chat_2000_tokens();
    c.bench_function("classify/both_2000_tokens", |b| {
        b.iter(|| clf.classify(std::hint::black_box(&text)))
    });
    c.bench_function("classify/features_only_2000_tokens", |b| {
        b.iter(|| Features::extract(std::hint::black_box(&text), clf.task.featurizer()))
    });
    c.bench_function("classify/both_short_prompt", |b| {
        b.iter(|| clf.classify(std::hint::black_box("Write a haiku about Rust borrow checking.")))
    });
}

fn percentiles() {
    let clf = workload::classifier(None);
    let text = workload::chat_2000_tokens();
    let tokens = Encoding::O200kBase.count(&text);
    for _ in 0..2_000 {
        std::hint::black_box(clf.classify(&text));
    }
    let mut ns: Vec<u128> = (0..20_000)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(clf.classify(std::hint::black_box(&text)));
            t.elapsed().as_nanos()
        })
        .collect();
    ns.sort_unstable();
    let p = |q: f64| ns[((ns.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    println!(
        "classify (task + router), {tokens}-token chat ({} bytes): p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        text.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    percentiles();
    Criterion::default().configure_from_args().final_summary();
}
