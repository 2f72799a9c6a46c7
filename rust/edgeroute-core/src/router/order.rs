//! Phase 2 of a decision: the deployments to try, in order (the route's, then its
//! fallbacks'), and which deployments a matched rule bars.

use super::resolve::Resolved;
use super::{Router, DEFAULT_COMPLETION_ESTIMATE};
use crate::config::{DeploymentSpec, Strategy};
use crate::error::{CoreError, Result};
use crate::request::ChatRequest;
use crate::rules::Action;
use crate::select::{self, Candidate};

impl Router {
    /// Whether the matched rule's `action` lets deployment `i` serve.
    pub(super) fn member_allowed(&self, i: usize, action: Option<&Action>) -> bool {
        action.map_or(true, |a| barred(a, &self.deployments[i].spec).is_none())
    }

    /// Whether route `r` has a deployment the matched rule's `action` lets serve (the choices
    /// made before ordering, by experiments, policies and context fallbacks, prefer such routes).
    pub(super) fn route_allowed(&self, r: usize, action: Option<&Action>) -> bool {
        self.routes[r].members.iter().any(|&i| self.member_allowed(i, action))
    }

    /// Phase 2: the deployments to try, in order: the route's, then each fallback
    /// route's, each ordered by its strategy; ejected ones last when nothing else is left.
    pub(super) fn order_chain(
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
            if let Some(window) = self.too_long(&chain, ctx.action, ctx.needed) {
                return Err(CoreError::ContextTooLong {
                    model: req.model.to_string(),
                    needed: ctx.needed,
                    window,
                });
            }
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

    /// The largest context window of the deployments of `chain` that `action` allows, when
    /// `needed` is over every one of them (none unbounded): the request can never be served,
    /// whatever their health, so it is the client's error rather than an outage.
    fn too_long(&self, chain: &[usize], action: Option<&Action>, needed: u32) -> Option<u32> {
        let mut largest = None;
        for &r in chain {
            for &i in &self.routes[r].members {
                let d = &self.deployments[i].spec;
                if action.is_some_and(|a| barred(a, d).is_some()) {
                    continue;
                }
                if fits(d, needed) {
                    return None;
                }
                largest = largest.max(Some(d.context_window));
            }
        }
        largest
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

pub(super) fn fits(d: &DeploymentSpec, needed: u32) -> bool {
    d.context_window == 0 || needed <= d.context_window
}

/// Why a matched rule's action keeps a deployment from serving.
pub(super) enum Barred {
    /// Not among the action's `deployments`.
    NotListed,
    /// Missing one of its `require_tags`.
    LacksTags,
    /// Carrying one of its `exclude_tags`.
    ExcludedTag,
}

pub(super) fn barred(a: &Action, d: &DeploymentSpec) -> Option<Barred> {
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
