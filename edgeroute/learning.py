"""Feedback learning: `POST /v1/feedback` scores shift routing over time, within bounds.

For each (task class, route) the learner keeps a Beta posterior of "the answer was
good", updated with each feedback score (0..1) less a cost penalty, so that a cheap
route that users rate well earns traffic and an expensive one must earn its price.
Thompson sampling turns the posteriors into the per-route score shifts the core adds
to its predictions for `policy` routes: a fresh draw from each posterior, minus the
prior mean, clamped to `max_shift`. Draws are refreshed on every feedback and every
few seconds, so exploration continues without a random number per request.

State persists in a small JSON file (written atomically) so that learning survives
restarts. The learner never blocks the request path: feedback is an in-memory
update; the file write happens in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("edgeroute.learning")


@dataclass(slots=True)
class Posterior:
    alpha: float = 1.0
    beta: float = 1.0

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


@dataclass(slots=True)
class Served:
    """What feedback needs to know about a recent request."""

    route: str
    task: str
    cost_usd: float


class FeedbackLearner:
    def __init__(
        self,
        state_path: Path | None,
        *,
        max_shift: float = 0.15,
        cost_weight: float = 0.0,
        prior: tuple[float, float] = (1.0, 1.0),
        remember: int = 100_000,
        seed: int | None = None,
    ) -> None:
        self.state_path = state_path
        self.max_shift = max_shift
        self.cost_weight = cost_weight
        self.prior = prior
        self.posteriors: dict[tuple[str, str], Posterior] = {}
        self.recent: OrderedDict[str, Served] = OrderedDict()
        self.remember = remember
        self.rng = random.Random(seed)
        self._write_lock = threading.Lock()
        if state_path is not None and state_path.exists():
            self._load(state_path)

    # -- state ---------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            for row in data.get("posteriors", []):
                self.posteriors[(row["task"], row["route"])] = Posterior(float(row["alpha"]), float(row["beta"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable learning state %s: %s", path, e)

    def snapshot(self) -> dict[str, Any]:
        rows = [
            {"task": t, "route": r, "alpha": p.alpha, "beta": p.beta, "mean": round(p.mean, 4)}
            for (t, r), p in sorted(self.posteriors.items())
        ]
        return {"posteriors": rows, "max_shift": self.max_shift, "cost_weight": self.cost_weight}

    def save(self) -> None:
        if self.state_path is None:
            return
        data = json.dumps(self.snapshot(), indent=1)
        with self._write_lock:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(data)
            os.replace(tmp, self.state_path)

    # -- learning ------------------------------------------------------------

    def served(self, request_id: str, route: str, task: str | None, cost_usd: float) -> None:
        """Remembers a request so that feedback on it can be attributed."""
        if task is None:
            return
        self.recent[request_id] = Served(route, task, cost_usd)
        if len(self.recent) > self.remember:
            self.recent.popitem(last=False)

    def feedback(self, request_id: str, score: float) -> Served | None:
        """Applies a 0..1 score to the request's (task, route); None if the request is unknown."""
        s = self.recent.get(request_id)
        if s is None:
            return None
        reward = min(1.0, max(0.0, score - self.cost_weight * s.cost_usd))
        p = self.posteriors.setdefault((s.task, s.route), Posterior(*self.prior))
        p.alpha += reward
        p.beta += 1.0 - reward
        return s

    def shifts(self) -> dict[tuple[str, str], float]:
        """One Thompson draw per (task, route), as a bounded shift from the prior mean."""
        prior_mean = self.prior[0] / (self.prior[0] + self.prior[1])
        out = {}
        for key, p in self.posteriors.items():
            draw = self.rng.betavariate(p.alpha, p.beta)
            out[key] = max(-self.max_shift, min(self.max_shift, draw - prior_mean))
        return out


async def refresh_loop(learner: FeedbackLearner, apply: Any, interval: float = 5.0) -> None:
    """Re-draws and applies the shifts periodically, and saves the state off the loop."""
    while True:
        await asyncio.sleep(interval)
        apply(learner.shifts())
        await asyncio.to_thread(learner.save)
