//! PII conditions see every byte a provider will see: personal data put at a
//! random position of any text of a random valid chat request — system prompts,
//! content parts, assistant tool-call arguments (JSON inside a string, escapes and
//! all), legacy `function_call`, tool results, tool definitions, JSON schemas —
//! makes the PII rule match; the same request without it does not.

use edgeroute_core::{RequestMeta, Router};
use proptest::prelude::*;
use serde_json::{json, Value};

const SAMPLES: [(&str, &str); 5] = [
    ("email", "jane.doe@example.co.uk"),
    ("phone", "+1 415-555-0132"),
    ("payment_card", "4111 1111 1111 1111"),
    ("iban", "GB82 WEST 1234 5698 7654 32"),
    ("national_id", "123-45-6789"),
];

fn router() -> Router {
    Router::from_json(
        br#"{
      "deployments": [
        {"name": "public", "provider": "openai", "model": "m"},
        {"name": "private", "provider": "azure", "model": "m", "tags": ["privacy:high"]}
      ],
      "models": [{"name": "m", "deployments": ["public", "private"]}],
      "rules": [{"name": "pii", "when": {"pii": ["email", "phone", "payment_card", "iban", "national_id"]},
                 "then": {"require_tags": ["privacy:high"]}}]
    }"#,
    )
    .expect("config compiles")
}

/// Text without personal data: words, escapes-to-be, non-ASCII.
fn filler() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z \n\t\"\\\\é東🚀]{0,16}").unwrap()
}

/// Free text or an array of text (and image) parts.
fn content() -> impl Strategy<Value = Value> {
    prop_oneof![
        filler().prop_map(Value::from),
        prop::collection::vec(
            prop_oneof![
                filler().prop_map(|t| json!({"type": "text", "text": t})),
                Just(json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})),
            ],
            1..3
        )
        .prop_map(Value::from),
    ]
}

/// Tool-call arguments as an object for now (made a JSON string at the end).
fn arguments() -> impl Strategy<Value = Value> {
    prop::collection::vec(
        (
            filler(),
            prop_oneof![filler().prop_map(Value::from), filler().prop_map(|t| json!([t]))],
        ),
        0..3,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (format!("k{}", k.len()), v)).collect()))
}

fn message() -> impl Strategy<Value = Value> {
    prop_oneof![
        content().prop_map(|c| json!({"role": "system", "content": c})),
        content().prop_map(|c| json!({"role": "user", "content": c})),
        (filler(), arguments()).prop_map(|(c, a)| json!({"role": "assistant", "content": c,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": a}}]})),
        arguments().prop_map(|a| json!({"role": "assistant", "content": null,
            "function_call": {"name": "lookup", "arguments": a}})),
        content().prop_map(|c| json!({"role": "tool", "tool_call_id": "call_1", "content": c})),
        filler().prop_map(|c| json!({"role": "function", "name": "lookup", "content": c})),
    ]
}

fn tool() -> impl Strategy<Value = Value> {
    (filler(), filler(), filler()).prop_map(|(d, pd, e)| {
        json!({"type": "function", "function": {"name": "lookup", "description": d,
            "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": pd, "enum": [e]}}}}})
    })
}

fn request() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(message(), 1..6),
        prop::collection::vec(tool(), 0..3),
        proptest::option::of(filler()),
    )
        .prop_map(|(messages, tools, schema_doc)| {
            let mut body = json!({"model": "m", "messages": messages});
            if !tools.is_empty() {
                body["tools"] = Value::from(tools);
            }
            if let Some(doc) = schema_doc {
                body["response_format"] = json!({"type": "json_schema",
                    "json_schema": {"name": "out", "schema": {"type": "object", "description": doc}}});
            }
            body
        })
}

/// Keys whose string values are identifiers or binary, not text a model reads.
fn is_text(key: Option<&str>) -> bool {
    !matches!(
        key,
        Some("role" | "type" | "name" | "id" | "tool_call_id" | "model" | "url")
    )
}

