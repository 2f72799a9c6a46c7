//! Which rules a request's model, tags and caller (user, team, role, priority class) let
//! through, as bit sets over the rules, before any rule is checked.
//!
//! Most rules of a large rule set name a model, tag or team the request does not have;
//! checking each of them condition by condition cost about a hundred instructions a rule.
//! A few hash lookups per request give the set of rules whose value conditions hold, and
//! only those are checked, for their other conditions.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::rules::{Conditions, RuleInput, RuleSpec};

/// One condition on a value (`models`, `tags`, ...): per value some rule names, the rules
/// naming it, and the rules without the condition.
#[derive(Debug)]
struct Gate {
    open: Vec<u64>,
    named: HashMap<String, Vec<u64>, BuildHasherDefault<WordHasher>>,
}

/// Hashes a string a word at a time with a multiplication (FxHash's step). The keys are the
/// config's values; a request only looks values up, so it cannot fill a bucket, and SipHash
/// made the lookups a tenth of the gates' cost.
#[derive(Default)]
struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in words.by_ref() {
            self.add(u64::from_le_bytes(w.try_into().expect("eight bytes")));
        }
        let mut last = [0u8; 8];
        let rest = words.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(last) ^ rest.len() as u64);
    }
}

impl WordHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Gate {
    fn new(specs: &[RuleSpec], list: fn(&Conditions) -> &[String]) -> Self {
        let words = specs.len().div_ceil(64);
        let mut open = vec![0u64; words];
        let mut named: HashMap<String, Vec<u64>, BuildHasherDefault<WordHasher>> = HashMap::default();
        for (i, r) in specs.iter().enumerate() {
            let values = list(&r.when);
            if values.is_empty() {
                set(&mut open, i);
            }
            for v in values {
                set(named.entry(v.clone()).or_insert_with(|| vec![0; words]), i);
            }
        }
        Self { open, named }
    }

    /// Keeps in `live` only the rules without this condition and those naming one of `values`.
    fn narrow<'v>(&self, live: &mut [u64], values: impl IntoIterator<Item = &'v str>) {
        if self.named.is_empty() {
            return; // no rule has the condition
        }
        // Allocated only when some rule names one of the values.
        let sets: Vec<&[u64]> = values
            .into_iter()
            .filter_map(|v| self.named.get(v))
            .map(Vec::as_slice)
            .collect();
        for (w, word) in live.iter_mut().enumerate() {
            *word &= sets.iter().fold(self.open[w], |acc, s| acc | s[w]);
        }
    }
}

