//! The compiled router: one immutable object per config that turns a request
//! body into a [`Decision`], and takes a report after every attempt.
//!
//! Health, latency histograms and budgets live here too, behind `Arc`s, so that
//! a config reload ([`Router::reload`]) carries them over for deployments that
//! did not change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::budget::RetryBudget;
use crate::capacity::{Limits, Slots};
use crate::classify::{Classification, Classifier};
use crate::config::{DeploymentSpec, HealthSpec, ModelSpec, RouterSpec, Strategy};
use crate::error::{CoreError, Result};
use crate::health::{Health, HealthSnapshot, Outcome};
use crate::hedge::{HedgeBudget, HedgeSpec, RotatingHistogram};
use crate::policy::{self, Scored, Shifts};
use crate::request::ChatRequest;
use crate::rules::{Action, LazyTokens, RuleInput, RuleMatch, Rules};
use crate::select::{self, Candidate, FastRng, Swrr};
use crate::tokens::{self, Encoding};

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
    /// Count the prompt's tokens exactly even when routing does not need it (e.g. for budgets).
    pub exact_tokens: bool,
    /// Classify the prompt even when no rule or policy needs it, to explain the decision.
    pub explain: bool,
    /// The priority class the caller asked for (its key's, or a header its key may set);
    /// a matched rule's class comes first.
    pub priority: Option<String>,
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

/// The compiled, immutable router.
#[derive(Debug)]
pub struct Router {
    deployments: Vec<Deployment>,
    by_name: HashMap<String, usize>,
    routes: Vec<Route>,
    route_by_name: HashMap<String, usize>,
    rules: Rules,
    health_spec: HealthSpec,
    retry_budget: Arc<RetryBudget>,
    hedge_budget: Arc<HedgeBudget>,
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
    /// Compiles a router from a spec.
    pub fn new(spec: RouterSpec) -> Result<Self> {
        Self::build(spec, None, None)
    }

    /// Compiles a router that can classify prompts (task type, per-model scores),
    /// as policy routes, `tasks` rule conditions and explanations need.
    pub fn with_classifier(spec: RouterSpec, classifier: Classifier) -> Result<Self> {
        Self::build(spec, None, Some(Arc::new(classifier)))
    }

    /// Compiles a router from its JSON form.
    pub fn from_json(json: &[u8]) -> Result<Self> {
        Self::new(Self::spec_from_json(json)?)
    }

    /// Reads a [`RouterSpec`] from JSON.
    pub fn spec_from_json(json: &[u8]) -> Result<RouterSpec> {
        serde_json::from_slice(json).map_err(|e| CoreError::Config(e.to_string()))
    }

    /// Compiles `spec` as a replacement for `self`, keeping the health, latency
    /// history and budgets of deployments whose provider and model are unchanged.
    pub fn reload(&self, spec: RouterSpec) -> Result<Self> {
        Self::build(spec, Some(self), self.classifier.clone())
    }

    /// [`Router::reload`] with new classification models.
    pub fn reload_with_classifier(&self, spec: RouterSpec, classifier: Option<Classifier>) -> Result<Self> {
        Self::build(spec, Some(self), classifier.map(Arc::new))
    }

