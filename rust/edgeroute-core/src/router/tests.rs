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
fn a_rule_the_client_can_trigger_cannot_raise_the_class_past_the_key() {
    let spec = String::from_utf8_lossy(CAPACITY).replace(
        r#""rules": [{"name": "bulk""#,
        r#""rules": [{"name": "urgent", "when": {"tags": ["urgent"]}, "then": {"priority": "interactive"}},
                   {"name": "web-urgent", "priority": 1, "when": {"teams": ["web"], "tags": ["now"]}, "then": {"priority": "interactive"}},
                   {"name": "bulk""#,
    );
    let r = Router::from_json(spec.as_bytes()).unwrap();
    let decide = |tags: &[&str], team: Option<&str>, ceiling: Option<&str>| {
        let meta = RequestMeta {
            priority: Some("batch".to_owned()),
            priority_ceiling: ceiling.map(str::to_owned),
            team: team.map(str::to_owned),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            explain: true,
            ..RequestMeta::default()
        };
        r.decide(BODY, &meta).unwrap()
    };
    // A batch-only key tagging its request `urgent`: the rule names no sender, so it holds.
    let held = decide(&["urgent"], None, Some("batch"));
    assert_eq!((held.rule.as_deref(), held.priority), (Some("urgent"), 2));
    assert!(
        held.reasons
            .iter()
            .any(|r| r.contains("priority interactive held at batch")),
        "{:?}",
        held.reasons
    );
    // A key that may use `default` is raised that far, not further.
    assert_eq!(decide(&["urgent"], None, Some("default")).priority, 1);
    // Without keys (no ceiling) the rule's class applies, as it does to a key that may use it.
    assert_eq!(decide(&["urgent"], None, None).priority, 0);
    assert_eq!(decide(&["urgent"], None, Some("interactive")).priority, 0);
    // A rule naming its sender (the team) raises the class past the key's own.
    let web = decide(&["now"], Some("web"), Some("batch"));
    assert_eq!((web.rule.as_deref(), web.priority), (Some("web-urgent"), 0));
    // Lowering is never held: `bulk` takes an interactive key's request to batch.
    let meta = RequestMeta {
        priority: Some("interactive".to_owned()),
        priority_ceiling: Some("interactive".to_owned()),
        tags: vec!["bulk".to_owned()],
        ..RequestMeta::default()
    };
    assert_eq!(r.decide(BODY, &meta).unwrap().priority, 2);
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

#[test]
fn a_request_over_every_window_is_the_clients_error() {
    let spec = |fallbacks: &str| {
        format!(
            r#"{{"deployments": [
                {{"name": "small", "provider": "p", "model": "m", "context_window": 100}},
                {{"name": "big", "provider": "p", "model": "m", "context_window": 100000}}],
              "models": [{{"name": "m", "deployments": ["small"], "fallbacks": {fallbacks}}},
                         {{"name": "n", "deployments": ["big"]}}]}}"#
        )
    };
    let long = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "word ".repeat(300)
    );
    let alone = Router::from_json(spec("[]").as_bytes()).unwrap();
    match alone.decide(long.as_bytes(), &RequestMeta::default()) {
        Err(CoreError::ContextTooLong { needed, window, .. }) => assert!(window == 100 && needed > 300),
        other => panic!("{other:?}"),
    }
    // A fallback whose window fits serves it.
    let with_fallback = Router::from_json(spec(r#"["n"]"#).as_bytes()).unwrap();
    let d = with_fallback.decide(long.as_bytes(), &RequestMeta::default()).unwrap();
    assert_eq!(with_fallback.deployment(d.order[0]).name, "big");
}

#[test]
fn a_keyed_callers_rules_see_its_keys_user_not_the_bodys() {
    let r = Router::from_json(
        br#"{"deployments": [
            {"name": "plain", "provider": "p", "model": "m"},
            {"name": "premium", "provider": "p", "model": "m"}],
          "models": [{"name": "m", "deployments": ["plain"]}, {"name": "bobs", "deployments": ["premium"]}],
          "rules": [{"name": "bob-gets-premium", "when": {"users": ["bob"]}, "then": {"route": "bobs"}}]}"#,
    )
    .unwrap();
    let claims_bob = br#"{"model":"m","user":"bob","messages":[{"role":"user","content":"hi"}]}"#;
    let rule = |meta: RequestMeta| r.decide(claims_bob, &meta).unwrap().rule;
    let keyed = |user: Option<&str>| RequestMeta {
        key: Some("k-a".to_owned()),
        user: user.map(str::to_owned),
        ..RequestMeta::default()
    };
    // A key without a user claims bob in its body: not bob's rule.
    assert_eq!(rule(keyed(None)), None);
    // Bob's own key; a keyless caller (a sidecar's app) has only the body's word.
    assert_eq!(rule(keyed(Some("bob"))).as_deref(), Some("bob-gets-premium"));
    assert_eq!(rule(RequestMeta::default()).as_deref(), Some("bob-gets-premium"));
}

const TWO_HEDGED: &[u8] = br#"{"deployments": [
        {"name": "a", "provider": "p", "model": "m"}, {"name": "b", "provider": "p", "model": "m"}],
      "models": [{"name": "busy", "deployments": ["a", "b"], "hedge": {"delay_ms": 10, "budget_percent": 5}},
                 {"name": "quiet", "deployments": ["a", "b"], "hedge": {"delay_ms": 10, "budget_percent": 5}}]}"#;

