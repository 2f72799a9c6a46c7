//! Fused prediction: the task and router models evaluated in one pass over
//! the prompt. When both share a featurizer, their weights are interleaved
//! into one row per bucket and summed without collecting the buckets, so a
//! 2,000-token chat takes well under 50 us for both predictions.

use std::fmt;

use super::features::{visit_buckets, Features, FeaturizerConfig};
use super::format::bad;
use super::model::{LinearModel, Prediction, RouterModel, TextModel};
use crate::error::Result;

/// Both predictions for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// The task type.
    pub task: Prediction,
    /// Predicted score of each LLM of the router model, in its order.
    pub scores: Vec<f64>,
}

/// The task and router weights of each bucket side by side in one row, built
/// when both models share a featurizer: each hashed feature then costs one
/// load and one fixed-width add, and no bucket list is materialised. Rows are
/// 12 lanes (24 bytes: 10 task classes + 2 routed LLMs, a 768 KiB table at
/// 2^15 buckets, which stays in L2) or 16 lanes for up to 6 routed LLMs.
#[derive(Clone)]
enum FusedRows {
    W12(Vec<[i16; 12]>),
    W16(Vec<[i16; 16]>),
}

#[derive(Clone)]
struct Fused {
    rows: FusedRows,
    task_k: usize,
    router_k: usize,
}

fn interleave<const W: usize>(task: &LinearModel, router: &LinearModel) -> Vec<[i16; W]> {
    let (kt, kr) = (task.outputs.len(), router.outputs.len());
    (0..1usize << task.featurizer.log2_buckets)
        .map(|b| {
            let mut row = [0i16; W];
            row[..kt].copy_from_slice(&task.hashed[b * kt..b * kt + kt]);
            row[kt..kt + kr].copy_from_slice(&router.hashed[b * kr..b * kr + kr]);
            row
        })
        .collect()
}

/// Sum the rows of `text`'s buckets; returns (sums, bucket count, length features).
fn accumulate<const W: usize>(rows: &[[i16; W]], text: &str, cfg: &FeaturizerConfig) -> ([i32; 16], usize, [f64; 2]) {
    let mut acc = [0i32; W];
    let mut n = 0usize;
    let length = visit_buckets(text, cfg, |b| {
        for (a, &w) in acc.iter_mut().zip(&rows[b as usize]) {
            *a += i32::from(w);
        }
        n += 1;
    });
    let mut out = [0i32; 16];
    out[..W].copy_from_slice(&acc);
    (out, n, length)
}

impl Fused {
    fn new(task: &LinearModel, router: &LinearModel) -> Option<Self> {
        let (kt, kr) = (task.outputs.len(), router.outputs.len());
        if task.featurizer != router.featurizer || task.is_tfidf() || router.is_tfidf() {
            return None;
        }
        let rows = match kt + kr {
            0..=12 => FusedRows::W12(interleave(task, router)),
            13..=16 => FusedRows::W16(interleave(task, router)),
            _ => return None,
        };
        Some(Fused {
            rows,
            task_k: kt,
            router_k: kr,
        })
    }

    fn accumulate(&self, text: &str, cfg: &FeaturizerConfig) -> ([i32; 16], usize, [f64; 2]) {
        match &self.rows {
            FusedRows::W12(rows) => accumulate(rows, text, cfg),
            FusedRows::W16(rows) => accumulate(rows, text, cfg),
        }
    }
}

impl fmt::Debug for Fused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (width, buckets) = match &self.rows {
            FusedRows::W12(r) => (12, r.len()),
            FusedRows::W16(r) => (16, r.len()),
        };
        f.debug_struct("Fused")
            .field("buckets", &buckets)
            .field("width", &width)
            .field("task_k", &self.task_k)
            .field("router_k", &self.router_k)
            .finish()
    }
}

/// A task model and a router model used together; featurizes once when both
/// share a featurizer.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// The task classifier.
    pub task: TextModel,
    /// The router (difficulty) model.
    pub router: RouterModel,
    fused: Option<Fused>,
}

