"""Metrics: macro-F1 for the task classifier; cost-quality curves, APGR and CPT for routers.

Pure Python (no numpy) so that the metrics can be unit-tested on hand-made cases.

Routing curve (RouteLLM, Ong et al. 2024): a router orders prompts from "most
needs the strong model" to least; sending the top fraction c of them to the
strong model gives quality q(c). PGR(c) = (q(c) - q_weak) / (q_strong - q_weak).
APGR is the area under PGR over c in [0, 1] (trapezoids over the n+1 points
c = 0, 1/n, ..., 1; prompts with tied scores are taken as a block whose gain
is spread evenly, which is the expectation under random tie-breaking, so a
constant router scores exactly 0.5). CPT(x) is the smallest c with PGR(c) >= x,
interpolated linearly between points.

With more than two models and prices, a router gives a family of assignments
(one per willingness-to-pay); :func:`multi_model_curve` evaluates each and the
curve is over normalised cost (0 = the cheapest model everywhere, 1 = the best
single model everywhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def f1_scores(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for lab in labels:
        tp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == lab and p == lab)
        fp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t != lab and p == lab)
        fn = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == lab and p != lab)
        out[lab] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> float:
    f = f1_scores(y_true, y_pred, labels)
    return sum(f.values()) / len(f)


@dataclass(frozen=True)
class RoutingCurve:
    """PGR at strong-call fractions 0, 1/n, ..., 1 (or at normalised costs)."""

    cost: list[float]
    pgr: list[float]
    quality: list[float]
    q_weak: float
    q_strong: float

    def apgr(self) -> float:
        area = 0.0
        for i in range(1, len(self.cost)):
            area += (self.cost[i] - self.cost[i - 1]) * (self.pgr[i] + self.pgr[i - 1]) / 2
        return area

    def cpt(self, x: float) -> float:
        """Smallest cost fraction with PGR >= x (1.0 if never reached)."""
        if self.pgr and self.pgr[0] >= x:
            return self.cost[0]
        for i in range(1, len(self.cost)):
            if self.pgr[i] >= x:
                p0, p1 = self.pgr[i - 1], self.pgr[i]
                c0, c1 = self.cost[i - 1], self.cost[i]
                if p1 == p0:
                    return c1
                return c0 + (c1 - c0) * (x - p0) / (p1 - p0)
        return 1.0


def two_model_curve(scores: Sequence[float], strong: Sequence[float], weak: Sequence[float]) -> RoutingCurve:
    """Curve for a router that sends the highest ``scores`` to the strong model first."""
    n = len(scores)
    if n == 0 or not (len(strong) == len(weak) == n):
        raise ValueError("need equally long, non-empty score / outcome lists")
    order = sorted(range(n), key=lambda i: -scores[i])
    q_weak = sum(weak) / n
    q_strong = sum(strong) / n
    gap = q_strong - q_weak
    quality = [q_weak]
    i = 0
    q = q_weak
    while i < n:
        j = i
        while j + 1 < n and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        block = order[i : j + 1]
        per = sum(strong[k] - weak[k] for k in block) / len(block) / n
        for _ in block:
            q += per
            quality.append(q)
        i = j + 1
    cost = [k / n for k in range(n + 1)]
    pgr = [(v - q_weak) / gap if gap else 0.0 for v in quality]
    return RoutingCurve(cost, pgr, quality, q_weak, q_strong)


def multi_model_curve(
    predicted: Sequence[Sequence[float]],
    actual: Sequence[Sequence[float]],
    costs: Sequence[float],
    steps: int = 200,
) -> tuple[RoutingCurve, float | None]:
    """Cost-quality curve of "pick argmax(pred_quality - lam * cost)" over lam.

    ``predicted[i][m]`` / ``actual[i][m]``: predicted and observed quality of model m
    on prompt i; ``costs[m]``: mean cost per call. Returns the curve over normalised
    cost and the fraction of the best single model's cost needed to match its
    quality (None if never matched).
    """
    n = len(actual)
    n_models = len(costs)
    mean_q = [sum(actual[i][m] for i in range(n)) / n for m in range(n_models)]
    cheap = min(range(n_models), key=lambda m: (costs[m], -mean_q[m]))
    best = max(range(n_models), key=lambda m: (mean_q[m], -costs[m]))
    q_weak, q_strong = mean_q[cheap], mean_q[best]
    c_lo, c_hi = costs[cheap], costs[best]
    span = max(costs) - min(costs) or 1.0
    points: list[tuple[float, float]] = []
    for s in range(steps + 1):
        # lam from "cost dominates" down to 0 (quality only)
        lam = 0.0 if s == steps else (1.0 / span) * (10.0 ** (3 - 6 * s / steps))
        spent = 0.0
        got = 0.0
        for i in range(n):
            m = max(range(n_models), key=lambda j: predicted[i][j] - lam * costs[j])
            spent += costs[m]
            got += actual[i][m]
        points.append((spent / n, got / n))
    points.sort()
    denom_c = (c_hi - c_lo) or 1.0
    gap = q_strong - q_weak
    cost = [0.0] + [min(max((c - c_lo) / denom_c, 0.0), 1.0) for c, _ in points] + [1.0]
    quality = [q_weak] + [q for _, q in points] + [max(q_strong, points[-1][1])]
    # keep the curve a function of cost: running best quality at each cost
    best_q = []
    run = float("-inf")
    for q in quality:
        run = max(run, q)
        best_q.append(run)
    pgr = [(q - q_weak) / gap if gap else 0.0 for q in best_q]
    match = next((c / c_hi for c, q in points if q >= q_strong), None) if c_hi else None
    return RoutingCurve(cost, pgr, best_q, q_weak, q_strong), match
