"""Unit tests of the routing and classification metrics on hand-made cases."""

from __future__ import annotations

import pytest

from edgeroute.learn.evaluate import f1_scores, macro_f1, multi_model_curve, two_model_curve


def test_oracle_router_recovers_gap_at_its_share_of_strong_wins() -> None:
    # 4 prompts: strong wins on #0 only; weak wins on none
    strong = [1.0, 1.0, 0.0, 1.0]
    weak = [0.0, 1.0, 0.0, 1.0]
    c = two_model_curve([0.9, 0.1, 0.2, 0.3], strong, weak)
    assert c.q_strong == 0.75 and c.q_weak == 0.5
    assert c.pgr == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert c.cpt(0.5) == pytest.approx(0.125)  # halfway through the first step
    assert c.cpt(0.8) == pytest.approx(0.2)
    assert c.apgr() == pytest.approx(0.125 + 0.75)


def test_worst_router_and_constant_router() -> None:
    strong = [1.0, 0.0]
    weak = [0.0, 0.0]
    worst = two_model_curve([0.0, 1.0], strong, weak)
    assert worst.apgr() == pytest.approx(0.25)
    # ties are spread evenly: a constant router is the random baseline, APGR 0.5
    const = two_model_curve([0.5, 0.5], strong, weak)
    assert const.apgr() == pytest.approx(0.5)
    assert const.cpt(0.5) == pytest.approx(0.5)


def test_pgr_can_exceed_one_when_weak_wins_somewhere() -> None:
    strong = [1.0, 0.0]
    weak = [0.0, 1.0]
    c = two_model_curve([1.0, 0.0], strong, weak)
    assert c.q_strong == c.q_weak
    assert c.pgr == [0.0, 0.0, 0.0]  # no gap: PGR is defined as 0


def test_multi_model_curve_two_models_matches_two_model_curve() -> None:
    strong = [1.0, 1.0, 0.0, 1.0]
    weak = [0.0, 1.0, 0.0, 1.0]
    pred = [[0.9, 0.1], [0.6, 0.6], [0.1, 0.1], [0.8, 0.75]]
    curve, match = multi_model_curve(pred, [[s, w] for s, w in zip(strong, weak, strict=True)], [1.0, 0.0], steps=400)
    assert curve.q_strong == 0.75 and curve.q_weak == 0.5
    assert curve.cpt(0.5) <= 0.25 + 1e-9
    assert match is not None and match <= 0.25 + 1e-9
    assert 0.8 < curve.apgr() <= 1.0


def test_f1() -> None:
    y = ["code", "math", "other", "code"]
    p = ["code", "code", "other", "code"]
    f = f1_scores(y, p, ["code", "math"])
    assert f["code"] == pytest.approx(2 * 2 / (2 * 2 + 1))
    assert f["math"] == 0.0
    assert macro_f1(y, p, ["code", "math"]) == pytest.approx(0.4)