impl Classifier {
    /// Pair two models; fails if the router needs task classes the task model lacks.
    pub fn new(task: TextModel, router: RouterModel) -> Result<Self> {
        if router.needs_task() && router.model.task_outputs != task.model.outputs {
            return Err(bad("router was trained with another task model's classes"));
        }
        let fused = Fused::new(&task.model, &router.model);
        Ok(Classifier { task, router, fused })
    }

    /// Load both from `ERLM` bytes.
    pub fn from_bytes(task: &[u8], router: &[u8]) -> Result<Self> {
        Classifier::new(TextModel::from_bytes(task)?, RouterModel::from_bytes(router)?)
    }

    /// The task classifier.
    pub fn task_model(&self) -> &TextModel {
        &self.task
    }

    /// The router (difficulty) model.
    pub fn router(&self) -> &RouterModel {
        &self.router
    }

    /// Task type and per-LLM scores of a prompt.
    pub fn classify(&self, text: &str) -> Classification {
        if let Some(fz) = &self.fused {
            return self.classify_fused(fz, text);
        }
        let ft = Features::extract(text, self.task.featurizer());
        let task = self.task.predict_features(&ft);
        let fr;
        let f = if self.router.featurizer() == self.task.featurizer() {
            &ft
        } else {
            fr = Features::extract(text, self.router.featurizer());
            &fr
        };
        let scores = self.router.scores(f, Some(&task)).expect("checked in Classifier::new");
        Classification { task, scores }
    }

    /// One pass over the text: sum the fused rows of its buckets, then finish
    /// both models' logits exactly as [`LinearModel::logits_into`] would.
    fn classify_fused(&self, fz: &Fused, text: &str) -> Classification {
        let (acc, n, length) = fz.accumulate(text, self.task.featurizer());
        let (kt, kr) = (fz.task_k, fz.router_k);
        let tm = &self.task.model;
        let mut probs = Vec::with_capacity(kt);
        tm.finish_logits(&acc[..kt], n, &length, None, &mut probs)
            .expect("task model has no task input");
        tm.activate(&mut probs);
        let task = self.task.prediction(probs);
        let rm = &self.router.model;
        let mut scores = Vec::with_capacity(kr);
        rm.finish_logits(&acc[kt..kt + kr], n, &length, Some(&task.probabilities), &mut scores)
            .expect("checked in Classifier::new");
        rm.activate(&mut scores);
        Classification { task, scores }
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::testdata::{model_bytes, varied_model_bytes};
    use super::super::TaskType;
    use super::*;

    #[test]
    fn router_scores_choose_and_difficulty() {
        let outs: Vec<&str> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
        let task = TextModel::from_bytes(&model_bytes(&outs, "softmax", &[], 0)).unwrap();
        let r = RouterModel::from_bytes(&model_bytes(&["weak", "strong"], "sigmoid", &["task"], 0)).unwrap();
        let c = Classifier::new(task, r).unwrap();
        let out = c.classify("hello");
        // biases 0 and 1 -> sigmoid(0) = 0.5, sigmoid(1)
        assert!((out.scores[0] - 0.5).abs() < 1e-12);
        assert!((out.scores[1] - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-12);
        assert!(RouterModel::difficulty(&out.scores, 1, 0) > 0.2);
        assert_eq!(c.router.choose(&out.scores, 0.0), 1);
        assert_eq!(c.router.choose(&out.scores, 1.0), 0);
    }

    #[test]
    fn fused_pass_equals_separate_models_at_both_widths() {
        let outs: Vec<&str> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
        let task = TextModel::from_bytes(&varied_model_bytes(&outs, "softmax", &["length"])).unwrap();
        for routed in [&["strong", "weak"][..], &["a", "b", "c", "d", "e"][..]] {
            let r = RouterModel::from_bytes(&varied_model_bytes(routed, "sigmoid", &["length", "task"])).unwrap();
            let c = Classifier::new(task.clone(), r.clone()).unwrap();
            assert!(c.fused.is_some());
            for text in [
                "",
                "hello world",
                "Write a Rust function, then prove it terminates: 1 + 2 = 3.",
            ] {
                let f = Features::extract(text, task.featurizer());
                let p = task.predict_features(&f);
                let want = r.scores(&f, Some(&p)).unwrap();
                let got = c.classify(text);
                assert_eq!(got.task, p);
                assert_eq!(got.scores, want);
            }
        }
    }
}
