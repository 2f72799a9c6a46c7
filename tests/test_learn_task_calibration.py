"""The task model's calibration folds: a benchmark task's prompts are held out together, the
recipe's own sources one by one (the shipped recipe's folds unchanged)."""

from __future__ import annotations

import pytest

pytest.importorskip("numpy", reason="training needs numpy (pip install 'edgeroute[train]')")

from edgeroute.learn.router import kfold
from edgeroute.learn.tasks import calibration_folds


def test_with_only_the_recipes_sources_the_folds_are_the_shipped_ones() -> None:
    sources = ["seed", "seed_chat", "mmlu", "gsm8k", "arena_hard_v2.0"] * 7
    assert calibration_folds(sources, 3) == kfold(len(sources), 3, seed=0)


def test_a_benchmark_task_is_held_out_whole_and_every_example_once() -> None:
    sources = ["seed"] * 30 + ["evals/crontab"] * 5 + ["evalscope/aime24"] * 4 + ["logic_grid_puzzle"] * 6
    folds = calibration_folds(sources, 3)
    assert sorted(i for f in folds for i in f) == list(range(len(sources)))
    where = set()
    for task in ("evals/crontab", "evalscope/aime24", "logic_grid_puzzle"):
        holding = [k for k, f in enumerate(folds) if any(sources[i] == task for i in f)]
        assert len(holding) == 1, (task, holding)
        where.add(holding[0])
    assert where == {0, 1, 2}
    # the spread examples are spread as before, and the three tasks land in different folds
    assert all(sum(sources[i] == "seed" for i in f) == 10 for f in folds)
    assert calibration_folds(sources, 3) == folds


def test_every_source_of_the_shipped_recipe_is_spread() -> None:
    """A new training source left out of SPREAD_SOURCES would be held out whole, changing the recipe."""
    from edgeroute.learn import data
    from edgeroute.learn.tasks import SPREAD_SOURCES

    if not data.have_data():
        pytest.skip(f"no data sets at {data.data_root()}")
    assert {e.source for e in data.task_training_examples(arena_v2=True, arena_v01=True)} <= SPREAD_SOURCES