    fn build(spec: RouterSpec, previous: Option<&Router>, classifier: Option<Arc<Classifier>>) -> Result<Self> {
        let mut by_name = HashMap::new();
        let mut deployments = Vec::with_capacity(spec.deployments.len());
        for d in spec.deployments {
            if by_name.insert(d.name.clone(), deployments.len()).is_some() {
                return Err(CoreError::Config(format!("deployment `{}` is declared twice", d.name)));
            }
            let encoding = match &d.encoding {
                Some(e) => Encoding::from_name(e)
                    .ok_or_else(|| CoreError::Config(format!("deployment `{}`: unknown encoding `{e}`", d.name)))?,
                None => Encoding::for_model(&d.model),
            };
            let kept = previous.and_then(|p| {
                p.by_name
                    .get(&d.name)
                    .map(|&i| &p.deployments[i])
                    .filter(|o| o.spec.provider == d.provider && o.spec.model == d.model)
            });
            let (health, latency, slots) = match kept {
                Some(o) => (o.health.clone(), o.latency.clone(), o.slots.clone()),
                None => (
                    Arc::default(),
                    Arc::new(RotatingHistogram::new(HISTOGRAM_PERIOD_MS)),
                    Arc::default(),
                ),
            };
            if d.max_concurrency == Some(0) || d.reserve_percent > 100 {
                return Err(CoreError::Config(format!(
                    "deployment `{}`: max_concurrency must be at least 1 and reserve_percent at most 100",
                    d.name
                )));
            }
            deployments.push(Deployment {
                price_scale: AtomicU64::new(1f64.to_bits()),
                limits: Limits::new(d.max_concurrency, d.reserve_percent),
                slots,
                spec: d,
                encoding,
                health,
                latency,
            });
        }
        let mut route_by_name = HashMap::new();
        let mut routes = Vec::with_capacity(spec.models.len());
        for m in spec.models {
            if route_by_name.insert(m.name.clone(), routes.len()).is_some() {
                return Err(CoreError::Config(format!("model `{}` is declared twice", m.name)));
            }
            let members = m
                .deployments
                .iter()
                .map(|d| {
                    by_name
                        .get(d)
                        .copied()
                        .ok_or_else(|| CoreError::Config(format!("model `{}`: unknown deployment `{d}`", m.name)))
                })
                .collect::<Result<Vec<_>>>()?;
            let chooser = m.policy.is_some() || m.experiment.is_some();
            if members.is_empty() != chooser {
                return Err(CoreError::Config(format!(
                    "model `{}` needs either deployments or a policy/experiment, not both",
                    m.name
                )));
            }
            routes.push(Route {
                swrr: Swrr::new(members.len()),
                encoding: members
                    .first()
                    .map_or(Encoding::O200kBase, |&i| deployments[i].encoding),
                members,
                candidates: Vec::new(),
                variants: Vec::new(),
                needs_class: false,
                spec: m,
            });
        }
        Self::link_choosers(&mut routes, &route_by_name, classifier.as_deref())?;
        for r in &routes {
            for f in r.spec.fallbacks.iter().chain(&r.spec.context_window_fallbacks) {
                if !route_by_name.contains_key(f) {
                    return Err(CoreError::Config(format!(
                        "model `{}`: unknown fallback model `{f}`",
                        r.spec.name
                    )));
                }
            }
        }
        let rules = Rules::compile(spec.rules)?;
        let classes = spec.priority_classes;
        let rank = |name: &str| classes.iter().position(|c| c == name);
        let default_class = match &spec.default_priority {
            Some(n) => rank(n).ok_or_else(|| CoreError::Config(format!("unknown default priority class `{n}`")))?,
            None => classes.len().saturating_sub(1),
        };
        for r in rules.specs() {
            let named = r.then.priority.iter().chain(&r.when.priority);
            if let Some(p) = named.map(String::as_str).find(|p| rank(p).is_none()) {
                return Err(CoreError::Config(format!(
                    "rule `{}`: unknown priority class `{p}`",
                    r.name
                )));
            }
        }
        for r in rules.specs() {
            if let Some(route) = &r.then.route {
                if !route_by_name.contains_key(route) {
                    return Err(CoreError::Config(format!("rule `{}`: unknown route `{route}`", r.name)));
                }
            }
            for d in &r.then.deployments {
                if !by_name.contains_key(d) {
                    return Err(CoreError::Config(format!(
                        "rule `{}`: unknown deployment `{d}`",
                        r.name
                    )));
                }
            }
        }
        let (retry_budget, hedge_budget, shifts) = match previous {
            Some(p) => (p.retry_budget.clone(), p.hedge_budget.clone(), p.shifts.clone()),
            None => (
                Arc::new(RetryBudget::new(spec.retry_budget)),
                Arc::default(),
                Arc::default(),
            ),
        };
        if rules.needs_task() && classifier.is_none() {
            return Err(CoreError::Config(
                "a rule uses `tasks` but no task model is loaded".into(),
            ));
        }
        // A rule may send any request to a policy route: then every request may need the classifier.
        let rules_reach_policy = rules.specs().iter().any(|r| {
            r.then
                .route
                .as_ref()
                .is_some_and(|n| routes[route_by_name[n]].needs_class)
        });
        if rules.needs_task() || rules_reach_policy {
            for r in &mut routes {
                r.needs_class = true;
            }
        }
        let strong_weak = classifier.as_ref().and_then(|c| {
            let costs = c.router.costs();
            let strong = (0..costs.len()).max_by(|&a, &b| costs[a].total_cmp(&costs[b]))?;
            let weak = (0..costs.len()).min_by(|&a, &b| costs[a].total_cmp(&costs[b]))?;
            (strong != weak).then_some((strong, weak))
        });
        let epoch = previous.map_or_else(Instant::now, |p| p.epoch);
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Ok(Self {
            by_name,
            routes,
            route_by_name,
            rules,
            health_spec: spec.health,
            retry_budget,
            hedge_budget,
            rng: FastRng::new(seed),
            epoch,
            smallest_window: deployments
                .iter()
                .map(|d| d.spec.context_window)
                .filter(|&w| w > 0)
                .min(),
            classifier,
            strong_weak,
            shifts,
            deployments,
            classes,
            default_class,
        })
    }

