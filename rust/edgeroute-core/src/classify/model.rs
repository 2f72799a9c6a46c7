//! The linear models: a quantised [`LinearModel`] (i16 hashed weights, one
//! scale per model, summed in i32 so the hashed part of a logit is exact in
//! both languages), and the two ways edgeroute uses it: the task classifier
//! ([`TextModel`], a softmax over [`TaskType`]s) and the router model
//! ([`RouterModel`], one sigmoid per routed LLM).

use std::fmt;

use super::features::{Features, FeaturizerConfig};
use super::format::bad;
use crate::error::{CoreError, Result};

/// Output non-linearity of a [`LinearModel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// One distribution over the outputs (classifiers).
    Softmax,
    /// Independent probabilities (one per routed model).
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DenseBlock {
    Length,
    Task,
}

/// A quantised linear model over [`Features`] (the `ERLM` file, decoded).
#[derive(Clone)]
pub struct LinearModel {
    pub(super) featurizer: FeaturizerConfig,
    pub(super) outputs: Vec<String>,
    pub(super) activation: Activation,
    pub(super) dense: Vec<DenseBlock>,
    pub(super) task_outputs: Vec<String>,
    pub(super) scale: f64,
    pub(super) hashed: Vec<i16>,
    pub(super) dense_weights: Vec<f64>,
    pub(super) bias: Vec<f64>,
    pub(super) meta: serde_json::Value,
    /// Inverse document frequency of each bucket (format 2, `"weighting": "tfidf"`);
    /// `None`: count weighting.
    pub(super) idf: Option<Vec<f32>>,
}

impl fmt::Debug for LinearModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinearModel")
            .field("outputs", &self.outputs)
            .field("activation", &self.activation)
            .field("featurizer", &self.featurizer)
            .finish_non_exhaustive()
    }
}

impl LinearModel {
    /// The featurizer this model was trained with.
    pub fn featurizer(&self) -> &FeaturizerConfig {
        &self.featurizer
    }

    /// Output names, in output order.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// The softmax or sigmoid of the outputs.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Whether [`LinearModel::predict`] needs task-classifier probabilities.
    pub fn needs_task(&self) -> bool {
        self.dense.contains(&DenseBlock::Task)
    }

    /// Free-form training metadata from the header (`meta`).
    pub fn meta(&self) -> &serde_json::Value {
        &self.meta
    }

    /// Whether the hashed features are tf-idf weighted (else counts over `sqrt(n)`).
    pub fn is_tfidf(&self) -> bool {
        self.idf.is_some()
    }

    /// Raw scores (before the activation), written into `out` (cleared first).
    pub fn logits_into(&self, f: &Features, task: Option<&[f64]>, out: &mut Vec<f64>) -> Result<()> {
        if let Some(idf) = &self.idf {
            self.tfidf_hashed(idf, f.buckets(), out);
            return self.dense_and_bias(&f.length(), task, out);
        }
        let k = self.outputs.len();
        let mut acc = [0i32; 32];
        let mut big: Vec<i32>;
        let acc: &mut [i32] = if k <= acc.len() {
            &mut acc[..k]
        } else {
            big = vec![0; k];
            &mut big
        };
        if k == 1 {
            let a = &mut acc[0];
            for &b in f.buckets() {
                *a += i32::from(self.hashed[b as usize]);
            }
        } else {
            for &b in f.buckets() {
                let row = &self.hashed[b as usize * k..b as usize * k + k];
                for (a, &w) in acc.iter_mut().zip(row) {
                    *a += i32::from(w);
                }
            }
        }
        self.finish_logits(acc, f.buckets().len(), &f.length(), task, out)
    }

    /// Logits from the summed hashed weights `acc` of `n` buckets plus the dense
    /// inputs; shared by [`LinearModel::logits_into`] and the fused path of
    /// [`super::Classifier::classify`] so that both compute bit-identical numbers.
    pub(super) fn finish_logits(
        &self,
        acc: &[i32],
        n: usize,
        length: &[f64; 2],
        task: Option<&[f64]>,
        out: &mut Vec<f64>,
    ) -> Result<()> {
        let norm = if n == 0 { 1.0 } else { (n as f64).sqrt() };
        out.clear();
        out.extend(acc.iter().map(|&a| (self.scale * f64::from(a)) / norm));
        self.dense_and_bias(length, task, out)
    }

