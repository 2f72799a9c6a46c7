//! Model-selection policies: "the cheapest model that is good enough" over a
//! learned router, sticky A/B experiments, and the bounded score shifts that
//! feedback learning applies.
//!
//! A policy route (for example the public model `auto`) has no deployments of
//! its own: it chooses among candidate routes, each tied to one output (LLM) of
//! the router model, whose predicted score for the prompt says how well that
//! route is expected to answer. Candidates are tried from the cheapest up; the
//! first whose score (plus its feedback shift) reaches the threshold wins. If
//! none does, the best-scoring one wins, since quality is the constraint and
//! cost the objective.

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard};

use serde::Deserialize;

/// A candidate of a policy route.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyCandidate {
    /// The route (public model) that serves when this candidate is chosen.
    pub route: String,
    /// The router model's output (LLM name) that predicts this route's quality.
    pub model: String,
}

/// Cheapest-sufficient routing settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Candidate routes.
    pub candidates: Vec<PolicyCandidate>,
    /// Lowest predicted score (0..1) that counts as good enough.
    pub threshold: f64,
}

/// How a sticky experiment assigns a request to a variant.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    /// By the end user (`user` field or header), falling back to the key.
    #[default]
    User,
    /// By the caller's API key.
    Key,
}

/// One arm of an experiment.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// The route serving this arm.
    pub route: String,
    /// Share of traffic, in percent; the shares of an experiment add up to 100.
    pub percent: f64,
}

/// An A/B split of one public model's traffic.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    /// Name, part of the assignment hash (so two experiments split independently).
    pub name: String,
    /// The arms.
    pub variants: Vec<Variant>,
    /// What keeps a caller in the same arm.
    #[serde(default)]
    pub sticky: Sticky,
}

/// FNV-1a, 64 bit: stable across processes and versions, unlike `DefaultHasher`.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
        h ^= 0xFF;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

impl ExperimentSpec {
    /// The arm for `sticky_key` (the same key always lands in the same arm).
    pub fn variant_for(&self, sticky_key: &str) -> usize {
        // Percent points, computed as they always were: a key keeps its arm across versions.
        let point = self.bucket(sticky_key, b"") as f64 / 100.0;
        self.arm_at(point, (0..self.variants.len()).collect())
    }

    /// The arm for `sticky_key` among the arms `allowed` keeps (None: it keeps none). A key
    /// whose own arm is allowed stays in it; the keys of a barred arm are spread over the
    /// allowed ones by their percents, by a second draw of the same key (so still sticky).
    pub fn variant_among(&self, sticky_key: &str, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        let own = self.variant_for(sticky_key);
        if allowed(own) {
            return Some(own);
        }
        let arms: Vec<usize> = (0..self.variants.len()).filter(|&i| allowed(i)).collect();
        if arms.is_empty() {
            return None;
        }
        let total: f64 = arms.iter().map(|&i| self.variants[i].percent).sum();
        let point = self.bucket(sticky_key, b"\0barred") as f64 / 10_000.0 * total;
        Some(self.arm_at(point, arms))
    }

    /// A key's bucket in 0..10,000: stable across processes and versions.
    fn bucket(&self, sticky_key: &str, salt: &[u8]) -> u64 {
        fnv1a(&[self.name.as_bytes(), sticky_key.as_bytes(), salt]) % 10_000
    }

    /// The arm of `arms` whose share of the percents holds `point` (the last one past them all).
    fn arm_at(&self, point: f64, arms: Vec<usize>) -> usize {
        let mut acc = 0.0;
        for &i in &arms {
            acc += self.variants[i].percent;
            if point < acc {
                return i;
            }
        }
        arms.last().copied().unwrap_or(0)
    }
}

/// One candidate as evaluated for a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Index into the policy's candidates.
    pub candidate: usize,
    /// Estimated USD cost of the request on this candidate.
    pub cost: f64,
    /// Predicted score, feedback shift included.
    pub score: f64,
}

/// The candidate to use: the cheapest that reaches `threshold`, else the best scoring.
pub fn cheapest_sufficient(scored: &[Scored], threshold: f64) -> Option<&Scored> {
    let mut by_cost: Vec<&Scored> = scored.iter().collect();
    by_cost.sort_by(|a, b| a.cost.total_cmp(&b.cost));
    by_cost
        .iter()
        .copied()
        .find(|s| s.score >= threshold)
        .or_else(|| scored.iter().max_by(|a, b| a.score.total_cmp(&b.score)))
}

/// Shifts keyed by (task class, route), as feedback learning sets them.
pub type FlatShifts = HashMap<(String, String), f64>;

/// Shifts by task class, then route: looked up with borrowed `&str`s, no allocation per request.
type Table = HashMap<String, HashMap<String, f64>>;

/// The global shifts and, per team, those its own ratings (with the operator's) make.
#[derive(Debug, Default)]
struct Tables {
    global: Table,
    teams: HashMap<String, Table>,
}

fn table(flat: FlatShifts) -> Table {
    let mut out = Table::new();
    for ((task, route), shift) in flat {
        out.entry(task).or_default().insert(route, shift);
    }
    out
}

fn lookup(table: &Table, task: &str, route: &str) -> Option<f64> {
    table.get(task)?.get(route).copied()
}

/// Score shifts per (task class, route) set by feedback learning, bounded by the caller.
/// A team's table holds the (task, route) pairs its own ratings moved; its requests see
/// those and the global shifts elsewhere, so one team's ratings never steer another's.
#[derive(Debug, Default)]
pub struct Shifts {
    tables: RwLock<Tables>,
}

