"""Cost-quality frontiers of routers and of the baselines a router must beat (numpy).

One evaluation set fixes the reference points: the **cheapest** model (lowest mean
cost) and the **best** single model (highest mean quality). A router that picks
``argmax_m predicted[m] - lam * cost[m]`` traces, over ``lam``, a set of (cost,
quality) points. Costs are reported in one unit: the fraction of the best model's
cost (and dollars per 1k requests beside it).

APGR is the area under PGR = (q - q_cheapest) / (q_best - q_cheapest) over the
normalised cost (c - c_cheapest) / (c_best - c_cheapest) in [0, 1], with the two
corners (always the cheapest, always the best) that any router can reach and
linear interpolation between points (random mixing of two operating points). It
is undefined when the best model is also the cheapest, or when all score the same:
there is nothing to trade. :func:`apgr_undefined` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Reference:
    """The evaluation set's single-model reference points."""

    models: list[str]
    costs: F64  # mean cost per call, per model (USD)
    quality: F64  # mean score per model
    cheapest: int
    best: int

    @classmethod
    def of(cls, models: list[str], actual: F64, costs: F64) -> Reference:
        q = actual.mean(axis=0)
        cheapest = min(range(len(models)), key=lambda m: (costs[m], -q[m]))
        best = max(range(len(models)), key=lambda m: (q[m], -costs[m]))
        return cls(models, costs, q, cheapest, best)

    def apgr_undefined(self) -> str | None:
        """Why APGR cannot be computed on this set, or None."""
        if self.best == self.cheapest:
            return f"the best model ({self.models[self.best]}) is also the cheapest: there is nothing to trade"
        if self.quality[self.best] == self.quality[self.cheapest]:
            return "the cheapest model scores as well as the best"
        if self.costs[self.best] <= self.costs[self.cheapest]:
            return "no cost difference between the cheapest and the best model"
        return None


@dataclass(frozen=True)
class Frontier:
    """Measured operating points (mean cost per call, mean quality), sorted by cost."""

    cost: F64
    quality: F64

    def envelope(self, ref: Reference) -> tuple[F64, F64]:
        """Normalised cost and PGR with the two reachable corners, quality made monotone in cost."""
        c_lo, c_hi = ref.costs[ref.cheapest], ref.costs[ref.best]
        q_lo, q_hi = ref.quality[ref.cheapest], ref.quality[ref.best]
        x = np.clip((self.cost - c_lo) / (c_hi - c_lo), 0.0, 1.0)
        y = (self.quality - q_lo) / (q_hi - q_lo)
        x = np.concatenate([[0.0], x, [1.0]])
        y = np.concatenate([[0.0], y, [1.0]])
        order = np.lexsort((y, x))
        x, y = x[order], np.maximum.accumulate(y[order])
        return x, y

    def apgr(self, ref: Reference) -> float | None:
        if ref.apgr_undefined():
            return None
        x, y = self.envelope(ref)
        return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))

    def cpt(self, ref: Reference, target: float) -> float | None:
        """Smallest normalised cost with PGR >= target (interpolated), None if undefined."""
        if ref.apgr_undefined():
            return None
        x, y = self.envelope(ref)
        hit = int(np.argmax(y >= target))
        if hit == 0:
            return float(x[0])
        x0, x1, y0, y1 = x[hit - 1], x[hit], y[hit - 1], y[hit]
        return float(x1 if y1 == y0 else x0 + (x1 - x0) * (target - y0) / (y1 - y0))

    def cost_to_match_best(self, ref: Reference) -> float | None:
        """Lowest measured mean cost reaching the best single model's quality (USD/call), or None."""
        ok = self.quality >= ref.quality[ref.best] - 1e-12
        return float(self.cost[ok].min()) if ok.any() else None


def lambdas(costs: F64, steps: int) -> F64:
    """Prices of a quality point from "cost dominates" down to 0 (quality only)."""
    span = float(costs.max() - costs.min()) or 1.0
    lam = (1.0 / span) * 10.0 ** (3 - 6 * np.arange(steps) / steps)
    return np.concatenate([lam, [0.0]])


def router_frontier(pred: F64, actual: F64, costs: F64, steps: int = 200) -> Frontier:
    """Operating points of ``argmax(pred - lam * cost)`` over ``lam``."""
    rows = np.arange(len(actual))
    pts = []
    for lam in lambdas(costs, steps):
        pick = np.argmax(pred - lam * costs, axis=1)
        pts.append((float(costs[pick].mean()), float(actual[rows, pick].mean())))
    pts = sorted(set(pts))
    return Frontier(np.asarray([c for c, _ in pts]), np.asarray([q for _, q in pts]))


def single(ref: Reference, m: int) -> Frontier:
    return Frontier(np.asarray([ref.costs[m]]), np.asarray([ref.quality[m]]))


def oracle(actual: F64, costs: F64) -> Frontier:
    """Each prompt to the cheapest model with the highest observed score (an upper bound)."""
    top = actual.max(axis=1, keepdims=True)
    # among models reaching the top score, the cheapest
    masked = np.where(actual >= top, costs[None, :], np.inf)
    pick = np.argmin(masked, axis=1)
    rows = np.arange(len(actual))
    return Frontier(np.asarray([costs[pick].mean()]), np.asarray([actual[rows, pick].mean()]))


def random_mix(ref: Reference) -> Frontier:
    """Send a random share of prompts to the best model, the rest to the cheapest (expected points)."""
    share = np.linspace(0.0, 1.0, 11)
    lo, hi = ref.cheapest, ref.best
    return Frontier(
        ref.costs[lo] + share * (ref.costs[hi] - ref.costs[lo]),
        ref.quality[lo] + share * (ref.quality[hi] - ref.quality[lo]),
    )