    /// The hashed part of the logits with tf-idf weighting (the spec in
    /// `edgeroute/learn/model.py`): each distinct bucket `b`, in ascending order,
    /// with count `c` has value `v = (1 + ln c) * idf[b]`; the logit is
    /// `scale * sum(v * w[b]) / sqrt(sum(v^2))`, summed in f64 in that order.
    fn tfidf_hashed(&self, idf: &[f32], buckets: &[u32], out: &mut Vec<f64>) {
        let k = self.outputs.len();
        let mut stack = [0u32; 2048];
        let mut heap = Vec::new();
        let sorted: &mut [u32] = if buckets.len() <= stack.len() {
            &mut stack[..buckets.len()]
        } else {
            heap.extend_from_slice(buckets);
            &mut heap
        };
        sorted.copy_from_slice(buckets);
        sorted.sort_unstable();
        out.clear();
        out.resize(k, 0.0);
        let mut sumsq = 0.0f64;
        let mut i = 0;
        while i < sorted.len() {
            let b = sorted[i];
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == b {
                j += 1;
            }
            let c = j - i;
            let tf = if c == 1 { 1.0 } else { 1.0 + (c as f64).ln() };
            let v = tf * f64::from(idf[b as usize]);
            sumsq += v * v;
            let row = &self.hashed[b as usize * k..b as usize * k + k];
            for (a, &w) in out.iter_mut().zip(row) {
                *a += v * f64::from(w);
            }
            i = j;
        }
        let norm = if sumsq > 0.0 { sumsq.sqrt() } else { 1.0 };
        for a in out.iter_mut() {
            *a = (self.scale * *a) / norm;
        }
    }

    /// Adds the dense inputs' and the bias's part to the hashed logits in `out`.
    fn dense_and_bias(&self, length: &[f64; 2], task: Option<&[f64]>, out: &mut [f64]) -> Result<()> {
        let k = self.outputs.len();
        let mut row = 0;
        for block in &self.dense {
            let xs: &[f64] = match block {
                DenseBlock::Length => length,
                DenseBlock::Task => match task {
                    Some(t) if t.len() == self.task_outputs.len() => t,
                    _ => {
                        return Err(CoreError::ModelInput(format!(
                            "task probabilities over {} classes",
                            self.task_outputs.len()
                        )))
                    }
                },
            };
            for &x in xs {
                let w = &self.dense_weights[row * k..row * k + k];
                for (z, &wj) in out.iter_mut().zip(w) {
                    *z += x * wj;
                }
                row += 1;
            }
        }
        for (z, &b) in out.iter_mut().zip(&self.bias) {
            *z += b;
        }
        Ok(())
    }

    /// Apply the activation in place.
    pub(super) fn activate(&self, z: &mut [f64]) {
        match self.activation {
            Activation::Softmax => {
                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut s = 0.0;
                for v in z.iter_mut() {
                    *v = (*v - m).exp();
                    s += *v;
                }
                for v in z.iter_mut() {
                    *v /= s;
                }
            }
            Activation::Sigmoid => {
                for v in z.iter_mut() {
                    *v = 1.0 / (1.0 + (-*v).exp());
                }
            }
        }
    }

    /// Output probabilities for already-extracted features.
    ///
    /// `f` must come from [`Features::extract`] with this model's featurizer.
    pub fn predict(&self, f: &Features, task: Option<&[f64]>) -> Result<Vec<f64>> {
        let mut z = Vec::with_capacity(self.outputs.len());
        self.logits_into(f, task, &mut z)?;
        self.activate(&mut z);
        Ok(z)
    }
}

/// The task types a [`TextModel`] can predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskType {
    /// Writing, fixing or explaining code, shell, SQL, config.
    Code,
    /// Calculation, word problems, proofs.
    Math,
    /// Logic puzzles and multi-step reasoning without heavy maths.
    Reasoning,
    /// Stories, poems, lyrics, role-play, prose composition.
    CreativeWriting,
    /// Condensing a given text.
    Summarization,
    /// Pulling structured fields out of a given text.
    Extraction,
    /// Translating between languages.
    Translation,
    /// Factual questions (exam-style knowledge).
    KnowledgeQa,
    /// Greetings and small talk.
    Chat,
    /// Anything else (advice, planning, business, ...).
    Other,
}

impl TaskType {
    /// All task types, in the canonical order used by the trainer.
    pub const ALL: [TaskType; 10] = [
        TaskType::Code,
        TaskType::Math,
        TaskType::Reasoning,
        TaskType::CreativeWriting,
        TaskType::Summarization,
        TaskType::Extraction,
        TaskType::Translation,
        TaskType::KnowledgeQa,
        TaskType::Chat,
        TaskType::Other,
    ];

