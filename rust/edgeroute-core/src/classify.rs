//! Prompt classification in microseconds: task type and per-model quality.
//!
//! Two linear models over the same kind of input, both trained in Python by
//! `edgeroute.learn` and shipped as `ERLM` files in `edgeroute/models/`:
//!
//! * a **task classifier** ([`TextModel`], softmax over [`TaskType`]s), and
//! * a **router model** ([`RouterModel`], one sigmoid per LLM: the predicted
//!   score of that LLM on this prompt). With a strong and a weak model,
//!   `score[strong] - score[weak]` is the prompt's *difficulty*: how much the
//!   strong model is expected to add. With prices, [`RouterModel::choose`]
//!   picks `argmax score[m] - lambda * cost[m]`.
//!
//! Input features are hashed ([`Features::extract`]): word unigrams and bigrams
//! and byte 4-grams of the lower-cased prompt, cut to its first and last bytes
//! (1 KiB + 256 B in the shipped models, so cost is bounded whatever the prompt
//! length), plus two length
//! features. The hashing is specified in `edgeroute/learn/features.py` and must
//! stay bit-identical to it: `tests/classify_parity.rs` checks the buckets and
//! probabilities against a fixture written by the Python side.
//!
//! Weights are i16 (one scale per model), summed in i32, so the hashed part of
//! a logit is exact in both languages. When the two models share a featurizer,
//! [`Classifier`] interleaves their weights into one row per bucket and sums
//! them in a single pass over the prompt, without collecting the buckets: a
//! 2,000-token chat takes well under 50 us for both predictions. Models are loaded at run time
//! ([`LinearModel::from_bytes`]) rather than compiled in: retraining must not
//! need a rebuild of the core, and the Python package already ships the files.
//!
//! File format `ERLM` v1 (little-endian): `b"ERLM"`, `u32` header length, JSON
//! header, `i16[buckets * K]` bucket-major, `f64[D * K]` dense weights, `f64[K]`
//! bias. See `edgeroute/learn/model.py`.

use std::fmt;

use serde::Deserialize;
use thiserror::Error;

const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const SEED_UNI: u64 = 0x243F_6A88_85A3_08D3;
const SEED_BI: u64 = 0x1319_8A2E_0370_7344;
const SEED_CHAR: u64 = 0xA409_3822_299F_31D0;

/// Why a model file could not be loaded or used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// The bytes are not a valid `ERLM` v1 file.
    #[error("invalid model file: {0}")]
    Format(String),
    /// The model needs an input that was not given (e.g. task probabilities).
    #[error("model input missing: {0}")]
    MissingInput(String),
}

fn bad(msg: impl Into<String>) -> ModelError {
    ModelError::Format(msg.into())
}

/// MurmurHash3's 64-bit finaliser.
#[inline]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    k ^= k >> 33;
    k = k.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    k ^= k >> 33;
    k
}

#[inline]
fn is_word_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b >= 0x80
}

/// A whole 3-byte UTF-8 character with lead byte E3..ED (U+3000..U+DFFF: kana,
/// CJK ideographs, Hangul) starts at `i`. A character cut by the head / tail
/// window is not whole and stays part of a word (as in `features.py`).
#[inline]
fn is_cjk_char(buf: &[u8], i: usize) -> bool {
    matches!(buf.get(i..i + 3), Some([0xE3..=0xED, 0x80..=0xBF, 0x80..=0xBF]))
}

#[inline]
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(FNV_OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

#[inline]
fn is_punct_byte(b: u8) -> bool {
    b.is_ascii_punctuation() && b != b'_'
}

/// What the featurizer emits; read from the model header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FeaturizerConfig {
    /// Featurizer specification version: 1, or 2 where each CJK / kana / Hangul
    /// character is a word of its own (those scripts put no spaces between words).
    pub version: u32,
    /// The hash table has `2^log2_buckets` rows.
    pub log2_buckets: u32,
    /// Bytes kept from the start of a long prompt.
    pub head_bytes: usize,
    /// Bytes kept from the end of a long prompt.
    pub tail_bytes: usize,
    /// Emit word unigrams.
    pub word_unigrams: bool,
    /// Emit bigrams of consecutive tokens.
    pub word_bigrams: bool,
    /// Byte n-gram sizes to emit (each at most 7).
    pub char_ngrams: Vec<u8>,
}

/// The hashed features of one prompt, computed once and shared by every model
/// whose [`FeaturizerConfig`] is equal.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    buckets: Vec<u32>,
    length: [f64; 2],
}

