//! Corpus-driven mutation fuzzing of the core's untrusted-input entry points, time-boxed
//! for CI: the request parser, the whole decision on arbitrary bytes, the
//! pretokenizers, the JSON text scan and PII redaction. Each must return (never
//! panic) and every decision error must be a typed client error, never a config error.
//!
//! `EDGEROUTE_FUZZ_SECS` sets the time box (default 3 s per target); the seed is
//! printed so that a failure can be replayed with `EDGEROUTE_FUZZ_SEED`. The
//! coverage-guided version of the same targets is the cargo-fuzz crate in `fuzz/`.

use std::time::{Duration, Instant};

use edgeroute_core::request::ChatRequest;
use edgeroute_core::{pii, pretokenize, CoreError, RequestMeta, Router};

/// Valid and nearly valid requests the mutations start from.
const SEEDS: &[&str] = &[
    r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#,
    r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"mail a@b.io"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"n":2}"#,
    r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"pay","arguments":"{\"card\":\"4111 1111 1111 1111\",\"n\":\"a\\nb\"}"}}]},{"role":"tool","tool_call_id":"c","content":"ok"}],"tools":[{"type":"function","function":{"name":"pay","description":"pays","parameters":{"type":"object"}}}]}"#,
    r#"{"model":"m","messages":[{"role":"user","content":"\u00e9\ud83d\ude80 \\ \" TICKET-42 123-45-6789"}],"user":"u1"}"#,
    r#"{"model":"big","messages":[{"role":"user","content":"x"}],"max_completion_tokens":4000000000}"#,
    r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
    r#"[{"model":"m"}]"#,
    "",
];

/// Byte strings that often break parsers when spliced in.
const TOKENS: &[&str] = &[
    "\"",
    "\\",
    "\\u",
    "\\ud800",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "-0",
    "1e999",
    "\u{0}",
    "\u{FEFF}",
    "🚀",
    "\u{301}",
    "\"model\":",
    "\"messages\":[",
    "\"content\":[",
    "\"tool_calls\":[",
    "99999999999999999999",
];

fn router() -> Router {
    Router::from_json(
        br#"{
      "deployments": [
        {"name": "a", "provider": "openai", "model": "m", "context_window": 100},
        {"name": "b", "provider": "azure", "model": "m", "tags": ["privacy:high"]}
      ],
      "models": [{"name": "m", "deployments": ["a", "b"], "fallbacks": ["big"]},
                 {"name": "big", "deployments": ["b"]}],
      "rules": [
        {"name": "pii", "priority": 3, "when": {"pii": ["email", "payment_card", "national_id"]}, "then": {"require_tags": ["privacy:high"]}},
        {"name": "ticket", "priority": 2, "when": {"patterns": ["TICKET-\\d+"], "keywords": ["refund"]}, "then": {"route": "big"}},
        {"name": "long", "priority": 1, "when": {"min_tokens": 50}, "then": {"reject": "too long"}}
      ]
    }"#,
    )
    .expect("config compiles")
}

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(6) {
            0 if !input.is_empty() => {
                let i = at.min(input.len() - 1);
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(input.len());
                input.drain(at.min(end)..end);
            }
            2 => {
                let b = (rng.next() & 0xFF) as u8;
                input.insert(at, b);
            }
            3 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                input.splice(at..at, t.iter().copied());
            }
            4 => {
                // Duplicate a slice (deep nesting, repeated fields).
                let end = (at + rng.below(64)).min(input.len());
                let copy = input[at..end].to_vec();
                input.splice(at..at, copy);
            }
            _ => {
                let other = SEEDS[rng.below(SEEDS.len())].as_bytes();
                let cut = rng.below(other.len() + 1);
                input.truncate(at);
                input.extend_from_slice(&other[cut..]);
            }
        }
    }
}

fn budget() -> Duration {
    let secs = std::env::var("EDGEROUTE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// Runs `check` on mutated seeds until the time box ends; returns the number of inputs.
fn fuzz(name: &str, mut check: impl FnMut(&[u8])) -> usize {
    let seed = std::env::var("EDGEROUTE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.as_nanos() as u64 ^ u64::from(std::process::id())
        });
    println!("{name}: seed {seed}");
    let mut rng = Rng(seed | 1);
    for s in SEEDS {
        check(s.as_bytes());
    }
    let end = Instant::now() + budget();
    let mut n = 0;
    while Instant::now() < end {
        let mut input = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
        for _ in 0..1 + rng.below(8) {
            mutate(&mut rng, &mut input);
            check(&input);
            n += 1;
        }
    }
    println!("{name}: {n} inputs");
    n
}

#[test]
fn request_parser_never_panics_and_rejects_cleanly() {
    let n = fuzz("parse", |input| match ChatRequest::parse(input) {
        Ok(req) => {
            assert!(!req.messages.is_empty());
            assert!(req.model_span.1 <= input.len() && req.model_span.0 < req.model_span.1);
            assert_eq!(input[req.model_span.0], b'"');
        }
        Err(CoreError::BadRequest(msg)) => assert!(!msg.is_empty()),
        Err(e) => panic!("not a client error: {e:?} for {:?}", String::from_utf8_lossy(input)),
    });
    assert!(n > 0);
}

#[test]
fn decide_on_arbitrary_bytes_never_panics() {
    let router = router();
    router.warm_up();
    let metas = [
        RequestMeta::default(),
        RequestMeta {
            exact_tokens: true,
            explain: true,
            tags: vec!["x".into()],
            ..RequestMeta::default()
        },
    ];
    let mut i = 0;
    let n = fuzz("decide", |input| {
        i += 1;
        match router.decide(input, &metas[i % 2]) {
            Ok(d) => assert!(!d.order.is_empty()),
            Err(CoreError::BadRequest(_) | CoreError::UnknownModel(_) | CoreError::Forbidden(_)) => {}
            Err(CoreError::NoDeployment { reason, .. }) => assert!(!reason.is_empty()),
            Err(CoreError::ContextTooLong { needed, window, .. }) => assert!(needed > window),
            Err(e @ (CoreError::Config(_) | CoreError::ModelFile(_) | CoreError::ModelInput(_))) => panic!("{e:?}"),
        }
        let _ = router.count_prompt(input);
    });
    assert!(n > 0);
}

#[test]
fn text_scanners_never_panic() {
    fuzz("text", |input| {
        let text = String::from_utf8_lossy(input);
        assert!(pretokenize::o200k_base(&text).map(str::len).sum::<usize>() == text.len());
        assert!(pretokenize::cl100k_base(&text).map(str::len).sum::<usize>() == text.len());
        let redacted = pii::redact(&text);
        assert!(redacted.len() <= text.len() + 64 * text.len().max(1));
        let mut out = String::new();
        edgeroute_core::json_text::collect(&text, &mut out);
        let _ = pii::detect_json(&text, pii::PiiSet::default());
    });
}
