"""``python -m edgeroute.learn.knn_eval``: a nearest-neighbour router over sentence embeddings,
evaluated beside the hashed n-gram router on the RouteLLM GPT-4 / Mixtral outcomes.

Protocol, fixed before any fold was scored: the embedder is the semantic cache's (WordLlama's
256-d static embeddings, shipped inside its package: nothing is downloaded); a prompt's
predicted score for each model is the mean outcome of its ``k`` nearest training prompts by
cosine similarity. Per dataset, the outer folds are ``routellm_eval --nested``'s (5 folds,
seed 0), so the figures sit beside the router, prior and TF-IDF figures of that command; in
each outer fold, 3 inner folds of the training part choose ``k`` from ``K`` by APGR, and the
held-out fold is scored once. Decision latency: embedding a 2k-token chat and the exact
nearest-neighbour search over one fold's training prompts, per prompt, p50 and p99 (run it
with ``OPENBLAS_NUM_THREADS=1``: on a busy machine a multi-threaded product for one query
mostly waits for its threads).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeroute.cache.semantic import builtin_embedder
from edgeroute.learn import data
from edgeroute.learn import router as R
from edgeroute.learn import train as T
from edgeroute.learn.evaluate import two_model_curve

K = (5, 10, 20, 50, 100, 200)
Vecs = npt.NDArray[np.floating[Any]]  # unit-length embeddings, one row per prompt


def knn_scores(train_vecs: Vecs, train_scores: T.F64, test_vecs: Vecs, ks: tuple[int, ...]) -> dict[int, T.F64]:
    """For each k: the mean outcome of the k nearest training prompts, [n_test, n_models]."""
    kmax = min(max(ks), len(train_vecs))
    out: dict[int, list[T.F64]] = {k: [] for k in ks}
    for start in range(0, len(test_vecs), 1024):  # bounded memory: 1,024 x n_train similarities at a time
        sims = test_vecs[start : start + 1024] @ train_vecs.T
        top = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        nearest = np.take_along_axis(top, order, axis=1)
        csum = np.cumsum(train_scores[nearest], axis=1)  # [batch, kmax, models]
        for k in ks:
            kk = min(k, kmax)
            out[k].append(csum[:, kk - 1] / kk)
    return {k: np.vstack(v) for k, v in out.items()}


def _apgr(pred: T.F64, actual: T.F64) -> tuple[float, float, float]:
    c = two_model_curve((pred[:, 0] - pred[:, 1]).tolist(), actual[:, 0].tolist(), actual[:, 1].tolist())
    return c.apgr(), c.cpt(0.5), c.cpt(0.8)


def nested(vecs: Vecs, scores: T.F64, folds: int = 5, seed: int = 0, log: bool = True) -> dict[str, float]:
    per_fold: list[tuple[float, float, float]] = []
    for f, test in enumerate(R.kfold(len(vecs), folds, seed)):
        held = set(test)
        tr = [i for i in range(len(vecs)) if i not in held]
        inner: dict[int, list[float]] = {k: [] for k in K}
        for val_pos in R.kfold(len(tr), 3, seed + 1):
            val = [tr[i] for i in val_pos]
            vset = set(val)
            fit = [i for i in tr if i not in vset]
            for k, pred in knn_scores(vecs[fit], scores[fit], vecs[val], K).items():
                inner[k].append(_apgr(pred, scores[val])[0])
        k = max(K, key=lambda k: (float(np.mean(inner[k])), -k))
        pred = knn_scores(vecs[tr], scores[tr], vecs[test], (k,))[k]
        per_fold.append(_apgr(pred, scores[test]))
        if log:
            print(f"fold {f + 1}/{folds}: chose k={k}; APGR {per_fold[-1][0]:.3f}", flush=True)
    return {name: float(np.mean([v[i] for v in per_fold])) for i, name in enumerate(("apgr", "cpt50", "cpt80"))}


def latency(train_vecs: Vecs, train_scores: T.F64, n: int = 300) -> dict[str, float]:
    """p50 and p99 microseconds of embedding a 2k-token chat (its words new each time: the
    worst case) and of the exact kNN search over the training prompts, each on its own."""
    emb = builtin_embedder()
    base = " ".join(data.load_gsm8k()[0][0].split() * 40)  # ~2k tokens of math-word-problem text
    embed_us, search_us = [], []
    for i in range(n):
        emb.forget_pieces()
        t0 = time.perf_counter()
        v = emb.embed(f"{i} {base}")
        t1 = time.perf_counter()
        knn_scores(train_vecs, train_scores, v[None, :], (20,))
        embed_us.append((t1 - t0) * 1e6)
        search_us.append((time.perf_counter() - t1) * 1e6)
    pct = np.percentile
    return {"embed_p50": float(pct(embed_us, 50)), "embed_p99": float(pct(embed_us, 99)),
            "search_p50": float(pct(search_us, 50)), "search_p99": float(pct(search_us, 99))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeroute.learn.knn_eval", description=__doc__)
    ap.add_argument("--datasets", default="gsm8k,mmlu", help="comma-separated: gsm8k, mmlu")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not data.have_data():
        print(f"no data at {data.data_root()}", file=sys.stderr)
        return 2
    emb = builtin_embedder()
    sets = {
        "gsm8k": [(p, [s, w]) for p, s, w in data.load_gsm8k()],
        "mmlu": [(p, [s, w]) for p, _g, s, w in data.load_mmlu()],
    }
    for name in args.datasets.split(","):
        rows = sets[name]
        t0 = time.perf_counter()
        vecs = np.vstack([emb.embed(p) for p, _ in rows]).astype(np.float32)
        scores = np.asarray([s for _, s in rows], dtype=np.float64)
        print(f"{name}: {len(rows)} prompts embedded in {time.perf_counter() - t0:.1f} s", flush=True)
        r = nested(vecs, scores, args.folds, args.seed)
        print(
            f"{name:6s} n={len(rows):<6d} {'kNN over WordLlama embeddings':36s} APGR={r['apgr']:.3f} "
            f"CPT(50%)={r['cpt50']:.3f} CPT(80%)={r['cpt80']:.3f}",
            flush=True,
        )
        cut = len(rows) * (args.folds - 1) // args.folds
        lat = latency(vecs[:cut], scores[:cut])
        print(
            f"{name}: embed a 2k-token chat p50 {lat['embed_p50']:.0f} us, p99 {lat['embed_p99']:.0f} us; "
            f"kNN over {cut} prompts p50 {lat['search_p50']:.0f} us, p99 {lat['search_p99']:.0f} us"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