impl Shifts {
    /// Replaces all shifts at once: the global ones (every request's) and each team's.
    pub fn replace(&self, global: FlatShifts, teams: HashMap<String, FlatShifts>) {
        let tables = Tables {
            global: table(global),
            teams: teams.into_iter().map(|(team, flat)| (team, table(flat))).collect(),
        };
        *self.tables.write().unwrap_or_else(|p| p.into_inner()) = tables;
    }

    /// The shifts a request of `team` (None: no team) sees, read under one lock for a decision.
    pub fn view<'a>(&'a self, team: Option<&'a str>) -> ShiftView<'a> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        ShiftView { tables, team }
    }

    /// The shift for `task` on `route` for a request of `team` (0 when none).
    pub fn get(&self, team: Option<&str>, task: &str, route: &str) -> f64 {
        self.view(team).get(task, route)
    }
}

/// The shifts of one request's team, under the read lock.
#[derive(Debug)]
pub struct ShiftView<'a> {
    tables: RwLockReadGuard<'a, Tables>,
    team: Option<&'a str>,
}

impl ShiftView<'_> {
    /// The team's own shift for (`task`, `route`) when its ratings made one, else the global one.
    pub fn get(&self, task: &str, route: &str) -> f64 {
        let own = self
            .team
            .and_then(|t| self.tables.teams.get(t))
            .and_then(|t| lookup(t, task, route));
        own.or_else(|| lookup(&self.tables.global, task, route)).unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(candidate: usize, cost: f64, score: f64) -> Scored {
        Scored { candidate, cost, score }
    }

    #[test]
    fn cheapest_good_enough_wins() {
        let c = [s(0, 10.0, 0.9), s(1, 1.0, 0.75), s(2, 0.1, 0.4)];
        assert_eq!(cheapest_sufficient(&c, 0.7).unwrap().candidate, 1);
        assert_eq!(cheapest_sufficient(&c, 0.3).unwrap().candidate, 2);
        // Nothing good enough: the best scoring one.
        assert_eq!(cheapest_sufficient(&c, 0.95).unwrap().candidate, 0);
        assert!(cheapest_sufficient(&[], 0.5).is_none());
    }

    #[test]
    fn experiments_are_sticky_and_split_by_percent() {
        let e = ExperimentSpec {
            name: "exp".into(),
            variants: vec![
                Variant {
                    route: "a".into(),
                    percent: 90.0,
                },
                Variant {
                    route: "b".into(),
                    percent: 10.0,
                },
            ],
            sticky: Sticky::User,
        };
        let arms: Vec<usize> = (0..10_000).map(|i| e.variant_for(&format!("user-{i}"))).collect();
        let b = arms.iter().filter(|&&a| a == 1).count();
        assert!((800..1200).contains(&b), "{b}");
        assert_eq!(e.variant_for("user-7"), e.variant_for("user-7"));
    }

    #[test]
    fn a_barred_arms_callers_spread_over_the_others_by_their_shares() {
        let arm = |route: &str, percent: f64| Variant {
            route: route.into(),
            percent,
        };
        let e = ExperimentSpec {
            name: "exp".into(),
            variants: vec![arm("a", 50.0), arm("b", 30.0), arm("c", 20.0)],
            sticky: Sticky::User,
        };
        let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let mut moved = [0usize; 3];
        for k in &keys {
            let free = e.variant_for(k);
            let ruled = e.variant_among(k, |i| i != 0).unwrap();
            assert_ne!(ruled, 0);
            if free == 0 {
                moved[ruled] += 1;
            }
            assert_eq!(ruled, e.variant_among(k, |i| i != 0).unwrap(), "sticky");
        }
        // Callers of the barred arm land in b and c about 30:20.
        let share_b = moved[1] as f64 / (moved[1] + moved[2]) as f64;
        assert!((0.55..0.65).contains(&share_b), "{moved:?}");
        assert_eq!(e.variant_among("user-1", |_| false), None);
        assert_eq!(e.variant_among("user-1", |_| true), Some(e.variant_for("user-1")));
    }

    #[test]
    fn shifts_default_to_zero() {
        let s = Shifts::default();
        assert_eq!(s.get(None, "code", "gpt"), 0.0);
        s.replace(
            HashMap::from([(("code".to_string(), "gpt".to_string()), 0.1)]),
            HashMap::new(),
        );
        assert_eq!(s.get(None, "code", "gpt"), 0.1);
        assert_eq!(s.get(Some("a"), "code", "gpt"), 0.1);
    }

    #[test]
    fn a_teams_shifts_steer_its_own_requests_alone() {
        let flat = |task: &str, route: &str, v: f64| HashMap::from([((task.to_string(), route.to_string()), v)]);
        let s = Shifts::default();
        s.replace(
            flat("code", "cheap", 0.05),
            HashMap::from([
                ("a".to_string(), flat("code", "cheap", -0.15)),
                ("b".to_string(), flat("math", "cheap", 0.1)),
            ]),
        );
        // Team a's ratings moved (code, cheap) for team a alone.
        assert_eq!(s.get(Some("a"), "code", "cheap"), -0.15);
        assert_eq!(s.get(Some("b"), "code", "cheap"), 0.05);
        assert_eq!(s.get(Some("c"), "code", "cheap"), 0.05);
        assert_eq!(s.get(None, "code", "cheap"), 0.05);
        // Where a team's ratings made no shift, its requests see the global one (none here).
        assert_eq!(s.get(Some("a"), "math", "cheap"), 0.0);
        assert_eq!(s.get(Some("b"), "math", "cheap"), 0.1);
        assert_eq!(s.get(None, "math", "cheap"), 0.0);
        let view = s.view(Some("a"));
        assert_eq!((view.get("code", "cheap"), view.get("code", "dear")), (-0.15, 0.0));
    }
}
