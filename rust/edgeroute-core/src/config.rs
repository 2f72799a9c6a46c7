//! The router's input: a plain, serde-readable description of deployments,
//! public models and rules. The Python side validates the user's YAML (with
//! file/path-precise errors) and hands the core this already-normalised form as
//! JSON; a Rust embedder can build it directly.

use serde::Deserialize;

/// Everything a [`crate::Router`] is compiled from.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RouterSpec {
    /// Concrete model deployments at providers.
    pub deployments: Vec<DeploymentSpec>,
    /// Public model names that clients ask for.
    pub models: Vec<ModelSpec>,
    /// Routing rules, evaluated by priority (highest first), first match wins.
    #[serde(default)]
    pub rules: Vec<crate::rules::RuleSpec>,
    /// Retry throttling: each route's own budget, under these settings.
    #[serde(default)]
    pub retry_budget: RetryBudgetSpec,
    /// Passive health and circuit-breaking settings.
    #[serde(default)]
    pub health: HealthSpec,
    /// Priority class names, highest first; the first may use capacity kept in reserve.
    #[serde(default)]
    pub priority_classes: Vec<String>,
    /// The class of a request that names none (its rule's, or the caller's); the last class when absent.
    #[serde(default)]
    pub default_priority: Option<String>,
}

/// One model served by one provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Unique name, used in headers, logs and health reports.
    pub name: String,
    /// The provider this deployment is called through.
    pub provider: String,
    /// The model name the upstream expects.
    pub model: String,
    /// Relative share of traffic under the weighted strategy.
    #[serde(default = "one")]
    pub weight: u32,
    /// USD per million prompt tokens.
    #[serde(default)]
    pub input_per_mtok: f64,
    /// USD per million completion tokens.
    #[serde(default)]
    pub output_per_mtok: f64,
    /// Largest prompt plus completion the model accepts, in tokens (0: unknown).
    #[serde(default)]
    pub context_window: u32,
    /// Free-form labels such as `region:eu` or `privacy:high`; `provider:<name>` is implied.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Tokenizer used to count this deployment's prompts (see [`crate::tokens::Encoding`]).
    #[serde(default)]
    pub encoding: Option<String>,
    /// Requests in flight at most; a full deployment is passed over (see [`crate::capacity`]).
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    /// Share of `max_concurrency` (percent) that only the highest priority class may use.
    #[serde(default)]
    pub reserve_percent: u32,
}

fn one() -> u32 {
    1
}

/// How a deployment is picked among the eligible ones.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Smooth weighted round robin over `weight`.
    #[default]
    Weighted,
    /// Power of two random choices over peak-EWMA latency times in-flight load.
    P2cEwma,
    /// The cheapest deployment first.
    LowestCost,
    /// The deployment with the fewest requests in flight.
    LeastBusy,
    /// The lowest recent latency first (peak EWMA of answered attempts; for a stream that
    /// is its time to first token). One not yet measured comes first, so it gets measured.
    Fastest,
}

impl Strategy {
    /// The name used in config files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Weighted => "weighted",
            Self::P2cEwma => "p2c_ewma",
            Self::LowestCost => "lowest_cost",
            Self::LeastBusy => "least_busy",
            Self::Fastest => "fastest",
        }
    }
}

/// A public model name and the deployments behind it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The name clients send in `model`.
    pub name: String,
    /// Names of deployments that serve it.
    pub deployments: Vec<String>,
    /// Selection strategy among those deployments.
    #[serde(default)]
    pub strategy: Strategy,
    /// Other public models to fail over to, in order, when every deployment failed.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Public models to fail over to when the prompt exceeds the context window.
    #[serde(default)]
    pub context_window_fallbacks: Vec<String>,
    /// Hedging for this model; none when absent.
    #[serde(default)]
    pub hedge: Option<crate::hedge::HedgeSpec>,
    /// Cheapest-sufficient routing over other routes (then `deployments` is empty).
    #[serde(default)]
    pub policy: Option<crate::policy::PolicySpec>,
    /// A sticky A/B split between other routes (then `deployments` is empty).
    #[serde(default)]
    pub experiment: Option<crate::policy::ExperimentSpec>,
}

