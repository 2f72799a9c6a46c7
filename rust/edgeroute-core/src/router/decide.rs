//! The decision: its input ([`RequestMeta`]) and output ([`Decision`]), and the three
//! phases that make it (`resolve`, `order`, then the decision built here).

use std::time::{SystemTime, UNIX_EPOCH};

use super::resolve::Resolved;
use super::Router;
use crate::config::Strategy;
use crate::error::{CoreError, Result};
use crate::hedge::HedgeSpec;
use crate::request::ChatRequest;
use crate::tokens;

/// Caller facts that are not in the body.
#[derive(Debug, Default, Clone)]
pub struct RequestMeta {
    /// Tags from the `x-edgeroute-tags` header.
    pub tags: Vec<String>,
    /// The caller's team (from its key).
    pub team: Option<String>,
    /// The caller's role (from its key).
    pub role: Option<String>,
    /// Overrides the body's `user` when set.
    pub user: Option<String>,
    /// The prompt's token count when the caller already has it (an earlier
    /// attempt of the same body, a cache): the router then skips counting.
    pub prompt_tokens: Option<u32>,
    /// The caller's key id, for experiments sticky by key.
    pub key: Option<String>,
    /// What experiments sticky by user bucket a keyed caller by, in place of `user` (its key's
    /// user, salted by the caller so that its arm cannot be worked out offline); rules still
    /// see `user`.
    pub sticky: Option<String>,
    /// Count the prompt's tokens exactly even when routing does not need it (e.g. for budgets).
    pub exact_tokens: bool,
    /// Classify the prompt even when no rule or policy needs it, to explain the decision.
    pub explain: bool,
    /// The priority class the caller asked for (its key's, or a header its key may set);
    /// a matched rule's class comes first.
    pub priority: Option<String>,
    /// The highest class the caller's key may use (None: any, as without keys). A matched rule
    /// that does not name its sender (`users`, `teams`, `roles`) cannot raise the class above
    /// it: its other conditions (tags, content, the model) are the client's to choose.
    pub priority_ceiling: Option<String>,
}

/// The router's answer for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The public model the client asked for.
    pub model: String,
    /// The route (public model) that serves it after rules.
    pub route: String,
    /// The rule that matched, if any.
    pub rule: Option<String>,
    /// Why the rule matched (or why the default route applies).
    pub reasons: Vec<String>,
    /// Deployment indices to try, in order: the choice, then the fallbacks.
    pub order: Vec<usize>,
    /// Prompt tokens under the route's encoding: exact, or an estimate (see `tokens_exact`).
    pub prompt_tokens: u32,
    /// Whether `prompt_tokens` was counted exactly.
    pub tokens_exact: bool,
    /// Name of that encoding.
    pub encoding: &'static str,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the client asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// The client's completion-token limit.
    pub max_tokens: Option<u32>,
    /// Completions asked for (`n` / `best_of`), at least 1.
    pub choices: u32,
    /// Content parts other than text (images, audio, files): budgets reserve for them.
    pub other_parts: u32,
    /// The request's Predicted Output (`prediction`) as written, when it has one: budgets
    /// reserve for its tokens at the output price.
    pub prediction: Option<String>,
    /// The request's `service_tier` as written (JSON), when it names one.
    pub service_tier: Option<String>,
    /// Byte span of the `model` value in the body.
    pub model_span: (usize, usize),
    /// Send a hedge to `order[1]` after this many milliseconds without an answer.
    pub hedge_after_ms: Option<f64>,
    /// Selection strategy used.
    pub strategy: Strategy,
    /// Predicted task type, when the classifier ran.
    pub task: Option<&'static str>,
    /// Probability of that task type.
    pub task_confidence: Option<f64>,
    /// Predicted score of the strongest minus the weakest model of the router model:
    /// how much a strong model is expected to add (when the classifier ran).
    pub difficulty: Option<f64>,
    /// Predicted score per router-model output (LLM name), when the classifier ran.
    pub scores: Vec<(String, f64)>,
    /// How a policy route chose, if one did.
    pub policy: Option<String>,
    /// The experiment arm (route) this request was assigned to, if any.
    pub variant: Option<String>,
    /// The request's priority class, as its position in the configured classes (0: highest).
    pub priority: usize,
    /// Deployments passed over because they were at capacity for this class (placed
    /// after every deployment with room, so that they are tried, or waited for, last).
    pub spilled: Vec<usize>,
}

