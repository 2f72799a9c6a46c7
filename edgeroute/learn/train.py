"""Fitting linear text models with numpy (the ``learn`` extra; the proxy never imports this).

Full-batch Adam on the mean cross-entropy plus an L2 penalty. Sparse products
are done with ``np.bincount`` so that no scipy is needed. After fitting, the
hashed weights are quantised to i16 (one scale per model) and the result is a
:class:`~edgeroute.learn.model.LinearModel`, the exact object the Rust core
loads; evaluations use that quantised model, not the float weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeroute.learn.features import FeaturizerConfig, bucket_ids_fast, length_features
from edgeroute.learn.model import LinearModel

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass
class SparseDocs:
    """Documents as (row, bucket, value) triples with value = count / sqrt(n)."""

    rows: I64
    cols: I64
    vals: F64
    n_docs: int
    n_buckets: int
    # first triple of each non-empty document (rows are sorted), built on first use
    _starts: I64 | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, bucket_lists: Sequence[Sequence[int]], n_buckets: int) -> SparseDocs:
        rows: list[I64] = []
        cols: list[I64] = []
        vals: list[F64] = []
        for i, bl in enumerate(bucket_lists):
            if not bl:
                continue
            u, c = np.unique(np.asarray(bl, dtype=np.int64), return_counts=True)
            rows.append(np.full(len(u), i, dtype=np.int64))
            cols.append(u)
            vals.append(c.astype(np.float64) / np.sqrt(len(bl)))
        if not rows:
            empty_i = np.zeros(0, dtype=np.int64)
            return cls(empty_i, empty_i, np.zeros(0), len(bucket_lists), n_buckets)
        return cls(
            np.concatenate(rows),
            np.concatenate(cols),
            np.concatenate(vals),
            len(bucket_lists),
            n_buckets,
        )

    def subset(self, idx: Sequence[int] | I64) -> SparseDocs:
        idx = np.asarray(idx, dtype=np.int64)
        remap = np.full(self.n_docs, -1, dtype=np.int64)
        remap[idx] = np.arange(len(idx))
        keep = remap[self.rows] >= 0
        return SparseDocs(remap[self.rows[keep]], self.cols[keep], self.vals[keep], len(idx), self.n_buckets)

    def matmul(self, w: F64) -> F64:
        """``X @ w`` for ``w`` of shape [buckets, K]."""
        if self._starts is None:
            if len(self.rows) and bool(np.any(np.diff(self.rows) < 0)):
                raise ValueError("SparseDocs rows must be sorted")
            self._starts = np.flatnonzero(np.r_[True, self.rows[1:] != self.rows[:-1]]) if len(self.rows) else self.rows
        starts = self._starts
        wt = np.ascontiguousarray(w.T)  # one contiguous gather per output is ~2x faster than strided
        out = np.zeros((w.shape[1], self.n_docs))
        if len(starts):
            docs = self.rows[starts]
            for k in range(w.shape[1]):
                # rows are sorted: a segmented sum is ~3x faster than bincount
                out[k, docs] = np.add.reduceat(wt[k][self.cols] * self.vals, starts)
        return np.ascontiguousarray(out.T)

    def rmatmul(self, r: F64) -> F64:
        """``X.T @ r`` for ``r`` of shape [docs, K]."""
        rt = np.ascontiguousarray(r.T)
        out = np.empty((r.shape[1], self.n_buckets))
        for k in range(r.shape[1]):
            out[k] = np.bincount(self.cols, weights=self.vals * rt[k][self.rows], minlength=self.n_buckets)
        return np.ascontiguousarray(out.T)


def featurize(texts: Sequence[str], cfg: FeaturizerConfig) -> SparseDocs:
    return SparseDocs.build([bucket_ids_fast(t, cfg) for t in texts], 1 << cfg.log2_buckets)


def featurize_counts(texts: Sequence[str], cfg: FeaturizerConfig) -> SparseDocs:
    """Raw bucket counts (value = count), the input of :func:`tfidf_docs`."""
    rows: list[I64] = []
    cols: list[I64] = []
    vals: list[F64] = []
    for i, t in enumerate(texts):
        bl = bucket_ids_fast(t, cfg)
        if not bl:
            continue
        u, c = np.unique(np.asarray(bl, dtype=np.int64), return_counts=True)
        rows.append(np.full(len(u), i, dtype=np.int64))
        cols.append(u)
        vals.append(c.astype(np.float64))
    n_buckets = 1 << cfg.log2_buckets
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return SparseDocs(empty, empty, np.zeros(0), len(texts), n_buckets)
    return SparseDocs(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), len(texts), n_buckets)


def idf_of(counts: SparseDocs, min_df: int = 0) -> F64:
    """Smoothed inverse document frequency ``ln((1 + n) / (1 + df)) + 1`` of every bucket over
    the documents of ``counts`` (the training prompts only), rounded to f32 as the model file
    stores it, so that training sees exactly what the core computes. A bucket in fewer than
    ``min_df`` training prompts gets idf 0: it adds nothing to a prompt's value or norm (the
    vocabulary cut of TF-IDF LR, ``min_df``; a bucket no training prompt had is then dropped
    too instead of diluting the norm at the highest idf)."""
    df = np.bincount(counts.cols, minlength=counts.n_buckets).astype(np.float64)
    idf = np.log((1.0 + counts.n_docs) / (1.0 + df)) + 1.0
    if min_df > 0:
        idf[df < min_df] = 0.0
    out: F64 = idf.astype(np.float32).astype(np.float64)
    return out


def tfidf_docs(counts: SparseDocs, idf: F64) -> SparseDocs:
    """Rows ``(1 + ln count) * idf``, each L2-normalised (the core's tf-idf weighting, see
    :mod:`edgeroute.learn.model`)."""
    v = (1.0 + np.log(counts.vals)) * idf[counts.cols]
    sq = np.bincount(counts.rows, weights=v * v, minlength=counts.n_docs)
    norm = np.sqrt(sq)
    norm[norm == 0] = 1.0
    return SparseDocs(counts.rows, counts.cols, v / norm[counts.rows], counts.n_docs, counts.n_buckets)


def length_matrix(texts: Sequence[str]) -> F64:
    return np.asarray([length_features(t) for t in texts], dtype=np.float64).reshape(-1, 2)


@dataclass
class FitOptions:
    l2: float = 1e-4
    iters: int = 300
    lr: float = 0.05
    dense_l2: float = 1e-4


def fit(
    x: SparseDocs,
    dense: F64,
    y: F64,
    *,
    activation: str,
    mask: F64 | None = None,
    sample_weight: F64 | None = None,
    opts: FitOptions | None = None,
    checkpoint: Callable[[int, F64, F64, F64], None] | None = None,
) -> tuple[F64, F64, F64]:
    """Minimise weighted cross-entropy; returns (hashed W [B,K], dense W [D,K], bias [K]).

    ``checkpoint(t, w, wd, b)`` is called after every step: model selection scores
    the weights at several iteration counts from one run (early stopping on a
    validation split) instead of refitting for each count.
    """
    opts = opts or FitOptions()
    n, k = y.shape
    d = dense.shape[1]
    m = np.ones_like(y) if mask is None else mask
    sw = np.ones(n) if sample_weight is None else sample_weight
    denom = float(sw.sum()) or 1.0
    # Only the buckets the rows use can move off zero (an unused bucket's gradient, its L2 term
    # included, stays 0, and so does its Adam step): the run is on those alone, numbered
    # densely, and written into the full table, with the very values a run on the full table
    # computes. On 2^18 buckets the full table's elementwise steps were nearly all the time.
    full = np.zeros((x.n_buckets, k))
    used, dense_cols = np.unique(x.cols, return_inverse=True)
    x = SparseDocs(x.rows, dense_cols.astype(np.int64).reshape(-1), x.vals, x.n_docs, len(used))
    w = np.zeros((len(used), k))
    wd = np.zeros((d, k))
    prior = np.clip((y * m).sum(0) / np.maximum(m.sum(0), 1.0), 1e-3, 1 - 1e-3)
    b = np.log(prior) if activation == "softmax" else np.log(prior / (1 - prior))
    params = [w, wd, b]
    mom = [np.zeros_like(p) for p in params]
    vel = [np.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, opts.iters + 1):
        z = x.matmul(w) + dense @ wd + b
        if activation == "softmax":
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
        else:
            p = 1.0 / (1.0 + np.exp(-z))
        r = (p - y) * m * sw[:, None] / denom
        grads = [
            x.rmatmul(r) + opts.l2 * w,
            dense.T @ r + opts.dense_l2 * wd,
            r.sum(axis=0),
        ]
        for i, (p_, g) in enumerate(zip(params, grads, strict=True)):
            mom[i] = b1 * mom[i] + (1 - b1) * g
            vel[i] = b2 * vel[i] + (1 - b2) * g * g
            mhat = mom[i] / (1 - b1**t)
            vhat = vel[i] / (1 - b2**t)
            p_ -= opts.lr * mhat / (np.sqrt(vhat) + eps)
        if checkpoint is not None:
            full[used] = w
            checkpoint(t, full, wd, b)
    full[used] = w
    return full, wd, b


def quantize(
    w: F64,
    wd: F64,
    b: F64,
    *,
    cfg: FeaturizerConfig,
    outputs: Sequence[str],
    activation: str,
    dense: Sequence[str],
    task_outputs: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
    idf: F64 | None = None,
) -> LinearModel:
    peak = float(np.abs(w).max()) if w.size else 0.0
    scale = peak / 32767.0 if peak > 0 else 1.0
    q = np.clip(np.rint(w / scale), -32767, 32767).astype(np.int64)
    return LinearModel(
        featurizer=cfg,
        outputs=list(outputs),
        activation=activation,
        dense=list(dense),
        scale=scale,
        hashed=q.reshape(-1).tolist(),
        dense_weights=[float(v) for v in wd.reshape(-1)],
        bias=[float(v) for v in b],
        task_outputs=list(task_outputs),
        meta=meta or {},
        idf=[] if idf is None else [float(v) for v in np.asarray(idf, dtype=np.float32)],
    )


def predict_matrix(model: LinearModel, x: SparseDocs, dense: F64) -> F64:
    """Vectorised equivalent of ``model.predict_proba`` over a featurised batch."""
    k = model.n_outputs
    w = np.asarray(model.hashed, dtype=np.float64).reshape(-1, k) * model.scale
    wd = np.asarray(model.dense_weights, dtype=np.float64).reshape(-1, k)
    z = x.matmul(w) + dense @ wd + np.asarray(model.bias)
    if model.activation == "softmax":
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        out: F64 = p / p.sum(axis=1, keepdims=True)
        return out
    sig: F64 = 1.0 / (1.0 + np.exp(-z))
    return sig