    /// The label used in model files and configs (`"creative_writing"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::Code => "code",
            TaskType::Math => "math",
            TaskType::Reasoning => "reasoning",
            TaskType::CreativeWriting => "creative_writing",
            TaskType::Summarization => "summarization",
            TaskType::Extraction => "extraction",
            TaskType::Translation => "translation",
            TaskType::KnowledgeQa => "knowledge_qa",
            TaskType::Chat => "chat",
            TaskType::Other => "other",
        }
    }

    /// Parse a label as written by [`TaskType::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        TaskType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task prediction: the most likely class and the whole distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The arg-max class.
    pub class: TaskType,
    /// One probability per class of the model, in [`TextModel::classes`] order.
    pub probabilities: Vec<f64>,
}

impl Prediction {
    /// Probability of one class (0 if the model does not know it).
    pub fn probability(&self, model: &TextModel, t: TaskType) -> f64 {
        model
            .classes
            .iter()
            .position(|&c| c == t)
            .map_or(0.0, |i| self.probabilities[i])
    }
}

/// The task-type classifier.
#[derive(Debug, Clone)]
pub struct TextModel {
    pub(super) model: LinearModel,
    classes: Vec<TaskType>,
}

impl TextModel {
    /// Load a task classifier (`edgeroute/models/task.erlm`).
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let model = LinearModel::from_bytes(data)?;
        if model.activation != Activation::Softmax || model.needs_task() {
            return Err(bad("a task model is a softmax over text features only"));
        }
        let classes = model
            .outputs
            .iter()
            .map(|o| TaskType::parse(o).ok_or_else(|| bad(format!("unknown task class {o:?}"))))
            .collect::<Result<_>>()?;
        Ok(TextModel { model, classes })
    }

    /// The classes, in probability order.
    pub fn classes(&self) -> &[TaskType] {
        &self.classes
    }

    /// The underlying linear model.
    pub fn linear(&self) -> &LinearModel {
        &self.model
    }

    /// Classify already-extracted features (see [`TextModel::featurizer`]).
    pub fn predict_features(&self, f: &Features) -> Prediction {
        let probabilities = self.model.predict(f, None).expect("task model has no task input");
        self.prediction(probabilities)
    }

    pub(super) fn prediction(&self, probabilities: Vec<f64>) -> Prediction {
        let best = probabilities
            .iter()
            .enumerate()
            .fold(0, |bi, (i, &p)| if p > probabilities[bi] { i } else { bi });
        Prediction {
            class: self.classes[best],
            probabilities,
        }
    }

    /// Classify a prompt.
    pub fn predict(&self, text: &str) -> Prediction {
        self.predict_features(&Features::extract(text, &self.model.featurizer))
    }

    /// The featurizer of this model.
    pub fn featurizer(&self) -> &FeaturizerConfig {
        &self.model.featurizer
    }
}

/// Predicted quality of each routed LLM on a prompt, and the routing rule.
#[derive(Debug, Clone)]
pub struct RouterModel {
    pub(super) model: LinearModel,
    costs: Vec<f64>,
}

