//! A policy route's choice among its candidate routes, by predicted score and cost
//! (the scoring rule itself is [`crate::policy`]).

use super::{Router, DEFAULT_COMPLETION_ESTIMATE};
use crate::classify::Classification;
use crate::policy::{self, Scored};
use crate::rules::Action;

impl Router {
    /// The cheapest candidate of policy route `r` whose predicted score (plus its
    /// feedback shift for the caller's `team`) reaches the policy's threshold; returns the route
    /// and an explanation.
    /// Only candidates with a deployment the matched rule's `action` allows compete (a rule
    /// keeping tagged requests to some deployments must not leave the policy choosing a route
    /// with none of them, which would refuse a request another candidate can serve); when
    /// no candidate has one, all compete and ordering reports why nothing can serve.
    pub(super) fn apply_policy(
        &self,
        r: usize,
        c: &Classification,
        needed: u32,
        max_tokens: Option<u32>,
        action: Option<&Action>,
        team: Option<&str>,
    ) -> (usize, String) {
        let threshold = self.routes[r].spec.policy.as_ref().expect("a policy route").threshold;
        let task = c.task.class.as_str();
        let shifts = self.shifts.view(team); // the caller's team's ratings, and the operator's
        let allowed = |route: usize| self.route_allowed(route, action);
        let score = |(i, &(route, out)): (usize, &(usize, usize))| Scored {
            candidate: i,
            cost: self.cheapest_cost(route, needed, max_tokens),
            score: c.scores[out] + shifts.get(task, &self.routes[route].spec.name),
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
}
