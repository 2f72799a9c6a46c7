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

``--leave-one-out`` is the development criterion over all three scored sets (BIG-bench, the
second fresh set, the third): for each, a model trained on the shipped recipe's data plus
the other two sets is scored on it, beside the shipped model. It asks whether prompts of
other benchmarks help on a benchmark not trained on, which is what traffic is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
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


def development_sets() -> dict[str, list[Example]]:
    """The three scored fresh sets, now development sets, by name (fetched into the cache)."""
    from edgeroute.learn import fresh_eval_v3

    cache = fresh_eval.cache_dir()
    return {
        "BIG-bench": dev_set(),
        "evalscope + inspect-evals": fresh_eval.build_test_set(fresh_eval.fetch(cache), fresh_eval.rules()),
        "OpenAI evals": fresh_eval_v3.build_test_set(fresh_eval_v3.fetch(cache), fresh_eval_v3.folder_labels()),
    }


def leave_one_out(shipped: LinearModel, sets: dict[str, list[Example]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per held-out set: the shipped model and one trained on the recipe's data plus the other sets.

    Each figure is macro-F1 over the set's classes (``all``), over code / math / creative
    writing (``focus``) and the expected calibration error (``ece``).
    """
    from edgeroute.learn.tasks import train_task_model

    base = data.task_training_examples(arena_v2=True, arena_v01=True)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, test in sets.items():
        held = {e.text for e in test}
        extra = [e for other, rows in sets.items() if other != name for e in rows]
        candidate = train_task_model([e for e in base + extra if e.text not in held])
        out[name] = {}
        for who, model in (("shipped", shipped), ("with the other sets", candidate)):
            m = fresh_eval.score(model, test)["model"]
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
        help="train on the recipe's data plus two scored sets, score on the third (each in turn; ~6 min)",
    )
    args = ap.parse_args(argv)
    try:
        if args.leave_one_out:
            _print_leave_one_out(leave_one_out(LinearModel.load(args.model), development_sets()))
            return 0
        dev = dev_set()
    except (fresh_eval.Unavailable, OSError) as exc:
        print(f"skipped: the BIG-bench development set is unavailable ({exc})", file=sys.stderr)
        return 3
    fresh_eval.print_result(fresh_eval.score(LinearModel.load(args.model), dev), "BIG-bench 1.0.0, development set")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