impl RouterModel {
    /// Load a router model (`edgeroute/models/router-*.erlm`).
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let model = LinearModel::from_bytes(data)?;
        if model.activation != Activation::Sigmoid {
            return Err(bad("a router model has one sigmoid per LLM"));
        }
        let costs = model
            .outputs
            .iter()
            .map(|o| model.meta["costs"][o].as_f64().unwrap_or(0.0))
            .collect();
        Ok(RouterModel { model, costs })
    }

    /// The routed LLMs, in score order.
    pub fn models(&self) -> &[String] {
        &self.model.outputs
    }

    /// Mean cost per call of each LLM in the training outcomes (USD).
    pub fn costs(&self) -> &[f64] {
        &self.costs
    }

    /// The underlying linear model.
    pub fn linear(&self) -> &LinearModel {
        &self.model
    }

    /// Whether [`RouterModel::scores`] needs a task prediction.
    pub fn needs_task(&self) -> bool {
        self.model.needs_task()
    }

    /// Predicted score in [0, 1] of each LLM on the prompt whose features are `f`.
    pub fn scores(&self, f: &Features, task: Option<&Prediction>) -> Result<Vec<f64>> {
        self.model.predict(f, task.map(|p| p.probabilities.as_slice()))
    }

    /// `score[strong] - score[weak]`: how much the strong model is expected to add.
    pub fn difficulty(scores: &[f64], strong: usize, weak: usize) -> f64 {
        scores[strong] - scores[weak]
    }

    /// The LLM maximising `score - lambda * cost` (lambda: USD per quality point
    /// is `1 / lambda`; 0 means quality only).
    pub fn choose(&self, scores: &[f64], lambda: f64) -> usize {
        let mut best = 0;
        let mut best_v = f64::NEG_INFINITY;
        for (i, (&s, &c)) in scores.iter().zip(&self.costs).enumerate() {
            let v = s - lambda * c;
            if v > best_v {
                best = i;
                best_v = v;
            }
        }
        best
    }

    /// The featurizer of this model.
    pub fn featurizer(&self) -> &FeaturizerConfig {
        &self.model.featurizer
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::testdata::{model_bytes, tfidf_model_bytes, varied_model_bytes};
    use super::*;

    /// The tf-idf logits by the spec, the slow way (a map of counts).
    fn tfidf_reference(m: &LinearModel, f: &Features) -> Vec<f64> {
        let idf = m.idf.as_ref().unwrap();
        let k = m.outputs.len();
        let mut counts = std::collections::BTreeMap::new();
        for &b in f.buckets() {
            *counts.entry(b).or_insert(0usize) += 1;
        }
        let mut acc = vec![0.0; k];
        let mut sumsq = 0.0;
        for (&b, &c) in &counts {
            let v = (1.0 + (c as f64).ln()) * f64::from(idf[b as usize]);
            sumsq += v * v;
            for (j, a) in acc.iter_mut().enumerate() {
                *a += v * f64::from(m.hashed[b as usize * k + j]);
            }
        }
        let [l0, l1] = f.length();
        (0..k)
            .map(|j| {
                let norm = if sumsq > 0.0 { sumsq.sqrt() } else { 1.0 };
                m.scale * acc[j] / norm + l0 * m.dense_weights[j] + l1 * m.dense_weights[k + j] + m.bias[j]
            })
            .collect()
    }

    #[test]
    fn tfidf_logits_follow_the_spec() {
        let m = LinearModel::from_bytes(&tfidf_model_bytes(&["strong", "weak"], &["length"])).unwrap();
        let count = LinearModel::from_bytes(&varied_model_bytes(&["strong", "weak"], "sigmoid", &["length"])).unwrap();
        let long: String = "why does the sky look blue at noon ".repeat(400);
        for text in ["", "hello", "the cat the cat the dog, the end", long.as_str()] {
            let f = Features::extract(text, &m.featurizer);
            let mut z = Vec::new();
            m.logits_into(&f, None, &mut z).unwrap();
            let want = tfidf_reference(&m, &f);
            for (a, b) in z.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{text:?}: {a} vs {b}");
            }
            if f.buckets().len() > 1 {
                // the same weights read as counts give another answer
                let mut zc = Vec::new();
                count.logits_into(&f, None, &mut zc).unwrap();
                assert_ne!(z, zc, "{text:?}");
            }
        }
        // a word repeated: 1 + ln(count), then L2-normalised, so repetition saturates
        let once = Features::extract("hello", &m.featurizer);
        let many = Features::extract("hello hello hello hello", &m.featurizer);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        m.logits_into(&once, None, &mut a).unwrap();
        m.logits_into(&many, None, &mut b).unwrap();
        let hashed = |z: &[f64], f: &Features| {
            z[0] - f.length()[0] * m.dense_weights[0] - f.length()[1] * m.dense_weights[2] - m.bias[0]
        };
        assert!((hashed(&a, &once) - hashed(&b, &many)).abs() < 1e-9);
    }

    #[test]
    fn tfidf_router_is_never_fused_and_scores_alike_through_the_classifier() {
        let outs: Vec<&str> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
        let task = model_bytes(&outs, "softmax", &["length"], 3);
        let router = tfidf_model_bytes(&["strong", "weak"], &["length"]);
        let clf = super::super::Classifier::from_bytes(&task, &router).unwrap();
        let text = "Explain the proof, then the proof again.";
        let c = clf.classify(text);
        let r = RouterModel::from_bytes(&router).unwrap();
        let direct = r.scores(&Features::extract(text, r.featurizer()), None).unwrap();
        assert_eq!(c.scores, direct);
        assert!(format!("{clf:?}").contains("fused: None"));
    }

    #[test]
    fn load_and_predict_softmax() {
        let outs: Vec<&str> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
        let m = TextModel::from_bytes(&model_bytes(&outs, "softmax", &["length"], 3)).unwrap();
        let p = m.predict("write a poem");
        assert!((p.probabilities.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // equal hashed weights, biases 0..9: the last class wins
        assert_eq!(p.class, TaskType::Other);
        assert!(p.probability(&m, TaskType::Other) > p.probability(&m, TaskType::Code));
    }

    #[test]
    fn router_without_task_input_is_an_error() {
        let r = RouterModel::from_bytes(&model_bytes(&["weak", "strong"], "sigmoid", &["task"], 0)).unwrap();
        assert!(r.needs_task());
        assert_eq!(r.costs(), &[0.5, 2.0]);
        let f = Features::extract("hello", r.featurizer());
        assert!(matches!(r.scores(&f, None), Err(CoreError::ModelInput(_))));
    }
}