    /// Resolves policy candidates and experiment variants to routes, and gives
    /// chooser routes the encoding of the routes they choose among.
    fn link_choosers(routes: &mut [Route], by_name: &HashMap<String, usize>, clf: Option<&Classifier>) -> Result<()> {
        let lookup = |routes: &[Route], owner: &str, route: &str, what: &str, policy_ok: bool| -> Result<usize> {
            let &t = by_name
                .get(route)
                .ok_or_else(|| CoreError::Config(format!("model `{owner}`: unknown {what} route `{route}`")))?;
            let ok = !routes[t].members.is_empty() || (policy_ok && routes[t].spec.policy.is_some());
            if !ok {
                return Err(CoreError::Config(format!(
                    "model `{owner}`: {what} route `{route}` must have deployments"
                )));
            }
            Ok(t)
        };
        // Policies first: an experiment may compare a policy route with a fixed one.
        for i in 0..routes.len() {
            let Some(p) = routes[i].spec.policy.clone() else {
                continue;
            };
            let name = routes[i].spec.name.clone();
            let clf = clf.ok_or_else(|| {
                CoreError::Config(format!("model `{name}` has a policy but no router model is loaded"))
            })?;
            let mut candidates = Vec::new();
            for c in &p.candidates {
                let out = clf.router.models().iter().position(|m| *m == c.model).ok_or_else(|| {
                    CoreError::Config(format!(
                        "model `{name}`: the router model has no output `{}` (it has {:?})",
                        c.model,
                        clf.router.models()
                    ))
                })?;
                candidates.push((lookup(routes, &name, &c.route, "candidate", false)?, out));
            }
            routes[i].encoding = routes[candidates[0].0].encoding;
            routes[i].needs_class = true;
            routes[i].candidates = candidates;
        }
        for i in 0..routes.len() {
            let Some(e) = routes[i].spec.experiment.clone() else {
                continue;
            };
            let name = routes[i].spec.name.clone();
            let variants = e
                .variants
                .iter()
                .map(|v| lookup(routes, &name, &v.route, "variant", true))
                .collect::<Result<Vec<_>>>()?;
            routes[i].encoding = routes[variants[0]].encoding;
            routes[i].needs_class = variants.iter().any(|&v| routes[v].needs_class);
            routes[i].variants = variants;
        }
        Ok(())
    }

    /// Scales deployment `index`'s prices by `multiplier` (e.g. 0.5 in an off-peak window),
    /// so that cost-aware selection and policies see the price in force now.
    pub fn set_price_multiplier(&self, index: usize, multiplier: f64) {
        self.deployments[index]
            .price_scale
            .store(multiplier.max(0.0).to_bits(), Ordering::Relaxed);
    }