fn count_texts(v: &Value, key: Option<&str>) -> usize {
    match v {
        Value::String(_) => usize::from(is_text(key)),
        Value::Array(a) => a.iter().map(|x| count_texts(x, key)).sum(),
        Value::Object(o) => o.iter().map(|(k, x)| count_texts(x, Some(k))).sum(),
        _ => 0,
    }
}

/// Puts `pii` inside the `n`-th text, at the character position `at` (modulo its length).
fn plant(v: &mut Value, key: Option<&str>, n: &mut usize, pii: &str, at: usize) -> bool {
    match v {
        Value::String(s) if is_text(key) => {
            if *n > 0 {
                *n -= 1;
                return false;
            }
            let cuts: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
            let cut = cuts[at % cuts.len()];
            s.insert_str(cut, &format!(" {pii} "));
            true
        }
        Value::Array(a) => a.iter_mut().any(|x| plant(x, key, n, pii, at)),
        Value::Object(o) => o.iter_mut().any(|(k, x)| plant(x, Some(k.as_str()), n, pii, at)),
        _ => false,
    }
}

/// Tool-call arguments become the JSON strings the API carries.
fn encode_arguments(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "arguments" && x.is_object() {
                    *x = Value::from(x.to_string());
                } else {
                    encode_arguments(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(encode_arguments),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn pii_anywhere_in_a_request_matches_the_pii_rule(
        body in request(),
        slot in any::<prop::sample::Index>(),
        at in 0usize..64,
        sample in 0usize..SAMPLES.len(),
    ) {
        let router = router();
        let meta = RequestMeta::default();
        let mut clean = body.clone();
        encode_arguments(&mut clean);
        let d = router.decide(clean.to_string().as_bytes(), &meta).expect("a valid request decides");
        prop_assert_eq!(d.rule, None, "no PII planted: {}", clean);

        let texts = count_texts(&body, None);
        prop_assume!(texts > 0);
        let (kind, pii) = SAMPLES[sample];
        let mut planted = body;
        prop_assert!(plant(&mut planted, None, &mut slot.index(texts), pii, at));
        encode_arguments(&mut planted);
        let d = router.decide(planted.to_string().as_bytes(), &meta).expect("a valid request decides");
        prop_assert_eq!(d.rule.as_deref(), Some("pii"), "{} not seen in {}", kind, planted);
        prop_assert_eq!(&d.reasons, &vec![format!("pii={kind}")]);
        prop_assert_eq!(d.order, vec![1]);
    }
}

#[test]
fn the_issue_examples() {
    let router = router();
    let meta = RequestMeta::default();
    let decide = |body: Value| router.decide(body.to_string().as_bytes(), &meta).unwrap().rule;
    // An e-mail and a card number in an assistant's tool-call arguments.
    let args = json!({"to": "jane.doe@example.co.uk", "card": "4111 1111 1111 1111"}).to_string();
    assert_eq!(
        decide(json!({"model": "m", "messages": [
            {"role": "user", "content": "pay it"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "pay", "arguments": args}}]}]})),
        Some("pii".into())
    );
    // In a tool's description.
    assert_eq!(
        decide(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "mail",
                "description": "mails jane.doe@example.co.uk", "parameters": {"type": "object"}}}]})),
        Some("pii".into())
    );
    // A newline escape inside the arguments does not glue the card to an `n`.
    let args = json!({"note": "paid:\n4111 1111 1111 1111"}).to_string();
    assert!(args.contains("\\n4111"));
    assert_eq!(
        decide(json!({"model": "m", "messages": [{"role": "assistant", "content": null,
            "function_call": {"name": "note", "arguments": args}}]})),
        Some("pii".into())
    );
    // Embeddings' and responses' shapes are walked the same way (every string).
    for body in [
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "input": ["a", "call +1 415-555-0132"]}),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "instructions": "ssn 123-45-6789"}),
    ] {
        assert_eq!(decide(body), Some("pii".into()));
    }
    // Nothing personal: no match.
    assert_eq!(
        decide(json!({"model": "m", "messages": [{"role": "user", "content": "in 2024"}]})),
        None
    );
}
