//! The Rust classifier against the Python reference (`edgeroute/learn`).
//!
//! `python -m edgeroute.learn.build_models` writes the shipped models and
//! `tests/fixtures/classify_parity.json` (text -> buckets, length features,
//! probabilities computed in Python); this test replays the fixture.

use std::path::PathBuf;

use edgeroute_core::classify::{Classifier, Features, RouterModel, TextModel};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn models() -> (TextModel, RouterModel) {
    let dir = repo().join("edgeroute/models");
    let task = std::fs::read(dir.join("task.erlm")).expect("task model");
    let router = std::fs::read(dir.join("router-gpt4-mixtral.erlm")).expect("router model");
    (
        TextModel::from_bytes(&task).unwrap(),
        RouterModel::from_bytes(&router).unwrap(),
    )
}

#[test]
fn features_and_probabilities_match_python() {
    let (task, router) = models();
    let fixture: serde_json::Value = serde_json::from_slice(
        &std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/classify_parity.json")).unwrap(),
    )
    .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let classifier = Classifier::new(task.clone(), router.clone()).unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let f = Features::extract(text, task.featurizer());
        let want: Vec<u32> = case["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(f.buckets(), want.as_slice(), "buckets differ for {text:?}");
        for (a, b) in f.length().iter().zip(case["length"].as_array().unwrap()) {
            assert!((a - b.as_f64().unwrap()).abs() < 1e-12, "length differs for {text:?}");
        }
        let out = classifier.classify(text);
        let close = |got: &[f64], key: &str| {
            let want = case[key].as_array().unwrap();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                assert!((a - b.as_f64().unwrap()).abs() < 1e-9, "{key} differ for {text:?}");
            }
        };
        close(&out.task.probabilities, "task_probabilities");
        close(&out.scores, "router_scores");
    }
}

#[test]
fn fused_single_pass_equals_separate_models() {
    let (task, router) = models();
    assert_eq!(
        task.featurizer(),
        router.featurizer(),
        "shipped models must share a featurizer"
    );
    let classifier = Classifier::new(task.clone(), router.clone()).unwrap();
    let texts = [
        "",
        "Prove that there are infinitely many primes.",
        "напиши басню про оливье",
        &"long prompt with code: fn main() { println!(\"hi\"); }\n".repeat(300),
    ];
    for text in texts {
        let f = Features::extract(text, task.featurizer());
        let p = task.predict_features(&f);
        let scores = router.scores(&f, Some(&p)).unwrap();
        let out = classifier.classify(text);
        assert_eq!(out.task, p, "task prediction differs for {text:?}");
        assert_eq!(out.scores, scores, "router scores differ for {text:?}");
    }
}

#[test]
fn shipped_models_classify_obvious_prompts() {
    let (task, router) = models();
    use edgeroute_core::classify::TaskType;
    assert_eq!(
        task.predict("Write a Python function to merge two sorted lists.").class,
        TaskType::Code
    );
    assert_eq!(
        task.predict("Write a short poem about autumn leaves.").class,
        TaskType::CreativeWriting
    );
    assert_eq!(router.models().len(), 2);
}
