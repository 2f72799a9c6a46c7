//! The PII scan alone, on texts without personal data (the common case, which must stay cheap).
//!
//! `cargo bench -p edgeroute-core --bench pii`. Workloads, each about 10 kB (2,000 tokens):
//! * `json_chat_2k`: [`pii::detect_json`] on the decide bench's chat body (prose with Unicode
//!   and emoji, a code block), as the rules call it;
//! * `text_chat_2k`: [`pii::detect`] on that chat's message texts;
//! * `text_numbers`: prose dense with numbers (dates, prices, versions, times, ids, a table);
//! * `text_emoji`: prose with an emoji every third word;
//! * `text_devanagari`: Hindi prose, with Devanagari digits now and then;
//! * `redact_chat_2k`: [`pii::redact`] on the chat's texts (the request log's masking).

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use edgeroute_core::pii::{self, PiiSet};

#[path = "support/chat_text.rs"]
mod chat_text;
use chat_text::{chat_text, CHAT_2K};

/// The chat's words with every `every`-th replaced by the next of `inserts`.
fn sprinkled(every: usize, inserts: &[&str]) -> String {
    let text = chat_text();
    let mut out = String::with_capacity(text.len() * 2);
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if i % every == every - 1 {
            out.push_str(inserts[(i / every) % inserts.len()]);
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

fn numbers_text() -> String {
    let mut t = sprinkled(
        6,
        &[
            "2024",
            "$19.99",
            "v1.2.3",
            "12:30",
            "#4521",
            "3.14159",
            "15%",
            "2024-05-01",
            "10,000",
            "mp3",
            "h264",
            "utf8",
            "ab12",
            "x86_64",
            "1e-9",
            "404",
            "127.0.0.1",
            "8080",
            "ISO 8601",
            "id 98231",
            "de 12",
        ],
    );
    t.push_str("\n| id | qty | price |\n|----|-----|-------|\n");
    for i in 0..40 {
        t.push_str(&format!(
            "| {} | {} | {}.{:02} |\n",
            1000 + i * 37,
            i % 7,
            i * 13,
            i % 100
        ));
    }
    t
}

fn devanagari_text() -> String {
    let sentence = "कृपया मुझे बताइए कि यह अनुरोध किस सर्वर पर जाएगा और इसकी लागत कितनी होगी। \
                    पिछले महीने २०२४ में हमने १२ सेवाएँ बदलीं। ";
    sentence.repeat(10_000 / sentence.len() + 1)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    pii::warm_up();
    let json = std::str::from_utf8(CHAT_2K).expect("utf-8");
    let texts = [
        ("text_chat_2k", chat_text()),
        ("text_numbers", numbers_text()),
        ("text_emoji", sprinkled(3, &["🚀", "😀", "✅", "👍🏽", "🎉", "🇩🇪"])),
        ("text_devanagari", devanagari_text()),
    ];
    let mut g = c.benchmark_group("pii");
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("json_chat_2k", |b| {
        b.iter(|| pii::detect_json(black_box(json), PiiSet::default()))
    });
    for (name, text) in &texts {
        assert!(
            pii::detect(text, PiiSet::default()).is_empty(),
            "{name} has no personal data"
        );
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(*name, |b| b.iter(|| pii::detect(black_box(text), PiiSet::default())));
    }
    let text = &texts[0].1;
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("redact_chat_2k", |b| b.iter(|| pii::redact(black_box(text))));
    g.finish();
    c.final_summary();
}
