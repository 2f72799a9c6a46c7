"""The headline figures of the issue "Intelligent model selection", on the shared data.

Skipped when ``../shared/data`` is absent. Each figure retrains from scratch
(about half a minute in all on 2 cores); nothing is cached. What is asserted is
what is actually reached:

* RouteLLM router, 5-fold CV by prompt (decontaminated): the issue's targets,
  APGR >= 0.62 and CPT(50%) <= 0.35 on GSM8K and on MMLU (reached: GSM8K
  0.641 / 0.301, MMLU 0.639 / 0.309).
* Task classifier on the Arena-Hard v2.0 prompts, trained without them: the
  target macro-F1 >= 0.90 is **not** reached (0.807: code 0.80, math 0.79,
  creative writing 0.83), so the test guards the achieved level (>= 0.79)
  against regressions. The stricter v0.1 hand-labelled figure (0.633) is
  guarded the same way.
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
    """The issue's router targets, reached on both datasets."""
    from edgeroute.learn.routellm_eval import cross_validate

    res = cross_validate(folds=5, seed=0)
    for name in ("gsm8k", "mmlu"):
        r = res[name]
        assert r["n"] == {"gsm8k": 1307, "mmlu": 14037}[name], (name, r)  # decontaminated
        assert r["apgr"] >= 0.62, (name, r)
        assert r["cpt50"] <= 0.35, (name, r)


def test_task_macro_f1_on_arena_hard_v2(np_: object) -> None:
    """Regression guard, NOT the issue's target: macro-F1 >= 0.90 is not reached (0.817 measured).

    Trained without any Arena-Hard v2.0 prompt; every other predicted class is a miss.
    """
    from edgeroute.learn import data
    from edgeroute.learn.task_eval import arena_v2

    train_texts = {e.text for e in data.task_training_examples(arena_v2=False, arena_v01=True)}
    assert not train_texts & {e.text for e in data.arena_hard_v2_test()}  # no leakage
    f1 = arena_v2(verbose=False)
    assert f1["macro"] >= 0.79, f1
    assert min(f1["code"], f1["math"], f1["creative_writing"]) >= 0.77, f1


def test_task_macro_f1_on_arena_hard_v01_hand_labels(np_: object) -> None:
    """Regression guard for the stricter figure (169 "other" prompts count as false positives); 0.623 measured."""
    from edgeroute.learn.task_eval import arena_v01

    f1 = arena_v01(verbose=False)
    assert f1["macro"] >= 0.60, f1


def test_our_annotation_of_v2_bounds_what_the_source_labels_allow(np_: object) -> None:
    """Our blind labels of the 750 v2.0 prompts meet the source labels at 0.882 macro-F1.

    So a classifier that follows our class definitions cannot reach the 0.90 target on
    them; ours agrees with the annotation at >= 0.80 (0.818 before the wrapper augmentation).
    """
    from edgeroute.learn import data
    from edgeroute.learn.model import TASK_CLASSES
    from edgeroute.learn.task_eval import agreement

    pairs = data.arena_hard_v2_annotation()
    assert len(pairs) == 750 and all(o in TASK_CLASSES for _, o in pairs)
    a = agreement(verbose=False)
    assert 0.86 <= a["annotation_vs_source"] < 0.90, a
    assert a["model_vs_annotation"] >= 0.80, a


def test_chat_style_seeds_are_our_own_text() -> None:
    """Chat-style seeds are our own text: no repeat of another training prompt, no shared-data prompt inside."""
    from edgeroute.learn import data
    from edgeroute.learn.model import TASK_CLASSES

    seeds = [e for e in data.task_training_examples(arena_v2=False, arena_v01=False) if e.source == data.SEED_CHAT]
    assert len(seeds) >= 2800
    assert all(e.label in TASK_CLASSES for e in seeds)
    assert len({e.text for e in seeds}) == len(seeds)
    shared = {e.text for e in data.arena_hard_v2_test()} | {e.text for e in data.arena_hard_test()}
    shared |= {e.text for e in data.task_training_examples(arena_v2=True, arena_v01=True) if e.source != data.SEED_CHAT}
    assert not {e.text for e in seeds} & shared
    long_shared = [t for t in shared if len(t) >= 40]
    assert not any(t in e.text for e in seeds for t in long_shared)


def _own_seed_counts(name: str) -> dict[str, int]:
    """Per-class counts of a seed file whose prompts repeat neither each other nor any other training text."""
    import json
    from collections import Counter

    from edgeroute.learn import data

    rows = [json.loads(line) for line in (data.LABELS / name).read_text().splitlines()]
    texts = [r["prompt"] for r in rows]
    assert len(set(texts)) == len(texts)
    others = [e.text for e in data.task_training_examples(arena_v2=True, arena_v01=True) if e.text not in set(texts)]
    long_shared = [t for t in others if len(t) >= 40]
    assert not any(t in s for s in texts for t in long_shared)
    return dict(Counter(r["task_type"] for r in rows))


def test_harness_seeds_are_our_own_text_and_cover_the_thin_classes() -> None:
    """The harness-style seeds: every class the other seeds lack has a few dozen, none is a shared-data prompt."""
    counts = _own_seed_counts("seed_prompts_harness.jsonl")
    assert min(counts["reasoning"], counts["translation"], counts["knowledge_qa"], counts["code"]) >= 20, counts


def test_thin_class_seeds_are_our_own_text() -> None:
    """The seeds for the thinnest classes: a few of each, none a repeat or a shared-data prompt."""
    counts = _own_seed_counts("seed_prompts_thin.jsonl")
    assert min(counts["reasoning"], counts["extraction"], counts["summarization"], counts["chat"]) >= 8, counts


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
    fast = ["--l2", "1e-3", "--iters", "20", "--inner-folds", "2", "--outer-folds", "0"]
    assert main(["train", "--outcomes", str(out), "--out", str(model), *fast]) == 0
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
