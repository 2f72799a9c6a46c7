//! Routing rules, compiled once per config and evaluated per request.
//!
//! Cheap conditions (model, metadata, token range, time window) are checked
//! first; content conditions share one [`ContentMatcher`] (keywords and patterns
//! of all rules) and one PII scan, each run at most once per request and only
//! when a rule that passed its cheap conditions needs it. Rules are tried by priority, highest first; the first match wins.

use std::cell::OnceCell;
use std::fmt;

use serde::Deserialize;

use crate::config::Strategy;
use crate::content::{ContentMatcher, Hits};
use crate::error::{CoreError, Result};
use crate::pii::{self, PiiKind, PiiSet};
use crate::rule_gates::RuleGates;
use crate::scan_memo::{Findings, ScanMemo};

/// A rule as written in config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name, reported in explanations.
    pub name: String,
    /// Higher runs first; ties keep config order.
    #[serde(default)]
    pub priority: i32,
    /// Conditions; all given ones must hold.
    #[serde(default)]
    pub when: Conditions,
    /// What to do on a match.
    pub then: Action,
}

/// Conditions of a rule. An empty list means "no condition".
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    /// The requested model is one of these.
    #[serde(default)]
    pub models: Vec<String>,
    /// The request carries at least one of these tags (`x-edgeroute-tags`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The `user` field is one of these.
    #[serde(default)]
    pub users: Vec<String>,
    /// The caller's team is one of these.
    #[serde(default)]
    pub teams: Vec<String>,
    /// The caller's role is one of these.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Prompt tokens at least this many.
    #[serde(default)]
    pub min_tokens: Option<u32>,
    /// Prompt tokens at most this many.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Any of these words occurs in the prompt (ASCII case-insensitive).
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Any of these regular expressions matches the prompt.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Any of these kinds of personal data occurs in the prompt.
    #[serde(default)]
    pub pii: Vec<PiiKind>,
    /// Local time of day window.
    #[serde(default)]
    pub time: Option<TimeWindow>,
    /// The predicted task type is one of these (`code`, `math`, ...; needs the task model).
    #[serde(default)]
    pub tasks: Vec<String>,
    /// With `tasks`: the task model's probability of its prediction is at least this
    /// (0..=1), so that a rule acts only on a confident prediction.
    #[serde(default)]
    pub min_task_confidence: Option<f64>,
    /// The request's priority class (from its key or header, else the default) is one of these.
    #[serde(default)]
    pub priority: Vec<String>,
}

impl Conditions {
    /// Whether the rule says who sends the request (its `users`, `teams` or `roles`): the
    /// caller's key decides those, the client the rest.
    pub fn names_sender(&self) -> bool {
        !(self.users.is_empty() && self.teams.is_empty() && self.roles.is_empty())
    }
}

/// A daily window `[start, end)` in minutes since local midnight; wraps past midnight when end < start.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    /// "HH:MM".
    pub start: HhMm,
    /// "HH:MM".
    pub end: HhMm,
    /// Offset of local time from UTC, in minutes.
    #[serde(default)]
    pub utc_offset_minutes: i32,
}

/// A time of day written "HH:MM".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HhMm(pub u16);

impl<'de> Deserialize<'de> for HhMm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("expected a time \"HH:MM\", got {s:?}"));
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 24 || m > 59 || (h == 24 && m > 0) {
            return Err(bad());
        }
        Ok(HhMm(h * 60 + m))
    }
}

