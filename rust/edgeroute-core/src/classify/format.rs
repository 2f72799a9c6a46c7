//! The `ERLM` model file (little-endian): `b"ERLM"`, `u32` header length,
//! JSON header, `i16[buckets * K]` bucket-major, `f64[D * K]` dense weights,
//! `f64[K]` bias; format 2 with `"weighting": "tfidf"` then `f32[buckets]`, the
//! inverse document frequency of each bucket (format 1 files, count weighting,
//! load as before). Written by `edgeroute/learn/model.py`; decoding validates
//! every size and range so that a bad file is an error, never a panic later.

use serde::Deserialize;

use super::features::FeaturizerConfig;
use super::model::{Activation, DenseBlock, LinearModel};
use crate::error::{CoreError, Result};

pub(super) fn bad(msg: impl Into<String>) -> CoreError {
    CoreError::ModelFile(msg.into())
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
    #[serde(default)]
    weighting: Option<String>,
}

fn take<'a>(data: &'a [u8], off: &mut usize, len: usize) -> Result<&'a [u8]> {
    let end = off.checked_add(len).ok_or_else(|| bad("length overflow"))?;
    let s = data.get(*off..end).ok_or_else(|| bad("file is truncated"))?;
    *off = end;
    Ok(s)
}

impl LinearModel {
    /// Decode an `ERLM` file (format 1 or 2).
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let mut off = 0;
        if take(data, &mut off, 4)? != b"ERLM" {
            return Err(bad("missing ERLM magic"));
        }
        let hlen = u32::from_le_bytes(take(data, &mut off, 4)?.try_into().expect("4 bytes"));
        let header: Header =
            serde_json::from_slice(take(data, &mut off, hlen as usize)?).map_err(|e| bad(format!("header: {e}")))?;
        if !(1..=2).contains(&header.format) || !(1..=2).contains(&header.featurizer.version) {
            return Err(bad("unsupported format or featurizer version"));
        }
        let tfidf = match (header.format, header.weighting.as_deref()) {
            (1, None) | (2, Some("count")) => false,
            (2, Some("tfidf")) => true,
            (_, w) => return Err(bad(format!("unsupported weighting {w:?} for format {}", header.format))),
        };
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
        let idf = if tfidf {
            let idf: Vec<f32> = take(data, &mut off, 4 << fc.log2_buckets)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            if idf.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(bad("idf weights must be finite and non-negative"));
            }
            Some(idf)
        } else {
            None
        };
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
            idf,
        })
    }
}

/// Model files built by hand, for the tests of this module and its siblings.
#[cfg(test)]
pub(super) mod testdata {
    use super::super::TaskType;

    /// K outputs, every hashed weight `w`, biases 0..K, costs strong 2.0 / weak 0.5.
    pub fn model_bytes(outputs: &[&str], activation: &str, dense: &[&str], w: i16) -> Vec<u8> {
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

    /// Like [`varied_model_bytes`] in format 2 with tf-idf weighting: bucket `b`'s idf is
    /// `1 + (b % 5) / 4`.
    pub fn tfidf_model_bytes(outputs: &[&str], dense: &[&str]) -> Vec<u8> {
        let old = varied_model_bytes(outputs, "sigmoid", dense);
        let hlen = u32::from_le_bytes(old[4..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&old[8..8 + hlen]).unwrap();
        header["format"] = 2.into();
        header["weighting"] = "tfidf".into();
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = b"ERLM".to_vec();
        out.extend((h.len() as u32).to_le_bytes());
        out.extend(h);
        out.extend(&old[8 + hlen..]);
        for b in 0..256u32 {
            out.extend((1.0f32 + (b % 5) as f32 / 4.0).to_le_bytes());
        }
        out
    }

    /// Like [`model_bytes`], with distinct weights per bucket and output.
    pub fn varied_model_bytes(outputs: &[&str], activation: &str, dense: &[&str]) -> Vec<u8> {
        let mut bytes = model_bytes(outputs, activation, dense, 0);
        let hlen = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let k = outputs.len();
        for i in 0..256 * k {
            let w = ((i * 7919) % 601) as i16 - 300;
            bytes[8 + hlen + 2 * i..8 + hlen + 2 * i + 2].copy_from_slice(&w.to_le_bytes());
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::super::TextModel;
    use super::testdata::{model_bytes, tfidf_model_bytes};
    use super::*;

    #[test]
    fn rejects_bad_files() {
        let good = model_bytes(&["a", "b"], "sigmoid", &["length"], 1);
        assert!(LinearModel::from_bytes(&good).is_ok());
        assert!(LinearModel::from_bytes(&good[..good.len() - 1]).is_err());
        let mut extra = good.clone();
        extra.push(0);
        assert!(LinearModel::from_bytes(&extra).is_err());
        assert!(matches!(LinearModel::from_bytes(b"NOPE"), Err(CoreError::ModelFile(_))));
        assert!(TextModel::from_bytes(&good).is_err()); // sigmoid, unknown classes
    }

    #[test]
    fn tfidf_files_need_format_2_and_the_whole_idf_table() {
        let good = tfidf_model_bytes(&["a", "b"], &["length"]);
        let m = LinearModel::from_bytes(&good).unwrap();
        assert_eq!(m.idf.as_ref().map(Vec::len), Some(256));
        assert!(LinearModel::from_bytes(&good[..good.len() - 4]).is_err());
        let mut extra = good.clone();
        extra.extend(0f32.to_le_bytes());
        assert!(LinearModel::from_bytes(&extra).is_err());
        // a negative idf is refused
        let mut neg = good.clone();
        let n = neg.len();
        neg[n - 4..].copy_from_slice(&(-1.0f32).to_le_bytes());
        assert!(LinearModel::from_bytes(&neg).is_err());
        // "tfidf" in a format 1 header, or an unknown weighting, is refused
        let hlen = u32::from_le_bytes(good[4..8].try_into().unwrap()) as usize;
        for (format, weighting) in [(1, "tfidf"), (2, "bm25")] {
            let mut header: serde_json::Value = serde_json::from_slice(&good[8..8 + hlen]).unwrap();
            header["format"] = format.into();
            header["weighting"] = weighting.into();
            let h = serde_json::to_vec(&header).unwrap();
            let mut f = b"ERLM".to_vec();
            f.extend((h.len() as u32).to_le_bytes());
            f.extend(h);
            f.extend(&good[8 + hlen..]);
            assert!(LinearModel::from_bytes(&f).is_err(), "{format} {weighting}");
        }
        // a format 1 file (count weighting) has no idf table
        let v1 = model_bytes(&["a", "b"], "sigmoid", &["length"], 1);
        assert!(LinearModel::from_bytes(&v1).unwrap().idf.is_none());
    }
}