impl Router {
    /// Decides how to serve a chat-completions `body` now.
    pub fn decide(&self, body: &[u8], meta: &RequestMeta) -> Result<Decision> {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.decide_at(body, meta, self.now_ms(), unix)
    }

    /// [`Router::decide`] at an explicit time, for tests and replays.
    ///
    /// Three phases, in the order they run: [`Router::resolve_route`] (rules,
    /// experiments, policies: which public model serves), [`Router::order_chain`]
    /// (that route and its fallbacks, each in its strategy's order, health
    /// applied) and [`Router::build_decision`] (budgets, hedging, the explanation).
    pub fn decide_at(&self, body: &[u8], meta: &RequestMeta, now_ms: u64, unix_secs: u64) -> Result<Decision> {
        let req = ChatRequest::parse(body)?;
        let resolved = self.resolve_route(&req, meta, unix_secs)?;
        let (order, spilled) = self.order_chain(&req, &resolved, now_ms)?;
        Ok(self.build_decision(&req, resolved, order, spilled, now_ms))
    }

    /// Phase 3: the [`Decision`]. It funds neither the retry nor the hedge budget: a decision
    /// may be refused at admission, answered from the cache or only explained; what is sent
    /// upstream funds them ([`Router::fund_budgets`]).
    fn build_decision(
        &self,
        req: &ChatRequest<'_>,
        resolved: Resolved<'_>,
        order: Vec<usize>,
        spilled: Vec<usize>,
        now_ms: u64,
    ) -> Decision {
        let Resolved {
            route,
            matched,
            class,
            encoding,
            prompt_tokens,
            tokens_exact,
            strategy,
            variant,
            policy_note,
            priority,
            ..
        } = resolved;
        let hedge_after_ms = self.hedge_delay(route, &order, now_ms);
        let (rule, reasons) = match matched {
            Some(m) => (Some(self.rules.specs()[m.index].name.clone()), m.reasons),
            None => (None, vec![format!("default route for model={}", req.model)]),
        };
        Decision {
            model: req.model.to_string(),
            route: self.routes[route].spec.name.clone(),
            rule,
            reasons,
            order,
            prompt_tokens,
            tokens_exact,
            encoding: encoding.name(),
            stream: req.stream,
            include_usage: req.include_usage,
            max_tokens: req.max_tokens,
            choices: req.choices,
            other_parts: req.other_parts,
            prediction: req.prediction.map(|p| p.get().to_owned()),
            service_tier: req.service_tier.map(|t| t.get().to_owned()),
            model_span: req.model_span,
            hedge_after_ms,
            strategy,
            task: class.as_ref().map(|c| c.task.class.as_str()),
            task_confidence: class
                .as_ref()
                .map(|c| c.task.probabilities.iter().copied().fold(0.0, f64::max)),
            difficulty: class
                .as_ref()
                .zip(self.strong_weak)
                .map(|(c, (s, w))| c.scores[s] - c.scores[w]),
            scores: match (&class, &self.classifier) {
                (Some(c), Some(clf)) => clf
                    .router
                    .models()
                    .iter()
                    .cloned()
                    .zip(c.scores.iter().copied())
                    .collect(),
                _ => Vec::new(),
            },
            policy: policy_note,
            variant,
            priority,
            spilled,
        }
    }

    /// Exact prompt tokens of a chat body, under the encoding of the route it asks for.
    pub fn count_prompt(&self, body: &[u8]) -> Result<u32> {
        let req = ChatRequest::parse(body)?;
        let route = self
            .route_by_name
            .get(req.model.as_ref())
            .ok_or_else(|| CoreError::UnknownModel(req.model.to_string()))?;
        Ok(tokens::count_chat(&req, self.routes[*route].encoding) as u32)
    }

    fn hedge_delay(&self, route: usize, order: &[usize], now_ms: u64) -> Option<f64> {
        let spec: &HedgeSpec = self.routes[route].spec.hedge.as_ref()?;
        if order.len() < 2 {
            return None;
        }
        spec.delay_ms(&self.deployments[order[0]].latency, now_ms)
    }
}