fn set(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

/// The gates of a rule set.
#[derive(Debug)]
pub(crate) struct RuleGates {
    rules: usize,
    models: Gate,
    tags: Gate,
    users: Gate,
    teams: Gate,
    roles: Gate,
    priority: Gate,
}

impl RuleGates {
    pub(crate) fn new(specs: &[RuleSpec]) -> Self {
        Self {
            rules: specs.len(),
            models: Gate::new(specs, |w| &w.models),
            tags: Gate::new(specs, |w| &w.tags),
            users: Gate::new(specs, |w| &w.users),
            teams: Gate::new(specs, |w| &w.teams),
            roles: Gate::new(specs, |w| &w.roles),
            priority: Gate::new(specs, |w| &w.priority),
        }
    }

    /// The rules whose value conditions (models, tags, users, teams, roles, priority classes)
    /// all hold for `input`, by index.
    pub(crate) fn live(&self, input: &RuleInput<'_>) -> Live {
        let mut bits = vec![u64::MAX; self.rules.div_ceil(64)];
        self.models.narrow(&mut bits, [input.model]);
        self.tags.narrow(&mut bits, input.tags.iter().map(String::as_str));
        self.users.narrow(&mut bits, input.user);
        self.teams.narrow(&mut bits, input.team);
        self.roles.narrow(&mut bits, input.role);
        self.priority.narrow(&mut bits, input.priority);
        Live(bits)
    }
}

/// A set of rules by index (see [`RuleGates::live`]).
pub(crate) struct Live(Vec<u64>);

impl Live {
    pub(crate) fn contains(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> RuleSpec {
        serde_json::from_str(json).unwrap()
    }

    /// The value conditions as `Rules::check` read them before the gates.
    fn holds(w: &Conditions, input: &RuleInput<'_>) -> bool {
        (w.models.is_empty() || w.models.iter().any(|m| m == input.model))
            && (w.tags.is_empty() || w.tags.iter().any(|t| input.tags.contains(t)))
            && [
                (&w.users, input.user),
                (&w.teams, input.team),
                (&w.roles, input.role),
                (&w.priority, input.priority),
            ]
            .iter()
            .all(|(list, value)| list.is_empty() || value.is_some_and(|v| list.iter().any(|x| x == v)))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// A rule is let through exactly when its value conditions hold, over rule sets of up to
        /// two hundred rules (several words of bits) and requests with any number of tags.
        #[test]
        fn gates_let_through_exactly_the_rules_whose_value_conditions_hold(
            lists in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec("[abc]", 0..3), 6), 1..200),
            model in "[abc]",
            tags in proptest::collection::vec("[abcd]", 0..12),
            values in proptest::collection::vec(proptest::option::of("[abc]"), 4),
        ) {
            let specs: Vec<RuleSpec> = lists
                .iter()
                .enumerate()
                .map(|(i, l)| RuleSpec {
                    name: format!("r{i}"),
                    priority: 0,
                    when: Conditions {
                        models: l[0].clone(),
                        tags: l[1].clone(),
                        users: l[2].clone(),
                        teams: l[3].clone(),
                        roles: l[4].clone(),
                        priority: l[5].clone(),
                        ..Default::default()
                    },
                    then: Default::default(),
                })
                .collect();
            let input = RuleInput {
                model: &model,
                tags: &tags,
                user: values[0].as_deref(),
                team: values[1].as_deref(),
                role: values[2].as_deref(),
                priority: values[3].as_deref(),
                ..Default::default()
            };
            let live = RuleGates::new(&specs).live(&input);
            for (i, r) in specs.iter().enumerate() {
                proptest::prop_assert_eq!(live.contains(i), holds(&r.when, &input), "rule {}: {:?}", i, r.when);
            }
        }
    }

    #[test]
    fn gates_let_through_the_rules_whose_values_match_and_those_without_the_condition() {
        let specs: Vec<RuleSpec> = (0..70)
            .map(|i| match i % 5 {
                0 => rule(&format!(
                    r#"{{"name":"r{i}","when":{{"models":["m{}"]}},"then":{{}}}}"#,
                    i % 3
                )),
                1 => rule(&format!(
                    r#"{{"name":"r{i}","when":{{"tags":["t{}","u"]}},"then":{{}}}}"#,
                    i % 4
                )),
                2 => rule(&format!(
                    r#"{{"name":"r{i}","when":{{"teams":["a"],"roles":["x"]}},"then":{{}}}}"#
                )),
                3 => rule(&format!(
                    r#"{{"name":"r{i}","when":{{"users":["me"],"priority":["p"]}},"then":{{}}}}"#
                )),
                _ => rule(&format!(r#"{{"name":"r{i}","when":{{"min_tokens":5}},"then":{{}}}}"#)),
            })
            .collect();
        let gates = RuleGates::new(&specs);
        let tags = ["t1".to_string()];
        let input = RuleInput {
            model: "m0",
            tags: &tags,
            team: Some("a"),
            role: Some("x"),
            ..Default::default()
        };
        let live = gates.live(&input);
        let got: Vec<usize> = (0..70).filter(|&i| live.contains(i)).collect();
        let want: Vec<usize> = (0..70)
            .filter(|&i| match i % 5 {
                0 => i % 3 == 0,
                1 => i % 4 == 1,
                2 | 4 => true,
                _ => false, // no user
            })
            .collect();
        assert_eq!(got, want);
        // Any of many tags lets a rule naming it through.
        let many: Vec<String> = (0..20).map(|i| format!("x{i}")).chain(["t2".into()]).collect();
        let input = RuleInput {
            model: "m0",
            tags: &many,
            ..Default::default()
        };
        let live = gates.live(&input);
        assert!((0..70).filter(|i| i % 5 == 1).all(|i| live.contains(i) == (i % 4 == 2)));
    }
}
