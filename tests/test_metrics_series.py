"""The per-request families count every attempt whatever the lookup of its series keeps: an
attempt's series are found through a bounded shortcut (`Metrics._attempt_series`), cleared
when full, while the counters stay in their families."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from edgeroute import metrics as metrics_mod
from edgeroute.accounting import AttemptRecord, RequestRecord, Usage
from edgeroute.metrics import Metrics


def _samples(m: Metrics, name: str) -> dict[tuple[str, ...], float]:
    family = next(f for f in m.collect() if f.name == name)
    return {tuple(s.labels.values()): s.value for s in family.samples if s.name == name + "_total"}


def test_attempts_tokens_and_cost_add_up_past_the_series_shortcut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_mod, "_SERIES_KEPT", 3)  # cleared again and again
    rng = random.Random(11)
    m = Metrics()
    attempts: Counter[tuple[str, ...]] = Counter()
    tokens: Counter[tuple[str, ...]] = Counter()
    cost: Counter[tuple[str, ...]] = Counter()
    for i in range(600):
        team = rng.choice([None, "t1", "t2", "t3"])
        rec = RequestRecord(f"r{i}", 1.0, "m", route=rng.choice(["m", "eu"]), status=200, outcome="ok", team=team)
        for _ in range(rng.randrange(1, 4)):
            dep, outcome, kind = (
                rng.choice(["d0", "d1", "d2"]),
                rng.choice(["success", "timeout"]),
                rng.choice(["first", "retry"]),
            )
            usage = Usage(rng.randrange(1, 900), rng.randrange(0, 50), rng.choice([0, 7]))
            a = AttemptRecord(dep, "p", outcome, 200, 12.0, usage=usage, cost_usd=rng.choice([0.0, 0.25]), kind=kind)
            rec.attempts.append(a)
            labels = (rec.route, dep, team or "")
            attempts[(dep, outcome, kind)] += 1
            tokens[(*labels, "prompt")] += usage.prompt_tokens
            tokens[(*labels, "completion")] += usage.completion_tokens
            if usage.cached_tokens:
                tokens[(*labels, "cached")] += usage.cached_tokens
            if a.cost_usd:
                cost[labels] += a.cost_usd
        m.observe(rec)
    assert _samples(m, "edgeroute_attempts") == attempts
    assert _samples(m, "edgeroute_tokens") == tokens
    assert _samples(m, "edgeroute_cost_usd") == pytest.approx(dict(cost))


def test_a_name_that_became_a_secret_is_masked_from_the_next_scrape() -> None:
    """Label values are redacted once and kept (`Metrics.label_values`) only while the known
    secrets stay the same: a secret registered after a scrape (a rotated key that a deployment's
    name happens to hold) is masked from the very next one."""
    from edgeroute import redact

    secret = "Zq8" + "".join(random.Random(5).choices("abcdefghjkmnpqrstuvwxyz23456789", k=24))
    m = Metrics()
    rec = RequestRecord("r1", 1.0, "m", route="m", status=200, outcome="ok")
    rec.attempts.append(AttemptRecord(f"d-{secret}", "p", "success", 200, 12.0, usage=Usage(5, 5, 0), kind="first"))
    m.observe(rec)
    assert (f"d-{secret}", "success", "first") in _samples(m, "edgeroute_attempts")
    redact.register(secret)
    assert set(_samples(m, "edgeroute_attempts")) == {(f"d-{redact.MARKER}", "success", "first")}