    /// Sets the feedback-learning shifts added to predicted scores, per (task, route).
    pub fn set_shifts(&self, shifts: HashMap<(String, String), f64>) {
        self.shifts.replace(shifts);
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

    /// Phase 1: the route that serves `req`, after rules, experiments, policies and
    /// context-window fallbacks, with the prompt's tokens and the classification.
    fn resolve_route(&self, req: &ChatRequest<'_>, meta: &RequestMeta, unix_secs: u64) -> Result<Resolved<'_>> {
        let requested = *self
            .route_by_name
            .get(req.model.as_ref())
            .ok_or_else(|| CoreError::UnknownModel(req.model.to_string()))?;
        let encoding = self.routes[requested].encoding;
        let bounds = tokens::bound_chat(req, encoding);
        let count = || tokens::count_chat(req, encoding) as u32;
        let lazy = match meta.prompt_tokens {
            Some(n) => LazyTokens::known(n),
            None if meta.exact_tokens => LazyTokens::known(count()),
            None => LazyTokens::lazy(bounds.upper as u32, &count),
        };

        // Classification costs tens of microseconds: run it only when something uses it.
        let class = match &self.classifier {
            Some(c) if meta.explain || self.routes[requested].needs_class => Some(c.classify(&user_text(req))),
            _ => None,
        };
        let text = if self.rules.needs_text() {
            prompt_text(req)
        } else {
            String::new()
        };
        let user = meta.user.as_deref().or(req.user.as_deref());
        // The class the caller asked for, else the default one (rules may route classes apart).
        let asked = meta
            .priority
            .as_deref()
            .and_then(|p| self.classes.iter().position(|c| c == p))
            .unwrap_or(self.default_class);
        let input = RuleInput {
            model: &req.model,
            tags: &meta.tags,
            user,
            team: meta.team.as_deref(),
            role: meta.role.as_deref(),
            prompt_tokens: lazy,
            text: &text,
            body: Some(req.json),
            unix_secs,
            task: class.as_ref().map(|c| c.task.class.as_str()),
            task_confidence: class
                .as_ref()
                .map(|c| c.task.probabilities.iter().copied().fold(0.0, f64::max)),
            priority: self.classes.get(asked).map(String::as_str),
        };
        let matched = self.rules.evaluate(&input);
        let (prompt_tokens, tokens_exact) = self.settle_tokens(&input.prompt_tokens, bounds, req.max_tokens);
        let action = matched.as_ref().map(|m| &self.rules.specs()[m.index].then);
        if let Some(msg) = action.and_then(|a| a.reject.as_ref()) {
            return Err(CoreError::Forbidden(msg.clone()));
        }
        let mut route = action
            .and_then(|a| a.route.as_ref())
            .map_or(requested, |r| self.route_by_name[r]);
        let needed = prompt_tokens.saturating_add(req.max_tokens.unwrap_or(0));
        // Experiments and policies choose the route that serves (rules come first).
        let mut variant = None;
        if let Some(exp) = &self.routes[route].spec.experiment {
            let sticky = match exp.sticky {
                policy::Sticky::User => user.or(meta.key.as_deref()),
                policy::Sticky::Key => meta.key.as_deref().or(user),
            };
            let arm = match sticky {
                Some(k) => exp.variant_for(k),
                None => exp.variant_for(&self.rng.below(1 << 30).to_string()),
            };
            route = self.routes[route].variants[arm];
            variant = Some(self.routes[route].spec.name.clone());
        }
        let mut policy_note = None;
        if let (Some(p), Some(c)) = (&self.routes[route].spec.policy, &class) {
            let (chosen, note) = self.apply_policy(route, p.threshold, c, needed, req.max_tokens, action);
            route = chosen;
            policy_note = Some(note);
        }
        // A prompt too long for every deployment of the route goes to its context-window fallback.
        if !self.routes[route]
            .members
            .iter()
            .any(|&i| fits(&self.deployments[i].spec, needed))
        {
            if let Some(f) = self.routes[route].spec.context_window_fallbacks.iter().find(|f| {
                self.routes[self.route_by_name[*f]]
                    .members
                    .iter()
                    .any(|&i| fits(&self.deployments[i].spec, needed))
            }) {
                route = self.route_by_name[f];
            }
        }
        let strategy = action
            .and_then(|a| a.strategy)
            .unwrap_or(self.routes[route].spec.strategy);
        let priority = action
            .and_then(|a| a.priority.as_deref())
            .and_then(|p| self.classes.iter().position(|c| c == p))
            .unwrap_or(asked);
        Ok(Resolved {
            priority,
            route,
            matched,
            action,
            class,
            encoding,
            prompt_tokens,
            tokens_exact,
            needed,
            strategy,
            variant,
            policy_note,
        })
    }

    /// Phase 2: the deployments to try, in order: the route's, then each fallback
    /// route's, each ordered by its strategy; ejected ones last when nothing else is left.
    fn order_chain(
        &self,
        req: &ChatRequest<'_>,
        resolved: &Resolved<'_>,
        now_ms: u64,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        let route = resolved.route;
        let mut chain = vec![route];
        for f in &self.routes[route].spec.fallbacks {
            let i = self.route_by_name[f];
            if !chain.contains(&i) {
                chain.push(i);
            }
        }
        let ctx = OrderContext {
            action: resolved.action,
            needed: resolved.needed,
            max_tokens: req.max_tokens,
            now_ms,
            top_class: resolved.priority == 0,
        };
        let mut out = Chain::default();
        for (pos, &r) in chain.iter().enumerate() {
            let strategy = if pos == 0 {
                resolved.strategy
            } else {
                self.routes[r].spec.strategy
            };
            self.order_route(r, strategy, &ctx, &mut out);
        }
        // Full deployments after every one with room; then, failing open, the ejected ones.
        let Chain {
            mut order,
            ejected,
            full,
            reason,
        } = out;
        order.extend_from_slice(&full);
        for i in ejected {
            if !order.contains(&i) {
                order.push(i);
            }
        }
        if order.is_empty() {
            return Err(CoreError::NoDeployment {
                model: req.model.to_string(),
                reason: if reason.is_empty() {
                    "every deployment was excluded".into()
                } else {
                    reason
                },
            });
        }
        Ok((order, full))
    }

    /// Phase 3: the [`Decision`], after the budgets took note of the request.
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
        self.retry_budget.deposit(now_ms);
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

    /// The prompt's tokens after the rules ran: exact if they (or the caller)
    /// counted them or a context window is within reach of the hard upper bound,
    /// otherwise estimated, since BPE over a long prompt costs far more than the
    /// rest of the decision and the upstream's usage settles the bill anyway.
    fn settle_tokens(
        &self,
        lazy: &LazyTokens<'_>,
        bounds: tokens::TokenBounds,
        max_tokens: Option<u32>,
    ) -> (u32, bool) {
        if let Some(n) = lazy.computed() {
            return (n, true);
        }
        let worst = (bounds.upper as u64).saturating_add(u64::from(max_tokens.unwrap_or(0)));
        match self.smallest_window {
            Some(w) if worst > u64::from(w) => (lazy.get(), true),
            _ => (bounds.estimate as u32, false),
        }
    }

    /// The cheapest candidate of policy route `r` whose predicted score (plus its
    /// feedback shift) reaches `threshold`; returns the route and an explanation.
    /// Only candidates with a deployment the matched rule's `action` allows compete (a rule
    /// keeping tagged requests to some deployments must not leave the policy choosing a route
    /// with none of them, which would refuse a request another candidate can serve); when
    /// no candidate has one, all compete and ordering reports why nothing can serve.
    fn apply_policy(
        &self,
        r: usize,
        threshold: f64,
        c: &Classification,
        needed: u32,
        max_tokens: Option<u32>,
        action: Option<&Action>,
    ) -> (usize, String) {
        let task = c.task.class.as_str();
        let allowed = |route: usize| match action {
            None => true,
            Some(a) => self.routes[route]
                .members
                .iter()
                .any(|&i| barred(a, &self.deployments[i].spec).is_none()),
        };
        let score = |(i, &(route, out)): (usize, &(usize, usize))| Scored {
            candidate: i,
            cost: self.cheapest_cost(route, needed, max_tokens),
            score: c.scores[out] + self.shifts.get(task, &self.routes[route].spec.name),
        };
        let candidates = &self.routes[r].candidates;
        let mut scored: Vec<Scored> = candidates
            .iter()
            .enumerate()
            .filter(|&(_, &(route, _))| allowed(route))
            .map(score)
            .collect();
        if scored.is_empty() {
            scored = candidates.iter().enumerate().map(score).collect();
        }
        let chosen = policy::cheapest_sufficient(&scored, threshold).expect("a policy has candidates");
        let route = self.routes[r].candidates[chosen.candidate].0;
        let verdict = if chosen.score >= threshold {
            "cheapest with"
        } else {
            "none reached the threshold; best"
        };
        let note = format!(
            "{}: {verdict} predicted score {:.2} (threshold {threshold:.2}) -> {}",
            self.routes[r].spec.name, chosen.score, self.routes[route].spec.name
        );
        (route, note)
    }

    fn cheapest_cost(&self, route: usize, needed: u32, max_tokens: Option<u32>) -> f64 {
        let completion = f64::from(max_tokens.unwrap_or(DEFAULT_COMPLETION_ESTIMATE));
        self.routes[route]
            .members
            .iter()
            .map(|&i| self.deployments[i].estimated_cost(needed, completion))
            .fold(f64::INFINITY, f64::min)
    }

    /// Appends route `r`'s eligible deployments to `out.order` in `strategy`'s order
    /// (the circuit-open ones beyond the panic threshold to `out.ejected`).
    fn order_route(&self, r: usize, strategy: Strategy, ctx: &OrderContext<'_>, out: &mut Chain) {
        let OrderContext {
            action,
            needed,
            max_tokens,
            now_ms,
            top_class,
        } = *ctx;
        let route = &self.routes[r];
        let mut cands = Vec::with_capacity(route.members.len());
        let mut locals = Vec::with_capacity(route.members.len());
        let mut unavailable = Vec::new();
        for (local, &i) in route.members.iter().enumerate() {
            let d = &self.deployments[i];
            if out.order.contains(&i) || out.full.contains(&i) {
                continue;
            }
            if let Some(why) = action.and_then(|a| barred(a, &d.spec).map(|b| (a, b))) {
                match why {
                    (_, Barred::NotListed) => {}
                    (a, Barred::LacksTags) => {
                        out.reason = format!("no deployment has the required tags {:?}", a.require_tags);
                    }
                    (a, Barred::ExcludedTag) => {
                        out.reason = format!("deployments tagged {:?} are excluded", a.exclude_tags);
                    }
                }
                continue;
            }
            if !fits(&d.spec, needed) {
                out.reason = format!("the request needs {needed} tokens, more than the context window");
                continue;
            }
            if !d.health.available(now_ms) {
                unavailable.push(i);
                continue;
            }
            if !d.slots.has_room(d.limits, top_class) {
                // Busy, not failing: spill over to the next deployment, health untouched.
                out.full.push(i);
                continue;
            }
            let completion = f64::from(max_tokens.unwrap_or(DEFAULT_COMPLETION_ESTIMATE));
            let cost = d.estimated_cost(needed, completion);
            cands.push(Candidate {
                index: i,
                weight: d.spec.weight,
                cost,
                load: d.health.load_score(),
                in_flight: d.health.in_flight(),
                latency_ms: if strategy == Strategy::Fastest {
                    d.health.latency_ms()
                } else {
                    0.0
                },
            });
            locals.push(local);
        }
        // Never eject more than the configured share of a route: beyond it, the
        // ejected deployments are tried after the healthy ones (Envoy's panic threshold).
        let total = cands.len() + unavailable.len();
        let cap = total * self.health_spec.max_ejected_percent as usize / 100;
        select::order(strategy, &mut cands, &locals, &route.swrr, &self.rng);
        out.order.extend(cands.iter().map(|c| c.index));
        if unavailable.len() > cap {
            out.order.extend(unavailable.drain(..unavailable.len() - cap));
        }
        out.ejected.extend(unavailable);
    }

    fn hedge_delay(&self, route: usize, order: &[usize], now_ms: u64) -> Option<f64> {
        let spec: &HedgeSpec = self.routes[route].spec.hedge.as_ref()?;
        if order.len() < 2 {
            return None;
        }
        self.hedge_budget.note_request();
        spec.delay_ms(&self.deployments[order[0]].latency, now_ms)
    }

    /// Asks the hedge budget for one hedge of a request on `route`; call when the hedge timer fires.
    pub fn try_hedge(&self, route: &str) -> bool {
        let pct = self
            .route_by_name
            .get(route)
            .and_then(|&r| self.routes[r].spec.hedge.as_ref())
            .map_or(0.0, |h| h.budget_percent);
        self.hedge_budget.try_take(pct)
    }

    /// Asks the retry budget for one retry.
    pub fn try_retry(&self) -> bool {
        self.retry_budget.try_withdraw(self.now_ms())
    }

    /// Takes a capacity slot on deployment `index` (an attempt starts).
    pub fn acquire(&self, index: usize) {
        self.deployments[index].slots.acquire();
    }

    /// Gives back a capacity slot on deployment `index` (the answer was read).
    pub fn release(&self, index: usize) {
        self.deployments[index].slots.release();
    }

    /// Whether deployment `index` has a free slot for a request of class rank `priority`.
    pub fn has_room(&self, index: usize, priority: usize) -> bool {
        let d = &self.deployments[index];
        d.slots.has_room(d.limits, priority == 0)
    }

    /// Requests in flight on deployment `index`, and its `max_concurrency`.
    pub fn slots(&self, index: usize) -> (u32, Option<u32>) {
        let d = &self.deployments[index];
        (d.slots.active(), d.limits.max)
    }

    /// Priority class names, highest first.
    pub fn priority_classes(&self) -> &[String] {
        &self.classes
    }

    /// Marks an attempt on deployment `index` as started.
    pub fn begin(&self, index: usize) {
        self.deployments[index].health.begin(self.now_ms());
    }

    /// Reports the end of an attempt on deployment `index`.
    pub fn report(&self, index: usize, outcome: Outcome, latency_ms: f64) {
        let now = self.now_ms();
        let d = &self.deployments[index];
        d.health.report(outcome, latency_ms, now, &self.health_spec);
        if outcome == Outcome::Success {
            d.latency.record(latency_ms, now);
        }
    }

    /// A stream on deployment `index`, reported a success at its first content, broke later.
    pub fn report_broken_stream(&self, index: usize) {
        self.deployments[index]
            .health
            .fail_after_success(self.now_ms(), &self.health_spec);
    }

    /// Takes a deployment out or puts it back after an active health check.
    pub fn set_probe_result(&self, index: usize, healthy: bool, eject_ms: u64) {
        let d = &self.deployments[index];
        if healthy {
            d.health.restore();
        } else {
            d.health.eject_for(eject_ms, self.now_ms());
        }
    }

    /// Health of deployment `index` now.
    pub fn health(&self, index: usize) -> HealthSnapshot {
        self.deployments[index].health.snapshot(self.now_ms())
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

/// What phase 1 of a decision settled: the route that serves, and why.
struct Resolved<'r> {
    route: usize,
    matched: Option<RuleMatch>,
    action: Option<&'r Action>,
    class: Option<Classification>,
    /// The tokenizer of the route the client asked for (what `prompt_tokens` counts in).
    encoding: Encoding,
    prompt_tokens: u32,
    tokens_exact: bool,
    /// Prompt plus completion tokens, against context windows.
    needed: u32,
    strategy: Strategy,
    variant: Option<String>,
    policy_note: Option<String>,
    /// The priority class's rank (0: highest).
    priority: usize,
}

/// What ordering reads for every route of the chain.
#[derive(Clone, Copy)]
struct OrderContext<'r> {
    /// The matched rule's action: its deployments and tags narrow every route.
    action: Option<&'r Action>,
    needed: u32,
    max_tokens: Option<u32>,
    now_ms: u64,
    /// Whether the request is of the highest class (which may use reserved capacity).
    top_class: bool,
}

/// The chain's order as it is built.
#[derive(Default)]
struct Chain {
    order: Vec<usize>,
    /// Circuit-open deployments kept back, tried only when nothing else is left.
    ejected: Vec<usize>,
    /// Deployments without a free slot for the request's class, tried after the others.
    full: Vec<usize>,
    /// Why the last deployment was excluded, for the error when none is left.
    reason: String,
}

fn fits(d: &DeploymentSpec, needed: u32) -> bool {
    d.context_window == 0 || needed <= d.context_window
}

/// Why a matched rule's action keeps a deployment from serving.
enum Barred {
    /// Not among the action's `deployments`.
    NotListed,
    /// Missing one of its `require_tags`.
    LacksTags,
    /// Carrying one of its `exclude_tags`.
    ExcludedTag,
}

fn barred(a: &Action, d: &DeploymentSpec) -> Option<Barred> {
    if !a.deployments.is_empty() && !a.deployments.contains(&d.name) {
        Some(Barred::NotListed)
    } else if !a.require_tags.iter().all(|t| has_tag(d, t)) {
        Some(Barred::LacksTags)
    } else if a.exclude_tags.iter().any(|t| has_tag(d, t)) {
        Some(Barred::ExcludedTag)
    } else {
        None
    }
}

fn has_tag(d: &DeploymentSpec, tag: &str) -> bool {
    d.tags.iter().any(|t| t == tag) || tag.strip_prefix("provider:").is_some_and(|p| p == d.provider)
}

/// The text of the user's messages: what the classifier was trained on.
fn user_text(req: &ChatRequest<'_>) -> String {
    let mut text = String::new();
    for m in req.messages.iter().filter(|m| m.role == "user") {
        m.for_each_text(|t| {
            text.push_str(t);
            text.push('\n');
        });
    }
    text
}

fn prompt_text(req: &ChatRequest<'_>) -> String {
    let mut len = 0;
    for m in &req.messages {
        m.for_each_text(|t| len += t.len() + 1);
    }
    let mut text = String::with_capacity(len);
    for m in &req.messages {
        m.for_each_text(|t| {
            text.push_str(t);
            text.push('\n');
        });
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_windows_reorder_lowest_cost() {
        let router = Router::from_json(
            br#"{"deployments": [
                {"name": "cheap", "provider": "p", "model": "m", "input_per_mtok": 1, "output_per_mtok": 1},
                {"name": "dear", "provider": "p", "model": "m", "input_per_mtok": 4, "output_per_mtok": 4}],
              "models": [{"name": "m", "deployments": ["cheap", "dear"], "strategy": "lowest_cost"}]}"#,
        )
        .unwrap();
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let first = |r: &Router| {
            r.deployment(r.decide(body, &RequestMeta::default()).unwrap().order[0])
                .name
                .clone()
        };
        assert_eq!(first(&router), "cheap");
        // An off-peak window at a tenth of the price makes `dear` the cheaper one now.
        router.set_price_multiplier(1, 0.1);
        assert_eq!(first(&router), "dear");
    }

    const CAPACITY: &[u8] = br#"{"deployments": [
            {"name": "a", "provider": "p", "model": "m", "weight": 100, "max_concurrency": 5, "reserve_percent": 40},
            {"name": "b", "provider": "p", "model": "m", "weight": 1},
            {"name": "c", "provider": "p", "model": "m"}],
          "models": [{"name": "m", "deployments": ["a", "b"], "fallbacks": ["n"]},
                     {"name": "n", "deployments": ["c"]}],
          "rules": [{"name": "bulk", "when": {"tags": ["bulk"]}, "then": {"priority": "batch"}}],
          "priority_classes": ["interactive", "default", "batch"]}"#;
    const BODY: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

    fn decide_as(r: &Router, priority: Option<&str>, tags: &[&str]) -> Decision {
        let meta = RequestMeta {
            priority: priority.map(str::to_owned),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            ..RequestMeta::default()
        };
        r.decide(BODY, &meta).unwrap()
    }

    #[test]
    fn a_full_deployment_is_tried_last_and_its_health_is_untouched() {
        let r = Router::from_json(CAPACITY).unwrap();
        assert_eq!(decide_as(&r, None, &[]).order[0], 0);
        for _ in 0..5 {
            r.acquire(0);
        }
        let d = decide_as(&r, Some("interactive"), &[]);
        // The route's other deployment, then the fallback's, then the full one.
        assert_eq!((d.order, d.spilled, d.priority), (vec![1, 2, 0], vec![0], 0));
        assert_eq!(r.health(0).failures, 0);
        r.release(0);
        assert_eq!(decide_as(&r, Some("interactive"), &[]).order[0], 0);
        assert_eq!(r.slots(0), (4, Some(5)));
    }

    #[test]
    fn the_reserve_is_kept_for_the_highest_class_and_rules_set_the_class() {
        let r = Router::from_json(CAPACITY).unwrap();
        for _ in 0..3 {
            r.acquire(0);
        }
        // 40 % of 5 is kept for `interactive`: `default` (the last class unless named) and `batch` spill.
        assert_eq!(decide_as(&r, Some("interactive"), &[]).spilled, Vec::<usize>::new());
        assert_eq!(decide_as(&r, Some("default"), &[]).spilled, vec![0]);
        let bulk = decide_as(&r, Some("interactive"), &["bulk"]);
        assert_eq!((bulk.priority, bulk.spilled), (2, vec![0]));
        assert!(r.has_room(0, 0) && !r.has_room(0, 1));
    }

    #[test]
    fn a_reload_keeps_the_counts_and_bad_capacities_are_refused() {
        let r = Router::from_json(CAPACITY).unwrap();
        r.acquire(0);
        let again = r.reload(Router::spec_from_json(CAPACITY).unwrap()).unwrap();
        assert_eq!(again.slots(0), (1, Some(5)));
        again.release(0);
        again.release(0); // never below zero
        assert_eq!(r.slots(0), (0, Some(5)));
        let zero = String::from_utf8_lossy(CAPACITY).replace("\"max_concurrency\": 5", "\"max_concurrency\": 0");
        assert!(Router::from_json(zero.as_bytes()).is_err());
        let class = String::from_utf8_lossy(CAPACITY).replace("\"priority\": \"batch\"", "\"priority\": \"bulk\"");
        let err = Router::from_json(class.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("unknown priority class `bulk`"), "{err}");
    }
}
