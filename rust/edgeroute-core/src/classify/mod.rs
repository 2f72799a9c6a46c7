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
//! The module is four pieces, each owning one concern:
//!
//! * `features`: the hashed featurizer ([`Features::extract`]), bit-identical
//!   to `edgeroute/learn/features.py`;
//! * `format`: decoding the `ERLM` v1 file ([`LinearModel::from_bytes`]);
//! * `model`: the linear model and the task / router models built on it;
//! * `fused`: [`Classifier`], both predictions in one pass over the prompt.
//!
//! Models are loaded at run time rather than compiled in: retraining must not
//! need a rebuild of the core, and the Python package already ships the files.
//! A bad file or a missing input is a [`crate::CoreError`] (`ModelFile`,
//! `ModelInput`), the crate's one error type.

mod features;
mod format;
mod fused;
mod model;

pub use features::{Features, FeaturizerConfig};
pub use fused::{Classification, Classifier};
pub use model::{Activation, LinearModel, Prediction, RouterModel, TaskType, TextModel};