impl Features {
    /// Hash `text` as `edgeroute/learn/features.py` does.
    pub fn extract(text: &str, cfg: &FeaturizerConfig) -> Self {
        let mut buckets = Vec::new();
        let length = visit_buckets(text, cfg, |b| buckets.push(b));
        Features { buckets, length }
    }

    /// The emitted bucket ids, in emission order (words, then byte n-grams).
    pub fn buckets(&self) -> &[u32] {
        &self.buckets
    }

    /// The two dense length features: `ln(1+bytes)/10`, `ln(1+lines)/5`.
    pub fn length(&self) -> [f64; 2] {
        self.length
    }
}

/// Longest head + tail window hashed without a heap allocation.
const STACK_WINDOW: usize = 4096;

/// Calls `visit` with every bucket of `text` in emission order (the spec of
/// `features.py`) and returns the two length features. No allocation when the
/// hashed window fits in [`STACK_WINDOW`] bytes: [`Classifier::classify`]
/// accumulates weights straight from here instead of collecting buckets.
fn visit_buckets(text: &str, cfg: &FeaturizerConfig, mut visit: impl FnMut(u32)) -> [f64; 2] {
    let raw = text.as_bytes();
    let (head, tail): (&[u8], &[u8]) = if raw.len() > cfg.head_bytes + cfg.tail_bytes {
        (&raw[..cfg.head_bytes], &raw[raw.len() - cfg.tail_bytes..])
    } else {
        (raw, &[])
    };
    let n = head.len() + tail.len();
    let mut stack = [0u8; STACK_WINDOW];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if n <= STACK_WINDOW {
        &mut stack[..n]
    } else {
        heap.resize(n, 0);
        &mut heap
    };
    buf[..head.len()].copy_from_slice(head);
    buf[head.len()..].copy_from_slice(tail);
    buf.make_ascii_lowercase();
    let mask = (1u64 << cfg.log2_buckets) - 1;
    word_buckets(buf, cfg, mask, &mut visit);
    for &g in &cfg.char_ngrams {
        char_buckets(buf, g, mask, &mut visit);
    }
    let lines = raw.iter().filter(|&&b| b == b'\n').count() + 1;
    [(raw.len() as f64).ln_1p() / 10.0, (lines as f64).ln_1p() / 5.0]
}

fn word_buckets(buf: &[u8], cfg: &FeaturizerConfig, mask: u64, visit: &mut impl FnMut(u32)) {
    let mut prev: Option<u64> = None;
    let mut emit = |h: u64| {
        if cfg.word_unigrams {
            visit((fmix64(h ^ SEED_UNI) & mask) as u32);
        }
        if cfg.word_bigrams {
            if let Some(p) = prev {
                let key = p.wrapping_mul(GOLDEN).wrapping_add(h) ^ SEED_BI;
                visit((fmix64(key) & mask) as u32);
            }
        }
        prev = Some(h);
    };
    let split_cjk = cfg.version >= 2;
    let mut i = 0;
    while i < buf.len() {
        let b = buf[i];
        if split_cjk && is_cjk_char(buf, i) {
            emit(fnv1a(&buf[i..i + 3]));
            i += 3;
        } else if is_word_byte(b) {
            let mut h = FNV_OFFSET;
            while i < buf.len() && is_word_byte(buf[i]) && !(split_cjk && is_cjk_char(buf, i)) {
                h = (h ^ u64::from(buf[i])).wrapping_mul(FNV_PRIME);
                i += 1;
            }
            emit(h);
        } else {
            if is_punct_byte(b) {
                emit((FNV_OFFSET ^ u64::from(b)).wrapping_mul(FNV_PRIME));
            }
            i += 1;
        }
    }
}

fn char_buckets(buf: &[u8], n: u8, mask: u64, visit: &mut impl FnMut(u32)) {
    let n = usize::from(n);
    if n == 0 || n > 7 || buf.len() < n {
        return;
    }
    let tag = (n as u64) << 56;
    let top = 8 * (n as u32 - 1);
    // little-endian window of the last n bytes
    let mut key: u64 = 0;
    for (j, &b) in buf[..n - 1].iter().enumerate() {
        key |= u64::from(b) << (8 * j);
    }
    for &b in &buf[n - 1..] {
        key |= u64::from(b) << top;
        visit((fmix64((key | tag) ^ SEED_CHAR) & mask) as u32);
        key >>= 8;
    }
}