#[test]
fn each_route_hedges_on_its_own_dispatched_requests() {
    let r = Router::from_json(TWO_HEDGED).unwrap();
    let body = |m: &str| format!(r#"{{"model":"{m}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    // Decisions alone (a refusal at admission, a cache hit) fund nothing.
    for _ in 0..400 {
        r.decide(body("busy").as_bytes(), &RequestMeta::default()).unwrap();
    }
    assert!(!r.try_hedge("busy"));
    // 400 dispatches of the busy route fund its 20 hedges, and none of the quiet route's.
    (0..400).for_each(|_| r.fund_budgets("busy"));
    assert!(!r.try_hedge("quiet"), "a busy route paid for a quiet one's hedge");
    assert_eq!((0..30).filter(|_| r.try_hedge("busy")).count(), 20);
    (0..20).for_each(|_| r.fund_budgets("quiet"));
    assert!(r.try_hedge("quiet") && !r.try_hedge("quiet"));
    // A reload keeps each route's own count.
    let again = r.reload(Router::spec_from_json(TWO_HEDGED).unwrap()).unwrap();
    assert!(!again.try_hedge("busy") && !again.try_hedge("quiet") && !again.try_hedge("nope"));
}

#[test]
fn retries_are_funded_by_dispatched_requests_not_decisions() {
    let spec = br#"{"deployments": [{"name": "a", "provider": "p", "model": "m"}],
      "models": [{"name": "m", "deployments": ["a"]}],
      "retry_budget": {"ratio": 0.5, "min_per_sec": 0}}"#;
    let r = Router::from_json(spec).unwrap();
    // Decisions alone (a refusal at admission, a cache hit, an explanation) fund nothing.
    for _ in 0..400 {
        r.decide(BODY, &RequestMeta::default()).unwrap();
    }
    assert!(!r.try_retry("m"), "400 decisions bought a retry");
    // 10 requests sent on fund 5 retries; an unknown route funds and retries nothing.
    (0..10).for_each(|_| r.fund_budgets("m"));
    (0..10).for_each(|_| r.fund_budgets("nope"));
    assert!(!r.try_retry("nope"));
    assert_eq!((0..10).filter(|_| r.try_retry("m")).count(), 5);
}

#[test]
fn each_route_retries_on_its_own_dispatched_requests() {
    let spec = br#"{"deployments": [
        {"name": "a", "provider": "p", "model": "m"}, {"name": "b", "provider": "p", "model": "m"}],
      "models": [{"name": "busy", "deployments": ["a"]}, {"name": "quiet", "deployments": ["b"]}],
      "retry_budget": {"ratio": 0.2, "min_per_sec": 0}}"#;
    let r = Router::from_json(spec).unwrap();
    // 1,000 dispatches of a healthy busy route buy a quiet, failing route no retry.
    (0..1_000).for_each(|_| r.fund_budgets("busy"));
    assert!(!r.try_retry("quiet"), "a busy route paid for a quiet one's retry");
    (0..10).for_each(|_| r.fund_budgets("quiet"));
    assert_eq!((0..10).filter(|_| r.try_retry("quiet")).count(), 2);
    assert_eq!((0..300).filter(|_| r.try_retry("busy")).count(), 200);
    // A reload keeps each route's own count, under its new settings.
    let tighter = String::from_utf8_lossy(spec).replace("0.2", "0.1");
    let again = r.reload(Router::spec_from_json(tighter.as_bytes()).unwrap()).unwrap();
    assert!(!again.try_retry("busy") && !again.try_retry("quiet"));
    (0..1_000).for_each(|_| again.fund_budgets("busy"));
    // 2,000 requests at 0.1 allow 200, all taken before the reload.
    assert_eq!((0..300).filter(|_| again.try_retry("busy")).count(), 0);
    (0..1_000).for_each(|_| again.fund_budgets("busy"));
    assert_eq!((0..300).filter(|_| again.try_retry("busy")).count(), 100);
}

#[test]
fn a_keyed_caller_is_bucketed_by_its_sticky_value_and_ruled_by_its_user() {
    let r = Router::from_json(
        br#"{"deployments": [
            {"name": "da", "provider": "p", "model": "m"}, {"name": "db", "provider": "p", "model": "m"}],
          "models": [{"name": "a", "deployments": ["da"]}, {"name": "b", "deployments": ["db"]},
                     {"name": "chat", "deployments": [], "experiment": {"name": "chat", "sticky": "user",
                      "variants": [{"route": "a", "percent": 50}, {"route": "b", "percent": 50}]}}]}"#,
    )
    .unwrap();
    let body = br#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#;
    let arm = |sticky: Option<String>, user: Option<&str>| {
        let meta = RequestMeta {
            key: Some("k".to_owned()),
            user: user.map(str::to_owned),
            sticky,
            ..RequestMeta::default()
        };
        r.decide(body, &meta).unwrap().variant
    };
    // The key's user alone buckets it without a sticky value; with one, the value does.
    let by_sticky: Vec<_> = (0..40).map(|i| arm(Some(format!("s{i}")), Some("alice"))).collect();
    assert!(by_sticky.iter().any(|v| *v != by_sticky[0]), "{by_sticky:?}");
    assert_eq!(
        arm(Some("s3".into()), Some("alice")),
        arm(Some("s3".into()), Some("bob"))
    );
    assert_eq!(arm(None, Some("alice")), arm(None, Some("alice")));
}
