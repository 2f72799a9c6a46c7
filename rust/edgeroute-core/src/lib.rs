//! # edgeroute-core
//!
//! The decision engine of the edgeroute LLM proxy, as a plain Rust library with
//! no Python in it. Give it a config ([`RouterSpec`]) and it compiles a
//! [`Router`]; give the router the raw bytes of an OpenAI chat-completions
//! request and it returns a [`Decision`]: the prompt's token count, the rule
//! that matched, the deployment to call and the fallback order, and when to
//! hedge. Report each attempt's outcome back ([`Router::report`]) and the
//! router keeps per-deployment health (peak-EWMA latency, error rate, circuit
//! breaker, rate-limit cool-down), a retry budget and a hedge budget.
//!
//! The router does no I/O: the caller (edgeroute's Python server, or your own
//! service) makes the upstream calls.
//!
//! ```
//! use edgeroute_core::{Router, RequestMeta};
//! let router = Router::from_json(br#"{
//!   "deployments": [
//!     {"name": "a", "provider": "openai", "model": "gpt-4o-mini", "weight": 3},
//!     {"name": "b", "provider": "azure", "model": "gpt-4o-mini", "weight": 1}
//!   ],
//!   "models": [{"name": "small", "deployments": ["a", "b"]}]
//! }"#).unwrap();
//! let body = br#"{"model":"small","messages":[{"role":"user","content":"hello world"}]}"#;
//! let exact = RequestMeta { exact_tokens: true, ..RequestMeta::default() };
//! let d = router.decide(body, &exact).unwrap();
//! assert_eq!(d.order.len(), 2);
//! assert_eq!(d.prompt_tokens, 9);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod body_faults;
pub mod budget;
pub mod capacity;
pub mod classify;
pub mod config;
pub mod content;
pub mod duplicate_keys;
pub mod error;
pub mod health;
pub mod hedge;
mod iban_case;
pub mod json_text;
mod needles;
mod phone_words;
pub mod pii;
pub mod policy;
pub mod pretokenize;
pub mod request;
pub mod router;
mod rule_gates;
pub mod rules;
mod scan_memo;
pub mod select;
mod senders;
pub mod tokens;
mod vocab;

pub use body_faults::body_faults;
pub use config::{DeploymentSpec, HealthSpec, ModelSpec, RetryBudgetSpec, RouterSpec, Strategy};
pub use duplicate_keys::duplicate_key;
pub use error::{CoreError, Result};
pub use health::{CircuitState, HealthSnapshot, Outcome};
pub use request::{model_parts, nesting_over, rewrite_model};
pub use router::{Decision, RequestMeta, Router};
pub use tokens::Encoding;