/// Output non-linearity of a [`LinearModel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// One distribution over the outputs (classifiers).
    Softmax,
    /// Independent probabilities (one per routed model).
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DenseBlock {
    Length,
    Task,
}

#[derive(Deserialize)]
struct Header {
    format: u32,
    featurizer: FeaturizerConfig,
    outputs: Vec<String>,
    activation: String,
    dense: Vec<String>,
    #[serde(default)]
    task_outputs: Vec<String>,
    scale: f64,
    #[serde(default)]
    meta: serde_json::Value,
}

/// A quantised linear model over [`Features`] (the `ERLM` file, decoded).
#[derive(Clone)]
pub struct LinearModel {
    featurizer: FeaturizerConfig,
    outputs: Vec<String>,
    activation: Activation,
    dense: Vec<DenseBlock>,
    task_outputs: Vec<String>,
    scale: f64,
    hashed: Vec<i16>,
    dense_weights: Vec<f64>,
    bias: Vec<f64>,
    meta: serde_json::Value,
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

fn take<'a>(data: &'a [u8], off: &mut usize, len: usize) -> Result<&'a [u8], ModelError> {
    let end = off.checked_add(len).ok_or_else(|| bad("length overflow"))?;
    let s = data.get(*off..end).ok_or_else(|| bad("file is truncated"))?;
    *off = end;
    Ok(s)
}

impl LinearModel {
    /// Decode an `ERLM` v1 file.
    pub fn from_bytes(data: &[u8]) -> Result<Self, ModelError> {
        let mut off = 0;
        if take(data, &mut off, 4)? != b"ERLM" {
            return Err(bad("missing ERLM magic"));
        }
        let hlen = u32::from_le_bytes(take(data, &mut off, 4)?.try_into().expect("4 bytes"));
        let header: Header =
            serde_json::from_slice(take(data, &mut off, hlen as usize)?).map_err(|e| bad(format!("header: {e}")))?;
        if header.format != 1 || !(1..=2).contains(&header.featurizer.version) {
            return Err(bad("unsupported format or featurizer version"));
        }
        let fc = &header.featurizer;
        if !(8..=24).contains(&fc.log2_buckets) || fc.char_ngrams.iter().any(|&n| n == 0 || n > 7) {
            return Err(bad("featurizer parameters out of range"));
        }
        let k = header.outputs.len();
        if k == 0 {
            return Err(bad("model has no outputs"));
        }
        let activation = match header.activation.as_str() {
            "softmax" => Activation::Softmax,
            "sigmoid" => Activation::Sigmoid,
            other => return Err(bad(format!("unknown activation {other:?}"))),
        };
        let mut dense = Vec::new();
        let mut d = 0;
        for block in &header.dense {
            match block.as_str() {
                "length" => {
                    dense.push(DenseBlock::Length);
                    d += 2;
                }
                "task" => {
                    dense.push(DenseBlock::Task);
                    d += header.task_outputs.len();
                }
                other => return Err(bad(format!("unknown dense block {other:?}"))),
            }
        }
        if !header.scale.is_finite() {
            return Err(bad("scale is not finite"));
        }
        let nh = (1usize << fc.log2_buckets) * k;
        let hashed = take(data, &mut off, 2 * nh)?
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        let f64s = |bytes: &[u8]| -> Vec<f64> {
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        };
        let dense_weights = f64s(take(data, &mut off, 8 * d * k)?);
        let bias = f64s(take(data, &mut off, 8 * k)?);
        if off != data.len() {
            return Err(bad("trailing bytes after the model"));
        }
        Ok(LinearModel {
            featurizer: header.featurizer,
            outputs: header.outputs,
            activation,
            dense,
            task_outputs: header.task_outputs,
            scale: header.scale,
            hashed,
            dense_weights,
            bias,
            meta: header.meta,
        })
    }

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