/// Retry throttling in the manner of tower's `retry::budget`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetSpec {
    /// Retries allowed as a fraction of recent first attempts.
    #[serde(default = "default_retry_ratio")]
    pub ratio: f64,
    /// Retries always allowed per second, so that low traffic can still retry.
    #[serde(default = "default_min_per_sec")]
    pub min_per_sec: u32,
    /// How long a deposit counts, in milliseconds.
    #[serde(default = "default_ttl_ms")]
    pub ttl_ms: u64,
}

fn default_retry_ratio() -> f64 {
    0.2
}
fn default_min_per_sec() -> u32 {
    10
}
fn default_ttl_ms() -> u64 {
    10_000
}

impl Default for RetryBudgetSpec {
    fn default() -> Self {
        Self {
            ratio: default_retry_ratio(),
            min_per_sec: default_min_per_sec(),
            ttl_ms: default_ttl_ms(),
        }
    }
}

/// Passive health checking (outlier detection) settings, after Envoy's defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// Consecutive failures that open the circuit.
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// First ejection time; doubles with each repeat up to `max_ejection_ms`.
    #[serde(default = "default_base_ejection")]
    pub base_ejection_ms: u64,
    /// Longest ejection.
    #[serde(default = "default_max_ejection")]
    pub max_ejection_ms: u64,
    /// Largest share of a model's deployments that may be ejected at once.
    #[serde(default = "default_max_ejected")]
    pub max_ejected_percent: u32,
    /// Time constant of the latency and error-rate EWMAs.
    #[serde(default = "default_decay")]
    pub ewma_decay_ms: u64,
    /// Error rate (EWMA, 0..1) that opens the circuit once `min_requests` were seen recently:
    /// catches a deployment that fails often but not `consecutive_failures` times in a row.
    #[serde(default = "default_failure_rate")]
    pub failure_rate: f64,
    /// Recent requests (decayed count) needed before the error rate can open the circuit.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// Hedge races lost in a row without an answer of its own (no response head, and at least
    /// `lost_race_factor` times its answered latency) from which each is a timeout for the
    /// circuit. A lost race was no failure: a deployment that accepted connections and never
    /// answered lost every race to its hedges, kept its circuit closed, and every request paid
    /// for it and waited the hedge delay on it, for good (red team, session 35).
    #[serde(default = "default_lost_races")]
    pub lost_races_in_a_row: u32,
    /// How much longer than its own answers' (peak-EWMA) latency a loser must have waited, with
    /// no response head, to count towards `lost_races_in_a_row`: a deployment slower than its
    /// hedge but answering in its usual time is not hung (the hedge delay is about its p95, the
    /// race ends when the hedge answers: a healthy loser has waited under twice its usual time).
    #[serde(default = "default_lost_race_factor")]
    pub lost_race_factor: f64,
}

fn default_lost_races() -> u32 {
    3
}
fn default_lost_race_factor() -> f64 {
    3.0
}

fn default_failure_rate() -> f64 {
    0.5
}
fn default_min_requests() -> u32 {
    20
}

fn default_consecutive() -> u32 {
    5
}
fn default_base_ejection() -> u64 {
    30_000
}
fn default_max_ejection() -> u64 {
    300_000
}
fn default_max_ejected() -> u32 {
    50
}
fn default_decay() -> u64 {
    10_000
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive(),
            base_ejection_ms: default_base_ejection(),
            max_ejection_ms: default_max_ejection(),
            max_ejected_percent: default_max_ejected(),
            ewma_decay_ms: default_decay(),
            failure_rate: default_failure_rate(),
            min_requests: default_min_requests(),
            lost_races_in_a_row: default_lost_races(),
            lost_race_factor: default_lost_race_factor(),
        }
    }
}
