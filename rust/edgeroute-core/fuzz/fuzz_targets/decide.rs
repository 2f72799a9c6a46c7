//! The whole decision on arbitrary bytes, with rules of every content kind: a
//! decision with a non-empty order or a typed client/route error; never a panic.
#![no_main]

use std::sync::LazyLock;

use edgeroute_core::{CoreError, RequestMeta, Router};
use libfuzzer_sys::fuzz_target;

static ROUTER: LazyLock<Router> = LazyLock::new(|| {
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
});

fuzz_target!(|data: &[u8]| {
    let meta = RequestMeta {
        exact_tokens: data.len() % 2 == 0,
        ..RequestMeta::default()
    };
    match ROUTER.decide(data, &meta) {
        Ok(d) => assert!(!d.order.is_empty()),
        Err(e @ (CoreError::Config(_) | CoreError::ModelFile(_) | CoreError::ModelInput(_))) => {
            panic!("load-time error on a request: {e}")
        }
        Err(_) => {}
    }
});