    /// Raw scores (before the activation), written into `out` (cleared first).
    pub fn logits_into(&self, f: &Features, task: Option<&[f64]>, out: &mut Vec<f64>) -> Result<(), ModelError> {
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
            for &b in &f.buckets {
                *a += i32::from(self.hashed[b as usize]);
            }
        } else {
            for &b in &f.buckets {
                let row = &self.hashed[b as usize * k..b as usize * k + k];
                for (a, &w) in acc.iter_mut().zip(row) {
                    *a += i32::from(w);
                }
            }
        }
        self.finish_logits(acc, f.buckets.len(), &f.length, task, out)
    }

    /// Logits from the summed hashed weights `acc` of `n` buckets plus the dense
    /// inputs; shared by [`LinearModel::logits_into`] and the fused path of
    /// [`Classifier::classify`] so that both compute bit-identical numbers.
    fn finish_logits(
        &self,
        acc: &[i32],
        n: usize,
        length: &[f64; 2],
        task: Option<&[f64]>,
        out: &mut Vec<f64>,
    ) -> Result<(), ModelError> {
        let k = self.outputs.len();
        let norm = if n == 0 { 1.0 } else { (n as f64).sqrt() };
        out.clear();
        out.extend(acc.iter().map(|&a| (self.scale * f64::from(a)) / norm));
        let mut row = 0;
        for block in &self.dense {
            let xs: &[f64] = match block {
                DenseBlock::Length => length,
                DenseBlock::Task => match task {
                    Some(t) if t.len() == self.task_outputs.len() => t,
                    _ => {
                        return Err(ModelError::MissingInput(format!(
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
    fn activate(&self, z: &mut [f64]) {
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
    pub fn predict(&self, f: &Features, task: Option<&[f64]>) -> Result<Vec<f64>, ModelError> {
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
    model: LinearModel,
    classes: Vec<TaskType>,
}

impl TextModel {
    /// Load a task classifier (`edgeroute/models/task.erlm`).
    pub fn from_bytes(data: &[u8]) -> Result<Self, ModelError> {
        let model = LinearModel::from_bytes(data)?;
        if model.activation != Activation::Softmax || model.needs_task() {
            return Err(bad("a task model is a softmax over text features only"));
        }
        let classes = model
            .outputs
            .iter()
            .map(|o| TaskType::parse(o).ok_or_else(|| bad(format!("unknown task class {o:?}"))))
            .collect::<Result<_, _>>()?;
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

    fn prediction(&self, probabilities: Vec<f64>) -> Prediction {
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
    model: LinearModel,
    costs: Vec<f64>,
}

impl RouterModel {
    /// Load a router model (`edgeroute/models/router-*.erlm`).
    pub fn from_bytes(data: &[u8]) -> Result<Self, ModelError> {
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
    pub fn scores(&self, f: &Features, task: Option<&Prediction>) -> Result<Vec<f64>, ModelError> {
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
        if task.featurizer != router.featurizer {
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
    pub fn new(task: TextModel, router: RouterModel) -> Result<Self, ModelError> {
        if router.needs_task() && router.model.task_outputs != task.model.outputs {
            return Err(bad("router was trained with another task model's classes"));
        }
        let fused = Fused::new(&task.model, &router.model);
        Ok(Classifier { task, router, fused })
    }

    /// Load both from `ERLM` bytes.
    pub fn from_bytes(task: &[u8], router: &[u8]) -> Result<Self, ModelError> {
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
    use super::*;

    fn cfg(log2: u32, chars: Vec<u8>) -> FeaturizerConfig {
        FeaturizerConfig {
            version: 1,
            log2_buckets: log2,
            head_bytes: 16,
            tail_bytes: 8,
            word_unigrams: true,
            word_bigrams: true,
            char_ngrams: chars,
        }
    }

    /// Build a model file by hand: K outputs, every hashed weight `w`.
    fn model_bytes(outputs: &[&str], activation: &str, dense: &[&str], w: i16) -> Vec<u8> {
        let task_outputs: Vec<&str> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
        let header = serde_json::json!({
            "format": 1,
            "featurizer": {"version": 1, "log2_buckets": 8, "head_bytes": 64, "tail_bytes": 16,
                            "word_unigrams": true, "word_bigrams": false, "char_ngrams": []},
            "outputs": outputs, "activation": activation, "dense": dense,
            "task_outputs": task_outputs, "scale": 0.5,
            "meta": {"costs": {"strong": 2.0, "weak": 0.5}},
        });
        let h = serde_json::to_vec(&header).unwrap();
        let k = outputs.len();
        let d: usize = dense.iter().map(|b| if *b == "length" { 2 } else { 10 }).sum();
        let mut out = b"ERLM".to_vec();
        out.extend((h.len() as u32).to_le_bytes());
        out.extend(h);
        for _ in 0..256 * k {
            out.extend(w.to_le_bytes());
        }
        for _ in 0..d * k {
            out.extend(0.0f64.to_le_bytes());
        }
        for j in 0..k {
            out.extend((j as f64).to_le_bytes());
        }
        out
    }

    #[test]
    fn fnv_and_fmix_match_reference_values() {
        // fnv1a64("a") and fmix64(1), well-known constants
        assert_eq!((FNV_OFFSET ^ 0x61).wrapping_mul(FNV_PRIME), 0xAF63_DC4C_8601_EC8C);
        assert_eq!(fmix64(0), 0);
        assert_ne!(fmix64(1), 1);
    }

    #[test]
    fn tokens_words_punctuation_and_bigrams() {
        let c = cfg(16, vec![]);
        // "Hi, x" -> tokens hi , x : 3 unigrams + 2 bigrams
        assert_eq!(Features::extract("Hi, x", &c).buckets().len(), 5);
        // case-insensitive
        assert_eq!(Features::extract("HELLO", &c), {
            let mut f = Features::extract("hello", &c);
            f.length = Features::extract("HELLO", &c).length;
            f
        });
        assert!(Features::extract("   \n\t ", &c).buckets().is_empty());
    }

    #[test]
    fn char_ngrams_count_and_truncation() {
        let c = cfg(16, vec![4]);
        let f = Features::extract("abcdef", &c);
        // 1 word + 3 four-grams
        assert_eq!(f.buckets().len(), 4);
        let long = "x".repeat(1000);
        let f = Features::extract(&long, &c);
        // truncated to 16 + 8 bytes: one word, 21 four-grams, all the same bucket
        assert_eq!(f.buckets().len(), 22);
        assert!(f.buckets()[1..].windows(2).all(|w| w[0] == w[1]));
        // the length features see the whole prompt
        assert!((f.length()[0] - 1001f64.ln() / 10.0).abs() < 1e-12);
    }

    #[test]
    fn rolling_window_matches_direct_key() {
        let buf = b"hello, world";
        let mut out = Vec::new();
        char_buckets(buf, 3, u64::MAX, &mut |b| out.push(b));
        for (i, &b) in out.iter().enumerate() {
            let key = u64::from(buf[i]) | u64::from(buf[i + 1]) << 8 | u64::from(buf[i + 2]) << 16 | 3 << 56;
            assert_eq!(b, fmix64(key ^ SEED_CHAR) as u32);
        }
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
    fn router_scores_choose_and_difficulty() {
        let outs: Vec<&str> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
        let task = TextModel::from_bytes(&model_bytes(&outs, "softmax", &[], 0)).unwrap();
        let r = RouterModel::from_bytes(&model_bytes(&["weak", "strong"], "sigmoid", &["task"], 0)).unwrap();
        assert!(r.needs_task());
        assert_eq!(r.costs(), &[0.5, 2.0]);
        let f = Features::extract("hello", r.featurizer());
        assert!(matches!(r.scores(&f, None), Err(ModelError::MissingInput(_))));
        let c = Classifier::new(task, r).unwrap();
        let out = c.classify("hello");
        // biases 0 and 1 -> sigmoid(0) = 0.5, sigmoid(1)
        assert!((out.scores[0] - 0.5).abs() < 1e-12);
        assert!((out.scores[1] - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-12);
        assert!(RouterModel::difficulty(&out.scores, 1, 0) > 0.2);
        assert_eq!(c.router.choose(&out.scores, 0.0), 1);
        assert_eq!(c.router.choose(&out.scores, 1.0), 0);
    }

    /// Like `model_bytes`, with distinct weights per bucket and output.
    fn varied_model_bytes(outputs: &[&str], activation: &str, dense: &[&str]) -> Vec<u8> {
        let mut bytes = model_bytes(outputs, activation, dense, 0);
        let hlen = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let k = outputs.len();
        for i in 0..256 * k {
            let w = ((i * 7919) % 601) as i16 - 300;
            bytes[8 + hlen + 2 * i..8 + hlen + 2 * i + 2].copy_from_slice(&w.to_le_bytes());
        }
        bytes
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

    #[test]
    fn rejects_bad_files() {
        let good = model_bytes(&["a", "b"], "sigmoid", &["length"], 1);
        assert!(LinearModel::from_bytes(&good).is_ok());
        assert!(LinearModel::from_bytes(&good[..good.len() - 1]).is_err());
        let mut extra = good.clone();
        extra.push(0);
        assert!(LinearModel::from_bytes(&extra).is_err());
        assert!(LinearModel::from_bytes(b"NOPE").is_err());
        assert!(TextModel::from_bytes(&good).is_err()); // sigmoid, unknown classes
    }
}
