//! Compiling a [`Router`] from its spec: deployments, routes, rules and priority classes
//! checked, and on a reload the health, latency history and budgets carried over.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::{Deployment, Route, Router, HISTOGRAM_PERIOD_MS};
use crate::budget::RetryBudget;
use crate::capacity::Limits;
use crate::classify::Classifier;
use crate::config::RouterSpec;
use crate::error::{CoreError, Result};
use crate::hedge::RotatingHistogram;
use crate::rules::Rules;
use crate::select::{FastRng, Swrr};
use crate::tokens::Encoding;

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
            // Each route hedges on its own requests (one pool for all let a busy route pay for
            // hedging every request of a quiet one); kept over reloads by name.
            let kept = previous.and_then(|p| p.route_by_name.get(&m.name).map(|&i| &p.routes[i]));
            let hedge_budget = kept.map(|r| r.hedge_budget.clone()).unwrap_or_default();
            // Retries too (one pool for all let a busy healthy route fund a retry of every
            // request of a quiet one whose provider is down: the storm the budget prevents). Kept
            // over a reload with its recent requests and retries, under the reload's settings.
            let retry_budget = kept.map_or_else(
                || Arc::new(RetryBudget::new(spec.retry_budget.clone())),
                |r| r.retry_budget.reloaded(&spec.retry_budget),
            );
            routes.push(Route {
                hedge_budget,
                retry_budget,
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
        let shifts = previous.map(|p| p.shifts.clone()).unwrap_or_default();
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
}