impl TimeWindow {
    /// Whether `unix_secs` falls inside the window.
    pub fn contains(&self, unix_secs: u64) -> bool {
        let minute = ((unix_secs / 60) as i64 + i64::from(self.utc_offset_minutes)).rem_euclid(1440) as u16;
        let (s, e) = (self.start.0, self.end.0);
        if s <= e {
            (s..e).contains(&minute)
        } else {
            minute >= s || minute < e
        }
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// Serve from this public model's deployments instead.
    #[serde(default)]
    pub route: Option<String>,
    /// Serve only from these deployments.
    #[serde(default)]
    pub deployments: Vec<String>,
    /// Keep only deployments carrying all these tags.
    #[serde(default)]
    pub require_tags: Vec<String>,
    /// Drop deployments carrying any of these tags.
    #[serde(default)]
    pub exclude_tags: Vec<String>,
    /// Use this selection strategy.
    #[serde(default)]
    pub strategy: Option<Strategy>,
    /// Refuse the request with this message (403), e.g. for data that must not leave.
    #[serde(default)]
    pub reject: Option<String>,
    /// Serve the request in this priority class (see [`crate::RouterSpec::priority_classes`]).
    #[serde(default)]
    pub priority: Option<String>,
}

/// A prompt's token count, counted only if a rule needs it: exact BPE over a long
/// prompt costs more than the rest of the decision. A hard upper bound settles
/// many comparisons without counting.
pub struct LazyTokens<'a> {
    cell: OnceCell<u32>,
    upper: u32,
    count: Option<&'a dyn Fn() -> u32>,
}

impl<'a> LazyTokens<'a> {
    /// A count that is already known.
    pub fn known(n: u32) -> Self {
        let cell = OnceCell::new();
        let _ = cell.set(n);
        Self {
            cell,
            upper: n,
            count: None,
        }
    }

    /// A count made by `count` on first use; the true count is at most `upper`.
    pub fn lazy(upper: u32, count: &'a dyn Fn() -> u32) -> Self {
        Self {
            cell: OnceCell::new(),
            upper,
            count: Some(count),
        }
    }

    /// The count (computing it now if needed).
    pub fn get(&self) -> u32 {
        *self.cell.get_or_init(|| self.count.map_or(self.upper, |f| f()))
    }

    /// The count, if it has been computed.
    pub fn computed(&self) -> Option<u32> {
        self.cell.get().copied()
    }

    fn at_least(&self, min: u32) -> bool {
        self.computed()
            .map_or(self.upper >= min && self.get() >= min, |n| n >= min)
    }

    fn at_most(&self, max: u32) -> bool {
        self.computed()
            .map_or(self.upper <= max || self.get() <= max, |n| n <= max)
    }
}

impl Default for LazyTokens<'_> {
    fn default() -> Self {
        Self::known(0)
    }
}

impl fmt::Debug for LazyTokens<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.computed() {
            Some(n) => write!(f, "{n}"),
            None => write!(f, "<= {} (not counted)", self.upper),
        }
    }
}

/// Per-request facts rules look at.
#[derive(Debug, Default)]
pub struct RuleInput<'a> {
    /// The public model asked for.
    pub model: &'a str,
    /// Tags from `x-edgeroute-tags`.
    pub tags: &'a [String],
    /// The `user` field.
    pub user: Option<&'a str>,
    /// The caller's team.
    pub team: Option<&'a str>,
    /// The caller's role.
    pub role: Option<&'a str>,
    /// Prompt tokens, counted on demand.
    pub prompt_tokens: LazyTokens<'a>,
    /// The prompt's text (all message texts joined by newlines).
    pub text: &'a str,
    /// The whole request body as JSON text. When given, PII conditions read every
    /// string in it (tool calls and their arguments, tool definitions, schemas, any
    /// field the provider will see; see [`crate::json_text`]) rather than `text` alone.
    pub body: Option<&'a str>,
    /// Wall-clock time, seconds since the epoch.
    pub unix_secs: u64,
    /// The predicted task type, when the task model ran.
    pub task: Option<&'a str>,
    /// The task model's probability of `task`.
    pub task_confidence: Option<f64>,
    /// The priority class the caller asked for (its key's or header's), else the default class.
    pub priority: Option<&'a str>,
}

/// The rule that matched and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleMatch {
    /// Index into [`Rules::specs`].
    pub index: usize,
    /// Human-readable reasons, one per condition that held.
    pub reasons: Vec<String>,
}

#[derive(Debug)]
struct Compiled {
    keyword_ids: Vec<usize>,
    pattern_ids: Vec<usize>,
    pii: PiiSet,
}

