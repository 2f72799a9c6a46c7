//! The compiled router: one immutable object per config that turns a request
//! body into a [`Decision`], and takes a report after every attempt.
//!
//! Health, latency histograms and budgets live here too, behind `Arc`s, so that
//! a config reload ([`Router::reload`]) carries them over for deployments that
//! did not change.
//!
//! Its parts: `build` compiles a router from its spec (and carries state over on a
//! reload); `decide` makes a [`Decision`] in three phases, `resolve` (rules,
//! experiments, policies: which public model serves, with `policy` choosing for a
//! policy route), `order` (that route and its fallbacks in strategy order, and what a
//! rule bars) and the decision itself; `attempts` takes what the caller reports after
//! (outcomes, capacity slots, retry and hedge budgets); `text` is the prompt's text for
//! the classifier and the rules. The state and the lookups are here.

mod attempts;
mod build;
mod decide;
mod order;
mod policy;
mod resolve;
#[cfg(test)]
mod tests;
mod text;

pub use decide::{Decision, RequestMeta};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::budget::RetryBudget;
use crate::capacity::{Limits, Slots};
use crate::classify::Classifier;
use crate::config::{DeploymentSpec, HealthSpec, ModelSpec};
use crate::error::{CoreError, Result};
use crate::health::{Health, HealthSnapshot};
use crate::hedge::{HedgeBudget, RotatingHistogram};
use crate::policy::{FlatShifts, Shifts};
use crate::rules::Rules;
use crate::select::{FastRng, Swrr};
use crate::tokens::Encoding;

/// Completion tokens assumed when a request sets no `max_tokens`, for cost estimates.
pub const DEFAULT_COMPLETION_ESTIMATE: u32 = 512;
const HISTOGRAM_PERIOD_MS: u64 = 60_000;

#[derive(Debug)]
struct Deployment {
    spec: DeploymentSpec,
    /// Time-of-day price multiplier (f64 bits), set by the caller as price windows open and close.
    price_scale: AtomicU64,
    encoding: Encoding,
    health: Arc<Health>,
    latency: Arc<RotatingHistogram>,
    limits: Limits,
    slots: Arc<Slots>,
}

impl Deployment {
    /// USD for `prompt` tokens in and `completion` out, at the price in force now.
    fn estimated_cost(&self, prompt: u32, completion: f64) -> f64 {
        let scale = f64::from_bits(self.price_scale.load(Ordering::Relaxed));
        (f64::from(prompt) * self.spec.input_per_mtok + completion * self.spec.output_per_mtok) * scale / 1e6
    }
}

#[derive(Debug)]
struct Route {
    spec: ModelSpec,
    /// This route's own hedge budget (`Router::fund_budgets`, `Router::try_hedge`).
    hedge_budget: Arc<HedgeBudget>,
    /// This route's own retry budget (`Router::fund_budgets`, `Router::try_retry`).
    retry_budget: Arc<RetryBudget>,
    members: Vec<usize>,
    swrr: Swrr,
    /// Tokenizer for prompts asked of this route (its first deployment's, or its first candidate's).
    encoding: Encoding,
    /// Policy candidates as (route index, router-model output index).
    candidates: Vec<(usize, usize)>,
    /// Experiment variants as route indices.
    variants: Vec<usize>,
    /// Whether deciding a request for this route needs the classifier.
    needs_class: bool,
}

/// The compiled, immutable router.
#[derive(Debug)]
pub struct Router {
    deployments: Vec<Deployment>,
    by_name: HashMap<String, usize>,
    routes: Vec<Route>,
    route_by_name: HashMap<String, usize>,
    rules: Rules,
    health_spec: HealthSpec,
    rng: FastRng,
    epoch: Instant,
    classifier: Option<Arc<Classifier>>,
    /// (strong, weak) outputs of the router model by cost, for `difficulty`.
    strong_weak: Option<(usize, usize)>,
    shifts: Arc<Shifts>,
    /// The smallest known context window of any deployment, for deciding when to count exactly.
    smallest_window: Option<u32>,
    /// Priority class names, highest first.
    classes: Vec<String>,
    /// The rank of a request that names no class.
    default_class: usize,
}

impl Router {
    /// Scales deployment `index`'s prices by `multiplier` (e.g. 0.5 in an off-peak window),
    /// so that cost-aware selection and policies see the price in force now.
    pub fn set_price_multiplier(&self, index: usize, multiplier: f64) {
        self.deployments[index]
            .price_scale
            .store(multiplier.max(0.0).to_bits(), Ordering::Relaxed);
    }

    /// Sets the feedback-learning shifts added to predicted scores, per (task, route): the
    /// global ones, and per team those its requests see instead where its ratings made one.
    pub fn set_shifts(&self, shifts: FlatShifts, teams: HashMap<String, FlatShifts>) {
        self.shifts.replace(shifts, teams);
    }

    /// Whether the router can classify prompts.
    pub fn has_classifier(&self) -> bool {
        self.classifier.is_some()
    }

    /// Loads tokenizer tables now, so the first request does not pay for it.
    pub fn warm_up(&self) {
        let mut seen = Vec::new();
        for d in &self.deployments {
            if !seen.contains(&d.encoding) {
                d.encoding.warm_up();
                seen.push(d.encoding);
            }
        }
    }

    /// Milliseconds on the router's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Priority class names, highest first.
    pub fn priority_classes(&self) -> &[String] {
        &self.classes
    }

    /// Health of deployment `index` now.
    pub fn health(&self, index: usize) -> HealthSnapshot {
        self.deployments[index].health.snapshot(self.now_ms())
    }

    /// Whether deployment `index` serves this process's traffic well now (`Health::serving_well`).
    pub fn serving_well(&self, index: usize) -> bool {
        self.deployments[index]
            .health
            .serving_well(self.now_ms(), &self.health_spec)
    }

    /// Number of deployments.
    pub fn deployment_count(&self) -> usize {
        self.deployments.len()
    }

    /// The spec of deployment `index`.
    pub fn deployment(&self, index: usize) -> &DeploymentSpec {
        &self.deployments[index].spec
    }

    /// Index of the deployment called `name`.
    pub fn deployment_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Public model names, in config order.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.spec.name.as_str())
    }

    /// Tokens in `text` under the named encoding.
    pub fn count_tokens(text: &str, encoding: &str) -> Result<usize> {
        Encoding::from_name(encoding)
            .map(|e| e.count(text))
            .ok_or_else(|| CoreError::BadRequest(format!("unknown encoding `{encoding}`")))
    }
}
