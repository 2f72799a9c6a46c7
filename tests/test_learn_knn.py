"""The nearest-neighbour router evaluated beside the n-gram one (`learn/knn_eval.py`)."""

from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")


def test_knn_scores_are_the_mean_outcome_of_the_nearest_prompts() -> None:
    from edgeroute.learn.knn_eval import knn_scores

    # Four training prompts on the unit circle; the query sits nearest to 0, then 1, then 3, then 2.
    angles = np.asarray([0.0, 0.5, 3.0, -1.0])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    scores = np.asarray([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    query = np.asarray([[np.cos(0.1), np.sin(0.1)]])
    got = knn_scores(train, scores, query, (1, 2, 3, 10))
    assert got[1].tolist() == [[1.0, 0.0]]
    assert got[2].tolist() == [[1.0, 0.5]]
    assert np.allclose(got[3], [[2 / 3, 2 / 3]])
    assert np.allclose(got[10], [[0.5, 0.5]])  # k past the training set: all of it