/// A compiled, immutable rule set.
#[derive(Debug)]
pub struct Rules {
    specs: Vec<RuleSpec>,
    compiled: Vec<Compiled>,
    order: Vec<usize>,
    content: ContentMatcher,
    keyword_text: Vec<String>,
    pattern_text: Vec<String>,
    pii_wanted: PiiSet,
    gates: RuleGates,
    /// What keywords, patterns and PII conditions found in prompts seen lately.
    memo: ScanMemo<Findings>,
}

#[derive(Default)]
struct ContentScan {
    hits: OnceCell<Hits>,
    ungated: OnceCell<Vec<bool>>,
    pii: OnceCell<PiiSet>,
}

impl ContentScan {
    fn from(known: Findings) -> Self {
        fn cell<T>(v: Option<T>) -> OnceCell<T> {
            v.map_or_else(OnceCell::new, OnceCell::from)
        }
        Self {
            hits: cell(known.hits),
            ungated: cell(known.ungated),
            pii: cell(known.pii),
        }
    }

    fn findings(self) -> Findings {
        Findings {
            hits: self.hits.into_inner(),
            ungated: self.ungated.into_inner(),
            pii: self.pii.into_inner(),
        }
    }
}

impl Rules {
    /// Compiles `specs`; bad patterns are config errors naming the rule.
    pub fn compile(specs: Vec<RuleSpec>) -> Result<Self> {
        let mut keyword_text = Vec::new();
        let mut pattern_text = Vec::new();
        let mut compiled = Vec::with_capacity(specs.len());
        let mut pii_wanted = PiiSet::default();
        for (i, r) in specs.iter().enumerate() {
            if specs[..i].iter().any(|o| o.name == r.name) {
                return Err(CoreError::Config(format!("rule name `{}` is used twice", r.name)));
            }
            if let Some(c) = r.when.min_task_confidence {
                if r.when.tasks.is_empty() || !(0.0..=1.0).contains(&c) {
                    return Err(CoreError::Config(format!(
                        "rule `{}`: min_task_confidence needs `tasks` and a value in [0, 1]",
                        r.name
                    )));
                }
            }
            let keyword_ids = r
                .when
                .keywords
                .iter()
                .map(|k| {
                    keyword_text.push(k.clone());
                    keyword_text.len() - 1
                })
                .collect();
            let mut pattern_ids = Vec::new();
            for p in &r.when.patterns {
                regex::Regex::new(p)
                    .map_err(|e| CoreError::Config(format!("rule `{}`: bad pattern {p:?}: {e}", r.name)))?;
                pattern_text.push(p.clone());
                pattern_ids.push(pattern_text.len() - 1);
            }
            let set = pii::set_of(&r.when.pii);
            pii_wanted = pii_wanted.union(set);
            compiled.push(Compiled {
                keyword_ids,
                pattern_ids,
                pii: set,
            });
        }
        let content = ContentMatcher::new(&keyword_text, &pattern_text)?;
        if !pii_wanted.is_empty() {
            pii::warm_up(); // compiled once per process, here rather than inside a request
        }
        let mut order: Vec<usize> = (0..specs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(specs[i].priority));
        let gates = RuleGates::new(&specs);
        Ok(Self {
            specs,
            compiled,
            order,
            content,
            keyword_text,
            pattern_text,
            pii_wanted,
            gates,
            memo: ScanMemo::default(),
        })
    }

    /// The rules as configured.
    pub fn specs(&self) -> &[RuleSpec] {
        &self.specs
    }

    /// Whether any rule looks at the predicted task type.
    pub fn needs_task(&self) -> bool {
        self.specs.iter().any(|r| !r.when.tasks.is_empty())
    }

    /// Whether any rule looks at content (so callers know whether to build the text).
    pub fn needs_text(&self) -> bool {
        !self.keyword_text.is_empty() || !self.pattern_text.is_empty() || !self.pii_wanted.is_empty()
    }

    /// The first rule, by priority, whose conditions all hold.
    pub fn evaluate(&self, input: &RuleInput<'_>) -> Option<RuleMatch> {
        if !self.needs_text() {
            return self.evaluate_with(input, &ContentScan::default());
        }
        let (text, body) = (input.text.as_bytes(), input.body.map(str::as_bytes));
        let (known, key) = self.memo.get(text, body);
        let scan = ContentScan::from(known.clone());
        let matched = self.evaluate_with(input, &scan);
        self.memo.put(key, text, body, &known, scan.findings());
        matched
    }

