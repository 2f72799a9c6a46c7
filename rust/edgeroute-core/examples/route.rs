//! Routes a few chat requests with edgeroute-core alone, no Python, and prints
//! each decision; then reports failures to show the circuit breaker at work.
//!
//! Run with `cargo run -p edgeroute-core --example route`.

use edgeroute_core::{rewrite_model, Outcome, RequestMeta, Router};

const CONFIG: &str = r#"{
  "deployments": [
    {"name": "openai-mini", "provider": "openai", "model": "gpt-4o-mini", "weight": 3,
     "input_per_mtok": 0.15, "output_per_mtok": 0.6, "context_window": 128000, "tags": ["region:us"]},
    {"name": "azure-mini-eu", "provider": "azure", "model": "gpt-4o-mini-2024-07-18", "weight": 1,
     "input_per_mtok": 0.165, "output_per_mtok": 0.66, "context_window": 128000, "tags": ["region:eu", "privacy:high"]},
    {"name": "openai-4o", "provider": "openai", "model": "gpt-4o",
     "input_per_mtok": 2.5, "output_per_mtok": 10.0, "context_window": 128000},
    {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4",
     "input_per_mtok": 3.0, "output_per_mtok": 15.0, "context_window": 200000}
  ],
  "models": [
    {"name": "small", "deployments": ["openai-mini", "azure-mini-eu"], "fallbacks": ["large"]},
    {"name": "large", "deployments": ["openai-4o", "claude"], "strategy": "lowest_cost",
     "hedge": {"delay_ms": 800}}
  ],
  "rules": [
    {"name": "pii-stays-in-eu", "priority": 100, "when": {"pii": ["email", "payment_card"]},
     "then": {"require_tags": ["privacy:high"]}},
    {"name": "code-to-large", "priority": 10, "when": {"keywords": ["def ", "fn ", "class "]},
     "then": {"route": "large"}},
    {"name": "long-to-large", "when": {"models": ["small"], "min_tokens": 2000}, "then": {"route": "large"}}
  ],
  "health": {"consecutive_failures": 3}
}"#;

fn show(router: &Router, label: &str, body: &str) {
    match router.decide(body.as_bytes(), &RequestMeta::default()) {
        Ok(d) => {
            let names: Vec<&str> = d.order.iter().map(|&i| router.deployment(i).name.as_str()).collect();
            println!("{label}");
            println!("  route {} via rule {:?} because {:?}", d.route, d.rule, d.reasons);
            println!(
                "  {} prompt tokens ({}), strategy {:?}, try {:?}",
                d.prompt_tokens, d.encoding, d.strategy, names
            );
            if let Some(ms) = d.hedge_after_ms {
                println!("  hedge to {} after {ms} ms", names[1]);
            }
            let upstream = rewrite_model(body.as_bytes(), d.model_span, &router.deployment(d.order[0]).model);
            println!("  upstream body: {}", String::from_utf8_lossy(&upstream));
        }
        Err(e) => println!("{label}\n  error: {e}"),
    }
}

fn main() {
    let router = Router::from_json(CONFIG.as_bytes()).expect("valid config");
    router.warm_up();

    show(
        &router,
        "plain question",
        r#"{"model":"small","messages":[{"role":"user","content":"What is a circuit breaker?"}]}"#,
    );
    show(
        &router,
        "plain question again (weights 3:1)",
        r#"{"model":"small","messages":[{"role":"user","content":"And a retry budget?"}]}"#,
    );
    show(
        &router,
        "contains an e-mail address",
        r#"{"model":"small","messages":[{"role":"system","content":"Be brief."},{"role":"user","name":"ann","content":"Write to jane@example.com"}]}"#,
    );
    show(
        &router,
        "contains code",
        r#"{"model":"small","messages":[{"role":"user","content":"Why does def f(): fail?"}]}"#,
    );
    show(
        &router,
        "unknown model",
        r#"{"model":"huge","messages":[{"role":"user","content":"hi"}]}"#,
    );

    // Three failures in a row open openai-mini's circuit: it drops to the back of the order.
    let mini = router.deployment_index("openai-mini").expect("declared");
    for _ in 0..3 {
        router.begin(mini);
        router.report(mini, Outcome::ServerError, 120.0, 0);
    }
    println!(
        "\nafter 3 server errors, openai-mini is {:?}",
        router.health(mini).circuit
    );
    show(
        &router,
        "plain question with openai-mini ejected",
        r#"{"model":"small","messages":[{"role":"user","content":"Still there?"}]}"#,
    );
}
