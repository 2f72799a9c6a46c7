"""Learned routers from per-prompt outcomes of any number of models.

Input: outcome rows ``{"prompt", "model", "score" in [0, 1], "cost_usd"}``. The
router is one :class:`~edgeroute.learn.model.LinearModel` with a sigmoid output
per model: the predicted score of that model on the prompt. Routing then picks
``argmax_m predicted[m] - lam * cost[m]`` (``lam`` = price of a quality point);
with two models this is a threshold on ``predicted[strong] - predicted[weak]``,
the "difficulty" score. Mean cost per call of each model is stored in the model
header (``meta.costs``) so that the Rust core can apply the same rule.

Optionally the task classifier's probabilities are extra dense inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeroute.learn import train as T
from edgeroute.learn.features import FeaturizerConfig
from edgeroute.learn.model import LinearModel

ROUTER_FEATURIZER = FeaturizerConfig()  # same as the task model: featurize once


class BadOutcomes(ValueError):
    """An outcomes file with bad rows; ``problems`` holds one "line N: why" each."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.problems = problems
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
        super().__init__(f"{path}: {len(problems)} bad row(s): {shown}")


def check_row(r: object) -> str | None:
    """Why an outcome row is unusable, or None: prompt and model strings, a finite score in
    [0, 1], and a finite non-negative ``cost_usd`` when present."""
    if not isinstance(r, dict):
        return "not a JSON object"
    for key in ("prompt", "model"):
        if not isinstance(r.get(key), str) or not r[key]:
            return f"missing or empty {key!r}"
    s = r.get("score")
    if isinstance(s, bool) or not isinstance(s, int | float):
        return "missing or non-numeric 'score'"
    if not math.isfinite(s) or not 0.0 <= s <= 1.0:
        return f"score {s} is not in [0, 1]"
    c = r.get("cost_usd")
    if c is not None and (isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c < 0):
        return f"cost_usd {c!r} is not a non-negative number"
    return None


@dataclass
class Outcomes:
    """Outcome rows pivoted to a prompt x model table (NaN where unobserved)."""

    prompts: list[str]
    models: list[str]
    scores: T.F64  # [n_prompts, n_models], NaN = missing
    costs: list[float]  # mean cost per call, per model

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, object]]) -> Outcomes:
        """Pivot valid rows (see :func:`check_row`); raises ``ValueError`` on the first bad one."""
        pidx: dict[str, int] = {}
        midx: dict[str, int] = {}
        cells: list[tuple[int, int, float]] = []
        cost_sum: dict[int, float] = {}
        cost_n: dict[int, int] = {}
        for r in rows:
            problem = check_row(r)
            if problem:
                raise ValueError(problem)
            p = str(r["prompt"])
            m = str(r["model"])
            s = float(r["score"])  # type: ignore[arg-type]
            i = pidx.setdefault(p, len(pidx))
            j = midx.setdefault(m, len(midx))
            cells.append((i, j, s))
            c = r.get("cost_usd")
            if c is not None:
                cost_sum[j] = cost_sum.get(j, 0.0) + float(c)  # type: ignore[arg-type]
                cost_n[j] = cost_n.get(j, 0) + 1
        # A prompt asked of one model more than once (a request log) scores the mean.
        total = np.zeros((len(pidx), len(midx)))
        count = np.zeros((len(pidx), len(midx)))
        for i, j, s in cells:
            total[i, j] += s
            count[i, j] += 1
        with np.errstate(invalid="ignore"):
            scores = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        costs = [cost_sum.get(j, 0.0) / max(cost_n.get(j, 0), 1) for j in range(len(midx))]
        return cls(list(pidx), list(midx), scores, costs)

    @classmethod
    def load(cls, path: str | Path) -> Outcomes:
        """Read a JSON-lines outcomes file; every bad line is reported with its number (:class:`BadOutcomes`)."""
        return cls.from_rows(read_rows(path))

    def subset(self, idx: Sequence[int]) -> Outcomes:
        return Outcomes([self.prompts[i] for i in idx], self.models, self.scores[list(idx)], self.costs)


