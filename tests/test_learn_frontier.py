"""The numpy frontier (router eval's baselines), the temperature fit and the keyword baseline, on hand-made cases."""

from __future__ import annotations

import pytest

np = pytest.importorskip("numpy", reason="training needs numpy (pip install 'edgeroute[train]')")

from edgeroute.learn import frontier as FR  # noqa: E402
from edgeroute.learn.baselines import group_prior, keyword_task, tfidf  # noqa: E402
from edgeroute.learn.evaluate import two_model_curve  # noqa: E402
from edgeroute.learn.tasks import fit_temperature  # noqa: E402

# 4 prompts x [big, small]; small fails on prompts 0 and 2
ACTUAL = np.asarray([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
COSTS = np.asarray([1.0, 0.1])


def test_reference_points_oracle_and_random_mixing() -> None:
    ref = FR.Reference.of(["big", "small"], ACTUAL, COSTS)
    assert (ref.best, ref.cheapest) == (0, 1) and ref.apgr_undefined() is None
    o = FR.oracle(ACTUAL, COSTS)
    # 0 and 2 need big; 1 and 3 are served best by small
    assert o.quality[0] == 1.0 and o.cost[0] == pytest.approx((1 + 0.1 + 1 + 0.1) / 4)
    mix = FR.random_mix(ref)
    assert mix.apgr(ref) == pytest.approx(0.5)
    assert FR.single(ref, 0).cost_to_match_best(ref) == pytest.approx(1.0)
    assert FR.single(ref, 1).cost_to_match_best(ref) is None


def test_perfect_router_frontier_matches_the_exact_two_model_curve() -> None:
    # where the big model never loses, the frontier is the exact threshold curve (no envelope needed)
    actual = np.asarray([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    ref = FR.Reference.of(["big", "small"], actual, COSTS)
    pred = np.asarray([[0.9, 0.1], [0.9, 0.8], [0.9, 0.2], [0.5, 0.45]])
    f = FR.router_frontier(pred, actual, COSTS, steps=400)
    exact = two_model_curve((pred[:, 0] - pred[:, 1]).tolist(), actual[:, 0].tolist(), actual[:, 1].tolist())
    assert f.apgr(ref) == pytest.approx(exact.apgr(), abs=0.02)
    # with a weak win somewhere, the frontier keeps the best quality reached at each cost
    ref = FR.Reference.of(["big", "small"], ACTUAL, COSTS)
    f = FR.router_frontier(ACTUAL.copy(), ACTUAL, COSTS, steps=400)
    assert f.cost_to_match_best(ref) == pytest.approx((1 + 0.1 + 1 + 0.1) / 4)
    assert f.apgr(ref) > 1.0
    # a prompt-blind prior is one of the two corners at each price: the random-mixing line
    prior = FR.router_frontier(np.tile(ACTUAL.mean(axis=0), (4, 1)), ACTUAL, COSTS)
    assert prior.apgr(ref) == pytest.approx(0.5)


def test_apgr_undefined_when_the_best_is_the_cheapest() -> None:
    ref = FR.Reference.of(["big", "small"], ACTUAL, np.asarray([0.1, 1.0]))
    assert "also the cheapest" in (ref.apgr_undefined() or "")
    assert FR.router_frontier(ACTUAL, ACTUAL, np.asarray([0.1, 1.0])).apgr(ref) is None


def test_temperature_softens_an_overconfident_model_and_keeps_an_honest_one() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    y = np.zeros((n, 2))
    truth = rng.integers(0, 2, n)
    y[np.arange(n), truth] = 1
    # honest logits: p(correct) = 0.8 -> logit gap ln 4
    right = rng.random(n) < 0.8
    gap = np.log(4.0)
    top = np.where(right, truth, 1 - truth)
    logits = np.zeros((n, 2))
    logits[np.arange(n), top] = gap
    sw = np.ones(n)
    assert fit_temperature(logits, y, sw) == pytest.approx(1.0, abs=0.25)
    assert fit_temperature(logits * 4, y, sw) == pytest.approx(4.0, abs=1.0)


def test_group_prior_tfidf_and_keyword_baseline() -> None:
    scores = np.asarray([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    gp = group_prior(["a", "a", "b"], scores, ["a", "b", "unseen"])
    assert gp.tolist() == [[1.0, 0.5], [0.0, 1.0], [2 / 3, 2 / 3]]
    tr, te = tfidf(["red apple", "red car", "blue car"], ["red bus"])
    assert tr.n_docs == 3 and te.n_docs == 1 and len(te.cols) == 1  # only "red" is in the vocabulary (df >= 2)
    assert keyword_task("Write a Python function that sums a list") == "code"
    assert keyword_task("How many eggs does she sell?") == "math"
    assert keyword_task("A haiku about rain, please") == "creative_writing"
    assert keyword_task("Plan my week") == "other"
