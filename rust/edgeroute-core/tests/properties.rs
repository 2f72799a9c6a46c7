//! Property tests of the router's guarantees: weights are honoured, an open
//! circuit is never the first choice while a healthy deployment is eligible,
//! and rewriting the model keeps the body valid and otherwise untouched.

use std::collections::BTreeMap;

use edgeroute_core::request::ChatRequest;
use edgeroute_core::{rewrite_model, RequestMeta, Router};
use proptest::prelude::*;
use serde_json::{json, Value};

const BODY: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

fn router(weights: &[u32], strategy: &str, max_ejected_percent: u32) -> Router {
    let deployments: Vec<Value> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| json!({"name": format!("d{i}"), "provider": "openai", "model": "gpt-4o-mini", "weight": w}))
        .collect();
    let names: Vec<String> = (0..weights.len()).map(|i| format!("d{i}")).collect();
    let spec = json!({
        "deployments": deployments,
        "models": [{"name": "m", "deployments": names, "strategy": strategy}],
        "health": {"max_ejected_percent": max_ejected_percent},
    });
    Router::from_json(spec.to_string().as_bytes()).expect("valid spec")
}

/// The request fields `ChatRequest::parse` reads.
const READ_FIELDS: [&str; 10] = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "best_of",
    "user",
    "tools",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Under the weighted strategy each deployment is chosen first in proportion
    /// to its weight: within 2% of all picks plus one (smooth weighted round
    /// robin is in fact exact over every full cycle of the total weight).
    #[test]
    fn weights_are_honoured(weights in prop::collection::vec(1u32..20, 1..8), cycles in 1usize..20) {
        let r = router(&weights, "weighted", 50);
        let total: u32 = weights.iter().sum();
        let picks = total as usize * cycles;
        let mut counts = vec![0usize; weights.len()];
        for _ in 0..picks {
            let d = r.decide(BODY, &RequestMeta::default()).unwrap();
            prop_assert_eq!(d.order.len(), weights.len());
            counts[d.order[0]] += 1;
        }
        for (i, &w) in weights.iter().enumerate() {
            let expected = picks as f64 * f64::from(w) / f64::from(total);
            let tolerance = picks as f64 * 0.02 + 1.0;
            prop_assert!(
                (counts[i] as f64 - expected).abs() <= tolerance,
                "deployment {} weight {} chosen {} times, expected {:.1} (weights {:?})", i, w, counts[i], expected, weights
            );
        }
    }

    /// Whatever the strategy and the ejection cap, a deployment whose circuit is
    /// open is never the first choice while some deployment of the route is
    /// healthy; open ones (tried past the cap, or failing open) come after every
    /// healthy one.
    #[test]
    fn open_circuits_are_not_chosen_first(
        weights in prop::collection::vec(1u32..10, 2..10),
        open_mask in prop::collection::vec(any::<bool>(), 10),
        strategy in prop::sample::select(vec!["weighted", "p2c_ewma", "lowest_cost", "least_busy"]),
        rounds in 1usize..30,
        max_ejected_percent in 0u32..=100,
    ) {
        let n = weights.len();
        let mut open: Vec<bool> = open_mask[..n].to_vec();
        if open.iter().all(|&o| o) {
            open[0] = false;
        }
        let r = router(&weights, strategy, max_ejected_percent);
        for (i, &o) in open.iter().enumerate() {
            if o {
                r.set_probe_result(i, false, 3_600_000);
            }
        }
        for _ in 0..rounds {
            let d = r.decide(BODY, &RequestMeta::default()).unwrap();
            prop_assert!(!open[d.order[0]], "chose open deployment {} ({:?}, open {:?})", d.order[0], strategy, open);
            let healthy = open.iter().filter(|&&o| !o).count();
            prop_assert!(d.order[..healthy].iter().all(|&i| !open[i]), "order {:?}, open {:?}", d.order, open);
        }
    }

    /// `rewrite_model` always yields valid JSON whose `model` is the new name and
    /// whose other fields are exactly the original ones, whatever the formatting
    /// and escaping of the body and of both names.
    #[test]
    fn rewrite_model_changes_only_the_model(
        old in any::<String>(),
        new in any::<String>(),
        content in any::<String>(),
        extra in prop::collection::btree_map("[a-z_]{1,8}", any::<i64>(), 0..4),
        model_first in any::<bool>(),
        pretty in any::<bool>(),
    ) {
        let mut fields: Vec<(String, Value)> = extra
            .into_iter()
            // Only fields the parser does not read: those it reads have types of their own
            // (a random integer `n` of 0 or `stream` of 5 is rightly a bad request).
            .filter(|(k, _)| !READ_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k, json!(v)))
            .collect();
        fields.push(("messages".into(), json!([{"role": "user", "content": content}])));
        let model = ("model".to_string(), json!(old));
        if model_first { fields.insert(0, model) } else { fields.push(model) }
        let original: serde_json::Map<String, Value> = fields.into_iter().collect();
        let body = if pretty {
            serde_json::to_vec_pretty(&original).unwrap()
        } else {
            serde_json::to_vec(&original).unwrap()
        };
        let req = ChatRequest::parse(&body).unwrap();
        prop_assert_eq!(req.model.as_ref(), old.as_str());
        let out = rewrite_model(&body, req.model_span, &new);
        let parsed: BTreeMap<String, Value> = serde_json::from_slice(&out).expect("valid JSON");
        prop_assert_eq!(&parsed["model"], &json!(new));
        for (k, v) in &original {
            if k != "model" {
                prop_assert_eq!(&parsed[k], v);
            }
        }
        prop_assert_eq!(parsed.len(), original.len());
        // Bytes outside the model value are untouched.
        prop_assert_eq!(&out[..req.model_span.0], &body[..req.model_span.0]);
        prop_assert_eq!(&out[out.len() - (body.len() - req.model_span.1)..], &body[req.model_span.1..]);
    }
}

/// Escaped forms of the model name (`\u` escapes, escaped slashes) are found
/// and replaced as a whole too.
#[test]
fn rewrite_model_handles_escaped_names() {
    let body = br#"{"messages":[{"role":"user","content":"x"}], "model" : "gpt\u002d4o\/mini" ,"n":1}"#;
    let req = ChatRequest::parse(body).unwrap();
    assert_eq!(req.model, "gpt-4o/mini");
    let out = rewrite_model(body, req.model_span, "a\"b");
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["model"], "a\"b");
    assert_eq!(v["n"], 1);
}
