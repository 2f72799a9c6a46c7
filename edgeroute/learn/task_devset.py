"""The BIG-bench development set of the task classifier (``python -m edgeroute.learn.task_devset``).

BIG-bench 1.0.0 was the first fresh test set; its errors were read once it had been
scored, so it is a development set now: it may diagnose and select, and no figure from it
is called fresh (that is :mod:`edgeroute.learn.fresh_eval`'s). The set is built as it
was scored then:

* **Source.** The JSON tasks of BIG-bench in the ``bigbench==1.0.0`` source
  distribution on PyPI (sha256 :data:`SDIST_SHA256`), fetched with pip into the cache
  (:func:`~edgeroute.learn.fresh_eval.cache_dir`).
* **Labels.** ``labels/bigbench_task_classes.json``: one class per task, from the task's
  name, description and keywords.
* **Prompts.** BIG-bench's zero-shot format: the task prefix, the input, each choice of a
  multiple-choice example after ``"\\n  choice: "``, then ``"\\nA: "``. Inputs over
  :data:`MAX_CHARS` characters, exact duplicates and training texts are dropped.
* **Sample.** Per task the :data:`PER_TASK` examples with the smallest
  ``sha256(task + prompt)``; per class at most :data:`PER_CLASS`, round-robin over tasks.

``--leave-one-out`` is the development criterion over every scored set (BIG-bench, the
second, third and fourth fresh sets, Arena-Hard v2.0): for each, a model of each recipe
trained without any of its prompts (the recipe before the sets were trained on, and the
shipped one, which trains on the other sets too) is scored on it. It asks whether prompts of
other benchmarks help on a benchmark not trained on, which is what traffic is. The
shipped task model trains on all four fresh sets (:func:`shipped_training`); the fifth and
sixth fresh sets (:mod:`edgeroute.learn.fresh_eval_v5`, :mod:`edgeroute.learn.fresh_eval_v6`),
scored and read since, are the ones it has not seen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeroute.learn import data, fresh_eval
from edgeroute.learn.data import Example
from edgeroute.learn.model import LinearModel

SDIST = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASK_CLASSES_FILE = data.LABELS / "bigbench_task_classes.json"
PER_TASK = 25
PER_CLASS = 150
MAX_CHARS = 8000


def fetch(cache: Path) -> Path:
    """The verified BIG-bench sdist in ``cache``, downloaded with pip when it is not there yet."""
    return fresh_eval.pip_fetch(cache, "bigbench==1.0.0", SDIST, SDIST_SHA256, source=True)


def task_labels() -> dict[str, str]:
    raw: dict[str, Any] = json.loads(TASK_CLASSES_FILE.read_text(encoding="utf-8"))
    return {task: label for label, tasks in raw.items() if not label.startswith("_") for task in tasks}


def _prompt(task: dict[str, Any], ex: dict[str, Any]) -> str:
    """BIG-bench's zero-shot rendering of one example."""
    text = str(task.get("task_prefix", "")) + str(ex.get("input", ""))
    choices = ex.get("target_scores")
    if isinstance(choices, dict) and choices:
        prefix = str(task.get("choice_prefix", "\n  choice: "))
        text += "".join(prefix + str(c) for c in choices)
    return text + str(task.get("example_output_prefix", "\nA: "))


