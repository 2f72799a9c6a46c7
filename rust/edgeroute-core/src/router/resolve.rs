//! Phase 1 of a decision: the route that serves, after rules, experiments, policies
//! and context-window fallbacks, with the prompt's tokens and its classification.

use super::order::fits;
use super::text::{prompt_text, user_text};
use super::{RequestMeta, Router};
use crate::classify::Classification;
use crate::config::Strategy;
use crate::error::{CoreError, Result};
use crate::policy;
use crate::request::ChatRequest;
use crate::rules::{Action, LazyTokens, RuleInput, RuleMatch};
use crate::tokens::{self, Encoding};

impl Router {
    /// Phase 1: the route that serves `req`, after rules, experiments, policies and
    /// context-window fallbacks, with the prompt's tokens and the classification.
    pub(super) fn resolve_route(
        &self,
        req: &ChatRequest<'_>,
        meta: &RequestMeta,
        unix_secs: u64,
    ) -> Result<Resolved<'_>> {
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
        // The body's `user` is the client's own word. A keyed caller's rules see its key's user
        // alone (`users:` may grant a route or a priority class: a key without a user must not
        // claim another's); a keyless caller (a sidecar's app) has only the body's. Experiments
        // stay sticky by the body's user: a client choosing its own variant takes nothing.
        let body_user = meta.user.as_deref().or(req.user.as_deref());
        let user = if meta.key.is_some() {
            meta.user.as_deref()
        } else {
            body_user
        };
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
        let mut matched = self.rules.evaluate(&input);
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
                policy::Sticky::User => meta.sticky.as_deref().or(body_user).or(meta.key.as_deref()),
                policy::Sticky::Key => meta.key.as_deref().or(body_user),
            };
            let drawn;
            let key = match sticky {
                Some(k) => k,
                None => {
                    drawn = self.rng.below(1 << 30).to_string();
                    &drawn
                }
            };
            let arms = &self.routes[route].variants;
            let mut arm = exp.variant_for(key);
            // A variant the matched rule bars would refuse what another variant can serve.
            if !self.route_allowed(arms[arm], action) {
                arm = exp
                    .variant_among(key, |i| self.route_allowed(arms[i], action))
                    .unwrap_or(arm);
            }
            route = arms[arm];
            variant = Some(self.routes[route].spec.name.clone());
        }
        let mut policy_note = None;
        if let (Some(_), Some(c)) = (&self.routes[route].spec.policy, &class) {
            let (chosen, note) = self.apply_policy(route, c, needed, req.max_tokens, action, meta.team.as_deref());
            route = chosen;
            policy_note = Some(note);
        }
        // A prompt too long for every deployment of the route goes to its first context-window
        // fallback with a deployment it fits and the matched rule allows (else the first it
        // fits, so that the refusal says why).
        let fitting = |r: usize, ruled: bool| {
            self.routes[r]
                .members
                .iter()
                .any(|&i| fits(&self.deployments[i].spec, needed) && (!ruled || self.member_allowed(i, action)))
        };
        if !fitting(route, false) {
            let fallbacks = &self.routes[route].spec.context_window_fallbacks;
            let first = |ruled: bool| fallbacks.iter().find(|f| fitting(self.route_by_name[*f], ruled));
            if let Some(f) = first(true).or_else(|| first(false)) {
                route = self.route_by_name[f];
            }
        }
        let strategy = action
            .and_then(|a| a.strategy)
            .unwrap_or(self.routes[route].spec.strategy);
        let ruled = action
            .and_then(|a| a.priority.as_deref())
            .and_then(|p| self.classes.iter().position(|c| c == p));
        let priority = match (&mut matched, ruled) {
            (Some(m), Some(rank)) => self.rule_class(rank, m, meta.priority_ceiling.as_deref()),
            _ => asked,
        };
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

    /// The class (`rank`) a matched rule's `then.priority` gives. Lowered freely; raised above
    /// the `ceiling` the caller's key may use only by a rule that names its sender, else held
    /// at the ceiling, and the explanation says so.
    fn rule_class(&self, rank: usize, m: &mut RuleMatch, ceiling: Option<&str>) -> usize {
        let Some(top) = ceiling.and_then(|c| self.classes.iter().position(|x| x == c)) else {
            return rank;
        };
        if rank >= top || self.rules.specs()[m.index].when.names_sender() {
            return rank;
        }
        let (asked, held) = (&self.classes[rank], &self.classes[top]);
        m.reasons.push(format!(
            "priority {asked} held at {held}: the rule does not name its sender and the key may not use {asked}"
        ));
        top
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
}

/// What phase 1 of a decision settled: the route that serves, and why.
pub(super) struct Resolved<'r> {
    pub(super) route: usize,
    pub(super) matched: Option<RuleMatch>,
    pub(super) action: Option<&'r Action>,
    pub(super) class: Option<Classification>,
    /// The tokenizer of the route the client asked for (what `prompt_tokens` counts in).
    pub(super) encoding: Encoding,
    pub(super) prompt_tokens: u32,
    pub(super) tokens_exact: bool,
    /// Prompt plus completion tokens, against context windows.
    pub(super) needed: u32,
    pub(super) strategy: Strategy,
    pub(super) variant: Option<String>,
    pub(super) policy_note: Option<String>,
    /// The priority class's rank (0: highest).
    pub(super) priority: usize,
}
