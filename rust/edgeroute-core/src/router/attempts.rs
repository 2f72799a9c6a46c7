//! What the caller reports between decisions: an attempt's start and outcome, active health
//! checks, the capacity slots attempts take, and the retry and hedge budgets they spend.

use super::Router;
use crate::health::Outcome;

impl Router {
    /// Asks `route`'s hedge budget for one hedge of a request; call when the hedge timer fires.
    pub fn try_hedge(&self, route: &str) -> bool {
        let Some(r) = self.route_by_name.get(route).map(|&r| &self.routes[r]) else {
            return false;
        };
        let pct = r.spec.hedge.as_ref().map_or(0.0, |h| h.budget_percent);
        r.hedge_budget.try_take(pct, self.now_ms())
    }

    /// Funds `route`'s retry budget, and its hedge budget, with one request sent on to its
    /// deployments (a dispatch): not a refusal, not a cache hit, not an explanation, which send
    /// nothing upstream (funded at decision time, 400 refused or cached requests bought retries
    /// and hedges that then hammered a failing or slow upstream). A route without hedging, or
    /// with one deployment, funds no hedge; an unknown route funds nothing. Call once a
    /// request, as it dispatches.
    pub fn fund_budgets(&self, route: &str) {
        let Some(r) = self.route_by_name.get(route).map(|&r| &self.routes[r]) else {
            return;
        };
        let now_ms = self.now_ms();
        r.retry_budget.deposit(now_ms);
        if r.spec.hedge.is_some() && r.members.len() >= 2 {
            r.hedge_budget.note_request(now_ms);
        }
    }

    /// Asks `route`'s retry budget (funded by that route's dispatches alone, as Envoy's and
    /// Finagle's budgets are per destination) for one retry of a request it decided; `false`
    /// for an unknown route.
    pub fn try_retry(&self, route: &str) -> bool {
        self.route_by_name
            .get(route)
            .is_some_and(|&r| self.routes[r].retry_budget.try_withdraw(self.now_ms()))
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

    /// Marks an attempt on deployment `index` as started.
    pub fn begin(&self, index: usize) {
        self.deployments[index].health.begin(self.now_ms());
    }

    /// Marks an attempt of `sender` on deployment `index` as started (after the deployment's
    /// ejection for that sender alone, it is that sender's probe).
    pub fn begin_for(&self, index: usize, sender: u64) {
        self.deployments[index]
            .health
            .begin_sender(self.now_ms(), sender, self.health_spec.ewma_decay_ms);
    }

    /// Whether some deployment may be ejected for a sender alone (one atomic read): else no
    /// request need ask [`Router::ejected_for`].
    pub fn any_sender_ejection(&self) -> bool {
        crate::health::any_sender_ejection()
    }

    /// Whether deployment `index` is ejected for `sender` alone now: its requests skip it as if
    /// its circuit were open.
    pub fn ejected_for(&self, index: usize, sender: u64) -> bool {
        self.deployments[index].health.ejected_for(sender, self.now_ms())
    }

    /// Reports the end of an attempt on deployment `index`, sent by `sender` (the virtual key's
    /// team or key, hashed; 0: unknown). Returns the sender the deployment was just ejected for
    /// alone (its failures alone tripped while other senders were seen lately).
    pub fn report(&self, index: usize, outcome: Outcome, latency_ms: f64, sender: u64) -> Option<u64> {
        let now = self.now_ms();
        let d = &self.deployments[index];
        let withheld = d.health.report(outcome, latency_ms, sender, now, &self.health_spec);
        if outcome == Outcome::Success {
            d.latency.record(latency_ms, now);
        }
        withheld
    }

    /// Reports the end of an attempt of `sender` on deployment `index` cancelled after
    /// `elapsed_ms` because a hedge race's other attempt answered first, instead of
    /// [`Router::report`]; `answering`: its response head had come (see
    /// [`crate::health::Health::report_lost_race`]). Returns the sender ejected alone.
    pub fn report_lost_race(&self, index: usize, elapsed_ms: f64, answering: bool, sender: u64) -> Option<u64> {
        self.deployments[index]
            .health
            .report_lost_race(elapsed_ms, answering, sender, self.now_ms(), &self.health_spec)
    }

    /// Keeps selection off deployment `index` for `ms`: its provider limit has no request left.
    pub fn hold_for_limit(&self, index: usize, ms: u64) {
        self.deployments[index].health.hold_for_limit(ms, self.now_ms());
    }

    /// Ends deployment `index`'s provider-limit hold (its last take was given back).
    pub fn end_limit_hold(&self, index: usize) {
        self.deployments[index].health.end_limit_hold();
    }

    /// A stream of `sender` on deployment `index`, reported a success at its first content,
    /// broke later. Returns the sender ejected alone as [`Router::report`] does.
    pub fn report_broken_stream(&self, index: usize, sender: u64) -> Option<u64> {
        self.deployments[index]
            .health
            .fail_after_success(sender, self.now_ms(), &self.health_spec)
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
}