def _h(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def build_dev_set(sdist: Path, labels: dict[str, str]) -> list[Example]:
    """The development prompts (source = the task's name)."""
    per_task: dict[str, list[tuple[str, str]]] = {}
    with tarfile.open(sdist) as tar:
        for member in tar:
            parts = member.name.split("/")
            if parts[-1] != "task.json" or "benchmark_tasks" not in parts:
                continue
            rel = parts[parts.index("benchmark_tasks") + 1 : -1]
            task_name = next((n for n in ("/".join(rel), rel[0]) if n in labels), None)
            f = tar.extractfile(member)
            if task_name is None or f is None:
                continue
            task = json.loads(f.read().decode("utf-8"))
            for ex in task.get("examples", []):
                prompt = _prompt(task, ex)
                if 0 < len(prompt) <= MAX_CHARS:
                    per_task.setdefault(task_name, []).append((_h(task_name, prompt), prompt))
    by_class: dict[str, list[tuple[tuple[int, str], Example]]] = {}
    for task_name, rows in sorted(per_task.items()):
        for rank, (_key, prompt) in enumerate(sorted(set(rows))[:PER_TASK]):
            order = (rank, _h(task_name))
            by_class.setdefault(labels[task_name], []).append((order, Example(prompt, labels[task_name], task_name)))
    training = fresh_eval.training_texts()
    out: list[Example] = []
    seen: set[str] = set()
    for label in sorted(by_class):
        for _order, e in sorted(by_class[label], key=lambda r: r[0])[:PER_CLASS]:
            if e.text not in seen and e.text not in training:
                seen.add(e.text)
                out.append(e)
    return out


def dev_set() -> list[Example]:
    """The BIG-bench development set, fetched into the cache on first use."""
    return build_dev_set(fetch(fresh_eval.cache_dir()), task_labels())


ARENA = "Arena-Hard v2.0"


def development_sets() -> dict[str, list[Example]]:
    """Every scored set, now a development set, by name (fetched into the cache).

    The four fresh sets scored so far and Arena-Hard v2.0 (whose figure was also read
    many times over).
    """
    from edgeroute.learn import fresh_eval_v3, fresh_eval_v4

    cache = fresh_eval.cache_dir()
    return {
        "BIG-bench": dev_set(),
        "evalscope + inspect-evals": fresh_eval.build_test_set(fresh_eval.fetch(cache), fresh_eval.rules()),
        "OpenAI evals": fresh_eval_v3.build_test_set(fresh_eval_v3.fetch(cache), fresh_eval_v3.folder_labels()),
        "SciCode + MMATH": fresh_eval_v4.build_test_set(fresh_eval_v4.fetch(cache), fresh_eval_v4.rules()),
        ARENA: data.arena_hard_v2_test(),
    }


# What a development set's example weighs against one of the shared data or seeds (before the
# per-class balancing). Chosen by ``--leave-one-out`` among 0.25, 0.5, 1 and 2 (mean macro-F1
# over code / math / creative writing of the five held-out sets, in a run without the
# de-duplication across sets: 0.678, 0.683, 0.681, 0.682; with it, 0.5 gives 0.682).
DEV_WEIGHT = 0.5


def sets_texts(sets: dict[str, list[Example]]) -> set[str]:
    return {e.text for rows in sets.values() for e in rows}


def with_sets(base: list[Example], sets: dict[str, list[Example]]) -> tuple[list[Example], list[float]]:
    """The training examples and their weights of the shipped recipe: ``base`` and every set's prompts."""
    seen = {e.text for e in base}
    extra: list[Example] = []
    for rows in sets.values():
        for e in rows:
            if e.text not in seen:
                seen.add(e.text)
                extra.append(e)
    return base + extra, [1.0] * len(base) + [DEV_WEIGHT] * len(extra)


def shipped_training() -> tuple[list[Example], list[float]]:
    """What the shipped task model trains on: the shared data, the seeds, Arena-Hard v2.0 and v0.1,
    and the four scored fresh sets (fetched into the cache; :class:`~edgeroute.learn.fresh_eval.Unavailable`
    when they cannot be)."""
    sets = development_sets()
    del sets[ARENA]  # in the base already
    return with_sets(data.task_training_examples(arena_v2=True, arena_v01=True), sets)


def shipped_texts() -> set[str]:
    """Every text the shipped task model trains on, the scored fresh sets' included (empty
    without the shared data): the fresh sets fixed after it exclude them."""
    return {e.text for e in shipped_training()[0]} if data.have_data() else set()


Recipe = Callable[[list[Example], dict[str, list[Example]]], LinearModel]


def recipes(calibrate: bool = True) -> dict[str, Recipe]:
    """The recipe before the development sets were trained on (the shared data and seeds only),
    and the shipped one (with every development set not held out). Without ``calibrate`` each
    model is fitted once, not four times: the same predicted classes, up to the quantisation."""
    from edgeroute.learn.tasks import train_task_model

    def without_sets(base: list[Example], others: dict[str, list[Example]]) -> LinearModel:
        return train_task_model(base, calibrate=calibrate)

    def with_the_sets(base: list[Example], others: dict[str, list[Example]]) -> LinearModel:
        examples, weights = with_sets(base, others)
        return train_task_model(examples, weights=weights, calibrate=calibrate)

    return {"without the sets": without_sets, "with the other sets": with_the_sets}


def leave_one_out(
    sets: dict[str, list[Example]], chosen: dict[str, Recipe] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """Per held-out set, a model of each recipe trained without any of its prompts, scored on it.

    The training data is the shared data and seeds (Arena-Hard v2.0 only where it is not the
    held-out set) and, for a recipe that takes them, the other sets. Each figure is macro-F1
    over the set's classes (``all``), over code / math / creative writing (``focus``) and
    the expected calibration error (``ece``).
    """
    chosen = recipes() if chosen is None else chosen
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, test in sets.items():
        held = {e.text for e in test}
        base = [e for e in data.task_training_examples(arena_v2=name != ARENA, arena_v01=True) if e.text not in held]
        others = {o: [e for e in rows if e.text not in held] for o, rows in sets.items() if o != name}
        out[name] = {}
        for who, recipe in chosen.items():
            m = fresh_eval.score(recipe(base, others), test)["model"]
            out[name][who] = {"all": m["macro_f1"], "focus": m["macro_f1_focus"] or 0.0, "ece": m["ece"]}
    return out


def _print_leave_one_out(res: dict[str, dict[str, dict[str, float]]]) -> None:
    print(f"{'held-out set':<28}{'model':<22}{'macro all':>10}{'macro c/m/cw':>14}{'ECE':>7}")
    whos = next(iter(res.values())).keys()
    for name, row in res.items():
        for who, f in row.items():
            print(f"{name:<28}{who:<22}{f['all']:>10.3f}{f['focus']:>14.3f}{f['ece']:>7.3f}")
    for who in whos:
        mean = {k: sum(r[who][k] for r in res.values()) / len(res) for k in ("all", "focus", "ece")}
        print(f"{'mean':<28}{who:<22}{mean['all']:>10.3f}{mean['focus']:>14.3f}{mean['ece']:>7.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeroute.learn.task_devset", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=fresh_eval.TASK_MODEL, help="task model file (default: shipped)")
    ap.add_argument(
        "--leave-one-out",
        action="store_true",
        help="per scored set, train each recipe without it and score on it (five sets, ~10 min uncalibrated)",
    )
    ap.add_argument(
        "--no-calibrate",
        action="store_true",
        help="with --leave-one-out: fit each model once (same macro-F1 up to quantisation; ECE of uncalibrated models)",
    )
    args = ap.parse_args(argv)
    try:
        if args.leave_one_out:
            _print_leave_one_out(leave_one_out(development_sets(), recipes(calibrate=not args.no_calibrate)))
            return 0
        dev = dev_set()
    except (fresh_eval.Unavailable, OSError) as exc:
        print(f"skipped: the BIG-bench development set is unavailable ({exc})", file=sys.stderr)
        return 3
    fresh_eval.print_result(fresh_eval.score(LinearModel.load(args.model), dev), "BIG-bench 1.0.0, development set")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
