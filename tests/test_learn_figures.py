"""The headline figures, on the shared data (skipped when ../shared/data is absent).

These retrain from scratch (a few minutes on 2 cores): they are the acceptance
test of the issue, run in CI where the data is present.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = [
    pytest.mark.skipif(
        not (DATA / "task-type-prompts").is_dir() or not (DATA / "routellm-gpt4-mixtral-outcomes").is_dir(),
        reason=f"shared training data not found at {DATA}",
    ),
]


@pytest.fixture(scope="module")
def np_() -> object:
    return pytest.importorskip("numpy", reason="training needs numpy (pip install numpy)")


def test_routellm_cross_validated_figures(np_: object) -> None:
    from edgeroute.learn.routellm_eval import cross_validate

    res = cross_validate(folds=5, seed=0)
    for name in ("gsm8k", "mmlu"):
        r = res[name]
        assert r["apgr"] >= 0.62, (name, r)
        assert r["cpt50"] <= 0.35, (name, r)


def test_task_macro_f1_on_arena_hard(np_: object) -> None:
    from edgeroute.learn.task_eval import run

    f1 = run()
    assert f1["macro"] >= 0.90, f1


def test_cli_train_and_eval_round_trip(np_: object, tmp_path: Path) -> None:
    from edgeroute.learn import data
    from edgeroute.learn.cli import main

    rows = []
    for i, (p, s, w) in enumerate(data.load_gsm8k()[:300]):
        rows.append({"prompt": p, "model": "big", "score": s, "cost_usd": 0.01})
        rows.append({"prompt": p, "model": "small", "score": w, "cost_usd": 0.001})
        if i % 2:
            rows.append({"prompt": p, "model": "mid", "score": max(s, w), "cost_usd": 0.005})
    out = tmp_path / "o.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "r.erlm"
    assert main(["train", "--outcomes", str(out), "--out", str(model)]) == 0
    assert model.stat().st_size > 0
    assert main(["eval", "--router", str(model), "--outcomes", str(out)]) == 0


def test_module_entry_points_run(np_: object) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edgeroute.learn.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and "train" in r.stdout