def read_rows(path: str | Path) -> list[dict[str, object]]:
    """The rows of a JSON-lines outcomes file; every bad line is reported with its number (:class:`BadOutcomes`)."""
    rows: list[dict[str, object]] = []
    bad: list[str] = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(f"line {n}: not JSON ({e.msg})")
                continue
            problem = check_row(row)
            if problem:
                bad.append(f"line {n}: {problem}")
            else:
                rows.append(row)
    if bad:
        raise BadOutcomes(str(path), bad)
    if not rows:
        raise BadOutcomes(str(path), ["no outcome rows"])
    return rows


def dense_inputs(
    prompts: Sequence[str], task_model: LinearModel | None, x_task: T.SparseDocs | None = None
) -> tuple[T.F64, list[str]]:
    lengths = T.length_matrix(prompts)
    if task_model is None:
        return lengths, ["length"]
    xt = x_task if x_task is not None else T.featurize(prompts, task_model.featurizer)
    probs = T.predict_matrix(task_model, xt, lengths)
    return np.hstack([lengths, probs]), ["length", "task"]


def train_router(
    data: Outcomes,
    *,
    task_model: LinearModel | None = None,
    cfg: FeaturizerConfig = ROUTER_FEATURIZER,
    opts: T.FitOptions | None = None,
    x: T.SparseDocs | None = None,
    dense: T.F64 | None = None,
    sample_weight: T.F64 | None = None,
    idf: T.F64 | None = None,
) -> LinearModel:
    """Fit one sigmoid head per model on the observed scores (``sample_weight``: one per prompt).

    With ``idf`` (tf-idf weighting), ``x`` must be given: the prompts' :func:`~edgeroute.learn.train.tfidf_docs`
    under that idf, which the file then stores."""
    if idf is not None and x is None:
        raise ValueError("a tf-idf router needs its tf-idf features")
    x = x if x is not None else T.featurize(data.prompts, cfg)
    if dense is None:
        dense, blocks = dense_inputs(data.prompts, task_model)
    else:
        blocks = ["length", "task"] if task_model is not None else ["length"]
    mask = (~np.isnan(data.scores)).astype(np.float64)
    y = np.nan_to_num(data.scores)
    w, wd, b = T.fit(
        x, dense, y, activation="sigmoid", mask=mask, sample_weight=sample_weight, opts=opts or T.FitOptions()
    )
    return T.quantize(
        w,
        wd,
        b,
        cfg=cfg,
        outputs=data.models,
        activation="sigmoid",
        dense=blocks,
        task_outputs=task_model.outputs if task_model is not None else (),
        meta={"kind": "router", "costs": dict(zip(data.models, data.costs, strict=True))},
        idf=idf,
    )


def predict_scores(
    router: LinearModel,
    prompts: Sequence[str],
    task_model: LinearModel | None = None,
    x: T.SparseDocs | None = None,
    dense: T.F64 | None = None,
) -> T.F64:
    if "task" in router.dense and task_model is None:
        raise ValueError("this router needs the task model it was trained with")
    if x is None:
        x = (
            T.tfidf_docs(T.featurize_counts(prompts, router.featurizer), np.asarray(router.idf))
            if router.idf
            else T.featurize(prompts, router.featurizer)
        )
    if dense is None:
        dense, _ = dense_inputs(prompts, task_model if "task" in router.dense else None)
    return T.predict_matrix(router, x, dense)


def source_weights(sources: Sequence[str]) -> T.F64:
    """Per-prompt weights ``1/sqrt(size of its source)``, mean 1.

    With GSM8K (1.3k prompts) next to MMLU (14k), unweighted training learns
    mostly MMLU's notion of difficulty; full balancing would overfit the small
    source. The square root is the usual compromise.
    """
    counts: dict[str, int] = {}
    for s in sources:
        counts[s] = counts.get(s, 0) + 1
    w = np.asarray([1.0 / np.sqrt(counts[s]) for s in sources])
    out: T.F64 = w / w.mean()
    return out


def kfold(n: int, k: int, seed: int = 0) -> list[list[int]]:
    """k disjoint folds of range(n), shuffled with a fixed seed."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    return [sorted(int(i) for i in perm[f::k]) for f in range(k)]