    fn evaluate_with(&self, input: &RuleInput<'_>, scan: &ContentScan) -> Option<RuleMatch> {
        let live = self.gates.live(input);
        // Reasons are written only for the winner: most rules fail some condition,
        // and formatting theirs would cost an allocation per condition per rule.
        let index = self
            .order
            .iter()
            .copied()
            .find(|&i| live.contains(i) && self.check(i, input, scan, None))?;
        let mut reasons = Vec::new();
        self.check(index, input, scan, Some(&mut reasons));
        Some(RuleMatch { index, reasons })
    }

    /// Whether rule `i`, let through by the gates, holds; when `why` is given, the reason for
    /// each condition is pushed to it.
    fn check(&self, i: usize, input: &RuleInput<'_>, scan: &ContentScan, mut why: Option<&mut Vec<String>>) -> bool {
        let w = &self.specs[i].when;
        let c = &self.compiled[i];
        let explain = why.is_some();
        let mut note = |reason: &dyn Fn() -> String| {
            if let Some(why) = why.as_deref_mut() {
                why.push(reason());
            }
        };
        // The value conditions hold: `evaluate` checks only the rules its gates let through.
        // They are read again for the winner's reasons.
        if explain {
            if !w.models.is_empty() {
                note(&|| format!("model={}", input.model));
            }
            if let Some(t) = w.tags.iter().find(|t| input.tags.contains(t)) {
                note(&|| format!("tag={t}"));
            }
            for (list, value, label) in [
                (&w.users, input.user, "user"),
                (&w.teams, input.team, "team"),
                (&w.roles, input.role, "role"),
                (&w.priority, input.priority, "priority"),
            ] {
                if let Some(v) = value.filter(|_| !list.is_empty()) {
                    note(&|| format!("{label}={v}"));
                }
            }
        }
        if let Some(t) = &w.time {
            if !t.contains(input.unix_secs) {
                return false;
            }
            note(&|| "time window".to_string());
        }
        if !w.tasks.is_empty() {
            match input.task {
                Some(task) if w.tasks.iter().any(|t| t == task) => note(&|| format!("task={task}")),
                _ => return false,
            }
            if let Some(min) = w.min_task_confidence {
                match input.task_confidence {
                    Some(p) if p >= min => note(&|| format!("task confidence {p:.2} >= {min}")),
                    _ => return false,
                }
            }
        }
        if !c.keyword_ids.is_empty() {
            let hits = scan.hits.get_or_init(|| self.content.scan(input.text));
            let Some(k) = c.keyword_ids.iter().find(|&&k| hits.keywords[k]) else {
                return false;
            };
            note(&|| format!("keyword={:?}", self.keyword_text[*k]));
        }
        if !c.pattern_ids.is_empty() {
            let found = |p: usize| {
                if self.content.is_gated(p) {
                    scan.hits.get_or_init(|| self.content.scan(input.text)).patterns[p]
                } else {
                    scan.ungated.get_or_init(|| self.content.ungated(input.text))[p]
                }
            };
            let Some(p) = c.pattern_ids.iter().find(|&&p| found(p)) else {
                return false;
            };
            note(&|| format!("pattern={:?}", self.pattern_text[*p]));
        }
        if !c.pii.is_empty() {
            let found = *scan.pii.get_or_init(|| match input.body {
                Some(body) => pii::detect_json(body, self.pii_wanted),
                None => pii::detect(input.text, self.pii_wanted),
            });
            if !c.pii.intersects(found) {
                return false;
            }
            note(&|| {
                let k = c.pii.kinds().find(|k| found.contains(*k));
                format!("pii={}", k.expect("the sets intersect").name())
            });
        }
        // Token counts last: counting may run the tokenizer, the costliest check.
        if let Some(min) = w.min_tokens {
            if !input.prompt_tokens.at_least(min) {
                return false;
            }
            note(&|| format!("tokens>={min}"));
        }
        if let Some(max) = w.max_tokens {
            if !input.prompt_tokens.at_most(max) {
                return false;
            }
            note(&|| format!("tokens<={max}"));
        }
        if let Some(why) = why {
            if why.is_empty() {
                why.push("always".to_string());
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> RuleSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn priority_and_first_match() {
        let rules = Rules::compile(vec![
            rule(r#"{"name":"low","then":{"route":"cheap"}}"#),
            rule(r#"{"name":"code","priority":10,"when":{"keywords":["def ","fn "]},"then":{"route":"coder"}}"#),
            rule(r#"{"name":"pii","priority":20,"when":{"pii":["email"]},"then":{"require_tags":["privacy:high"]}}"#),
        ])
        .unwrap();
        let m = |text: &str| {
            let i = RuleInput {
                model: "gpt-4o",
                text,
                ..Default::default()
            };
            let r = rules.evaluate(&i).unwrap();
            (rules.specs()[r.index].name.clone(), r.reasons)
        };
        assert_eq!(m("hello").0, "low");
        assert_eq!(m("please DEF foo():").0, "code");
        let (name, why) = m("def x(): mail a@b.io");
        assert_eq!(name, "pii");
        assert_eq!(why, vec!["pii=email"]);
        // With the body given, PII is looked for in all of it, not only in the message text.
        let body =
            r#"{"messages":[{"role":"assistant","tool_calls":[{"function":{"arguments":"{\"to\":\"a@b.io\"}"}}]}]}"#;
        let i = RuleInput {
            text: "hello",
            body: Some(body),
            ..Default::default()
        };
        assert_eq!(rules.specs()[rules.evaluate(&i).unwrap().index].name, "pii");
    }

    #[test]
    fn a_prompt_seen_before_is_judged_as_it_was_whoever_sends_it() {
        let rules = Rules::compile(vec![
            rule(r#"{"name":"ml-pii","priority":3,"when":{"teams":["ml"],"pii":["email"]},"then":{}}"#),
            rule(r#"{"name":"ticket","priority":2,"when":{"patterns":["TICKET-\\d+"]},"then":{}}"#),
            rule(r#"{"name":"code","priority":1,"when":{"keywords":["def "]},"then":{}}"#),
        ])
        .unwrap();
        let judge = |text: &str, team: Option<&str>| {
            let i = RuleInput {
                text,
                team,
                ..Default::default()
            };
            rules
                .evaluate(&i)
                .map(|m| (rules.specs()[m.index].name.clone(), m.reasons))
        };
        let text = "def f(): mail a@b.io about TICKET-42";
        let web = Some(("ticket".to_string(), vec![r#"pattern="TICKET-\\d+""#.to_string()]));
        let ml = Some((
            "ml-pii".to_string(),
            vec!["team=ml".to_string(), "pii=email".to_string()],
        ));
        assert_eq!(judge(text, Some("web")), web);
        assert_eq!(rules.memo.size().0, 0); // seen once: not copied
        assert_eq!(judge(text, Some("web")), web);
        assert_eq!(rules.memo.size().0, 1); // seen again: its keywords and patterns remembered
                                            // Another caller reaches a rule the first did not (PII): looked for, and remembered too.
        assert_eq!(judge(text, Some("ml")), ml);
        assert_eq!(judge(text, Some("web")), web);
        assert_eq!(judge(text, Some("ml")), ml);
        assert_eq!(rules.memo.size().0, 1);
        // A prompt one byte apart is its own.
        for _ in 0..2 {
            assert_eq!(
                judge("def f(): mail a@b.io about TICKET-x2", Some("web")).unwrap().0,
                "code"
            );
            assert_eq!(
                judge("def f(): mail a.b.io about TICKET-42", Some("ml")).unwrap().0,
                "ticket"
            );
        }
        assert_eq!(rules.memo.size().0, 3);
    }

    #[test]
    fn priority_class_condition() {
        let rules = Rules::compile(vec![
            rule(r#"{"name":"fast","when":{"priority":["interactive"]},"then":{"strategy":"fastest"}}"#),
            rule(r#"{"name":"cheap","when":{"priority":["batch","default"]},"then":{"strategy":"lowest_cost"}}"#),
        ])
        .unwrap();
        let at = |p: Option<&str>| {
            let i = RuleInput {
                priority: p,
                ..Default::default()
            };
            rules
                .evaluate(&i)
                .map(|m| (rules.specs()[m.index].name.clone(), m.reasons))
        };
        assert_eq!(
            at(Some("interactive")),
            Some(("fast".into(), vec!["priority=interactive".into()]))
        );
        assert_eq!(at(Some("batch")).unwrap().0, "cheap");
        assert_eq!(at(Some("other")), None);
        assert_eq!(at(None), None);
    }

    #[test]
    fn metadata_tokens_and_time() {
        let rules = Rules::compile(vec![rule(
            r#"{"name":"r","when":{"teams":["ml"],"min_tokens":100,"time":{"start":"22:00","end":"06:00"}},"then":{}}"#,
        )])
        .unwrap();
        let at = |team: &str, tokens: u32, hour: u64| {
            let i = RuleInput {
                team: Some(team),
                prompt_tokens: LazyTokens::known(tokens),
                unix_secs: hour * 3600,
                ..Default::default()
            };
            rules.evaluate(&i).is_some()
        };
        assert!(at("ml", 200, 23));
        assert!(at("ml", 200, 2));
        assert!(!at("ml", 200, 12));
        assert!(!at("ml", 50, 23));
        assert!(!at("web", 200, 23));
    }

    #[test]
    fn task_rules_can_require_a_confident_prediction() {
        let rules = Rules::compile(vec![rule(
            r#"{"name":"sure-code","when":{"tasks":["code"],"min_task_confidence":0.7},"then":{}}"#,
        )])
        .unwrap();
        let hit = |task: &'static str, p: f64| {
            let i = RuleInput {
                task: Some(task),
                task_confidence: Some(p),
                ..Default::default()
            };
            rules.evaluate(&i).map(|m| m.reasons)
        };
        assert_eq!(
            hit("code", 0.9).unwrap(),
            vec!["task=code", "task confidence 0.90 >= 0.7"]
        );
        assert!(hit("code", 0.69).is_none());
        assert!(hit("math", 0.99).is_none());
        for bad in [
            r#"{"name":"r","when":{"min_task_confidence":0.5},"then":{}}"#,
            r#"{"name":"r","when":{"tasks":["code"],"min_task_confidence":1.5},"then":{}}"#,
        ] {
            let err = Rules::compile(vec![rule(bad)]).unwrap_err();
            assert!(err.to_string().contains("min_task_confidence"), "{err}");
        }
    }

    #[test]
    fn bad_pattern_names_the_rule() {
        let err = Rules::compile(vec![rule(r#"{"name":"oops","when":{"patterns":["("]},"then":{}}"#)]).unwrap_err();
        assert!(err.to_string().contains("oops"), "{err}");
    }

    #[test]
    fn tokens_are_counted_only_when_a_bound_cannot_decide() {
        let rules = Rules::compile(vec![
            rule(r#"{"name":"long","priority":2,"when":{"min_tokens":1000},"then":{}}"#),
            rule(r#"{"name":"short","priority":1,"when":{"max_tokens":50},"then":{}}"#),
        ])
        .unwrap();
        let calls = std::cell::Cell::new(0);
        let count = || {
            calls.set(calls.get() + 1);
            40
        };
        // An upper bound of 45 rules out `long` and settles `short` without counting.
        let i = RuleInput {
            prompt_tokens: LazyTokens::lazy(45, &count),
            ..Default::default()
        };
        assert_eq!(rules.specs()[rules.evaluate(&i).unwrap().index].name, "short");
        assert_eq!((calls.get(), i.prompt_tokens.computed()), (0, None));
        // With a bound of 5000 the count is needed (once) to tell.
        let i = RuleInput {
            prompt_tokens: LazyTokens::lazy(5000, &count),
            ..Default::default()
        };
        assert_eq!(rules.specs()[rules.evaluate(&i).unwrap().index].name, "short");
        assert_eq!((calls.get(), i.prompt_tokens.computed()), (1, Some(40)));
    }
}
