"""The embedding experiment for the task classifier (``edgeroute.learn.task_embed_eval``): its
decision rule, its nearest-neighbour vote and its candidates on a toy training set."""

from __future__ import annotations

import numpy as np
import pytest

from edgeroute.learn import task_embed_eval as E
from edgeroute.learn.data import Example
from edgeroute.learn.model import TASK_CLASSES

A, B, C, D = E.CANDIDATES


def _means(**focus_all: tuple[float, float]) -> dict[str, dict[str, float]]:
    names = {"a": A, "b": B, "c": C, "d": D}
    return {names[k]: {"focus": f, "all": a} for k, (f, a) in focus_all.items()}


FAST = {"p50": 300.0, "p99": 800.0}
SLOW = {"p50": 900.0, "p99": 1200.0}


def test_a_candidate_wins_only_by_the_margin_without_losing_the_other_classes_within_budget() -> None:
    lat = {B: FAST, C: FAST, D: FAST}
    assert E.decide(_means(a=(0.68, 0.59), b=(0.69, 0.60), c=(0.701, 0.59), d=(0.60, 0.50)), lat) == C
    # 0.019 above: not a win
    assert E.decide(_means(a=(0.68, 0.59), b=(0.60, 0.5), c=(0.699, 0.59), d=(0.60, 0.5)), lat) is None
    # above on the focus classes but 0.011 below over all classes: not a win
    assert E.decide(_means(a=(0.68, 0.59), b=(0.60, 0.5), c=(0.75, 0.579), d=(0.60, 0.5)), lat) is None
    # the best of several winners
    assert E.decide(_means(a=(0.68, 0.59), b=(0.72, 0.60), c=(0.75, 0.60), d=(0.71, 0.60)), lat) == C
    # over the latency budget: out, the next winner takes it
    assert E.decide(_means(a=(0.68, 0.59), b=(0.72, 0.60), c=(0.75, 0.60), d=(0.60, 0.5)), lat | {C: SLOW}) == B


def test_the_nearest_neighbours_vote_with_their_weights() -> None:
    code, math = TASK_CLASSES.index("code"), TASK_CLASSES.index("math")
    unit = np.asarray([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    y = np.zeros((3, len(TASK_CLASSES)))
    y[0, code] = y[1, code] = y[2, math] = 1.0
    q = np.asarray([[1.0, 0.05], [0.0, 2.0]])
    assert E.knn_predict(unit, y, np.ones(3), q, k=1) == ["code", "math"]
    # k=3: two code rows against one math row, unless the math row weighs more
    assert E.knn_predict(unit, y, np.ones(3), q, k=3) == ["code", "code"]
    assert E.knn_predict(unit, y, np.asarray([1.0, 1.0, 3.0]), q, k=3) == ["math", "math"]


def test_macro_f1_over_the_classes_present_and_over_code_math_creative() -> None:
    f = E.figures(["code", "math", "other"], ["code", "code", "other"])
    # code 2/3, math 0, other 1
    assert f["all"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert f["focus"] == pytest.approx((2 / 3 + 0) / 2)


TOY = [
    Example("Write a Python function that reverses a linked list.", "code", "seed"),
    Example("Fix the bug in this JavaScript loop: for (i = 0; i <= n; i++) sum += a[i];", "code", "seed"),
    Example("Implement quicksort in C++ and explain its complexity.", "code", "seed"),
    Example("What is the integral of x squared from 0 to 3?", "math", "seed"),
    Example("Solve for x: 3x + 7 = 22.", "math", "seed"),
    Example("A train travels 120 km in 2 hours. What is its average speed?", "math", "seed"),
    Example("Write a short poem about the autumn sea.", "creative_writing", "seed"),
    Example("Write a story about a dragon who is afraid of fire.", "creative_writing", "seed"),
    Example("Compose a sonnet about lost love.", "creative_writing", "seed"),
]


@pytest.mark.parametrize("name", E.CANDIDATES)
def test_each_candidate_learns_a_separable_toy_set(name: str) -> None:
    trained = E.train_candidate(name, TOY, [1.0] * len(TOY), E.Embeddings())
    if name != D:  # k = 20 nearest of 9 examples and their wrapped copies: most of the set
        assert trained.predict([e.text for e in TOY]) == [e.label for e in TOY]
    if name == A:
        assert trained.python_part is None  # all in the core
    else:
        assert trained.python_part is not None
        assert trained.python_part(TOY[0].text) == trained.predict([TOY[0].text])[0]
