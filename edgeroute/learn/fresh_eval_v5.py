"""``python -m edgeroute.learn.fresh_eval_v5``: the task classifier on a fifth fresh test set.

The first four fresh sets (BIG-bench; evalscope + inspect-evals; the OpenAI evals
registry; SciCode + MMATH) and Arena-Hard v2.0 have been scored and read, so they are
development sets now (:mod:`edgeroute.learn.task_devset`). This protocol was fixed and
committed before any prompt of its source was read; only the wheel's file list and sizes,
the benchmark's name and the harness's task code (field names, how a prompt is built)
were looked at:

* **Source.** ``nvidia-bigcode-eval==26.3`` from PyPI, pinned by sha256 (:data:`WHEEL`),
  fetched with pip into the cache (:func:`~edgeroute.learn.fresh_eval.cache_dir`):
  VerilogEval, ``bigcode_eval/tasks/datasets/verilog/VerilogEval_<Human|Machine>.jsonl``
  joined by ``task_id`` with ``VerilogDescription_<Human|Machine>.jsonl`` (hardware-design
  problems, each a Verilog module to complete). No training or development step has used
  it (the training data's benchmarks are MT-Bench, Arena-Hard, HumanEval, GSM8K, MMLU and
  vLLM-SR's cases; the development sets are BIG-bench, evalscope, inspect-evals, OpenAI
  evals, SciCode, MMATH and Arena-Hard v2.0).
* **Labels**, by ``labels/eval/fresh_task_sources_v5.json``: the benchmark is one class
  (VerilogEval -> code), from its name and our class definitions. No other class was found
  in a source not yet used, so the set has code only: its focus macro-F1 is the code F1,
  whose precision is 1 by construction (it measures recall).
* **Prompts.** A problem's ``detail_description``, a newline, then its ``prompt`` (the
  module header to complete): what is asked and the code to complete. The harness's fixed
  system and instruction lines are left out (one template, the same for every problem).
  Texts over :data:`MAX_CHARS` characters, empty texts, exact duplicates (first kept,
  Human before Machine) and training texts (those of the shipped recipe, the scored
  fresh sets included: :func:`~edgeroute.learn.task_devset.shipped_texts`) are dropped.
* **Sample.** At most :data:`PER_CLASS` problems, those with the smallest
  ``sha256(dataset, task_id)``. A class with fewer than :data:`MIN_PER_CLASS` prompts is
  left out whole.
* **Score.** As :func:`edgeroute.learn.fresh_eval.score`: per-class F1, macro-F1 with a
  bootstrap interval, accuracy, calibration, the keyword rule beside it.
* **Once.** The first scoring of a model file is written to
  ``<cache>/fresh_eval_v5_result.json`` under the file's sha256; later runs print it.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from edgeroute.learn import data, fresh_eval, task_devset
from edgeroute.learn.data import Example

# (requirement, file pip writes, its sha256)
WHEEL = (
    "nvidia-bigcode-eval==26.3",
    "nvidia_bigcode_eval-26.3-py3-none-any.whl",
    "5417cc7bd476aab86c7dc938ca31064e23532e9569847fe970d3ebf0d80fab50",
)
VERILOG_DIR = "bigcode_eval/tasks/datasets/verilog/"
RULES_FILE = data.LABELS / "eval" / "fresh_task_sources_v5.json"
PER_CLASS = 150
MIN_PER_CLASS = 20
MAX_CHARS = 8000
RECORD = "fresh_eval_v5_result.json"
TITLE = "fifth fresh task test set (VerilogEval in nvidia-bigcode-eval 26.3)"


def fetch(cache: Path) -> Path:
    """The verified wheel (downloaded with pip when not cached)."""
    req, fname, sha = WHEEL
    return fresh_eval.pip_fetch(cache, req, fname, sha)


def rules() -> dict[str, Any]:
    return fresh_eval.load_rules(RULES_FILE)


def _h(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def _rows(z: zipfile.ZipFile, member: str) -> dict[str, dict[str, Any]]:
    return {r["task_id"]: r for r in fresh_eval.jsonl_rows(z, member) if isinstance(r.get("task_id"), str)}


def problem_prompt(problem: dict[str, Any], description: dict[str, Any]) -> str | None:
    """What a VerilogEval problem asks: its description, then the module header to complete."""
    desc, header = description.get("detail_description"), problem.get("prompt")
    if not isinstance(desc, str) or not desc.strip():
        return None
    head = header.strip("\n") if isinstance(header, str) else ""
    return f"{desc.strip()}\n{head}" if head.strip() else desc.strip()


def build_test_set(wheel: Path, r: dict[str, Any], training: set[str] | None = None) -> list[Example]:
    """The test prompts by the protocol above (source = ``verilogeval/<dataset>``)."""
    training = fresh_eval.training_texts() if training is None else training
    label = str(r["benchmarks"]["verilogeval"])
    ranked: list[tuple[str, Example]] = []
    seen: set[str] = set()
    with zipfile.ZipFile(wheel) as z:
        for ds in r["datasets"]:
            try:
                problems = _rows(z, f"{VERILOG_DIR}VerilogEval_{ds}.jsonl")
                descriptions = _rows(z, f"{VERILOG_DIR}VerilogDescription_{ds}.jsonl")
            except KeyError:
                continue
            for task_id in sorted(problems):
                text = problem_prompt(problems[task_id], descriptions.get(task_id, {}))
                if text is None or not 0 < len(text) <= MAX_CHARS or text in training or text in seen:
                    continue
                seen.add(text)
                ranked.append((_h(ds, task_id), Example(text, label, f"verilogeval/{ds}")))
    out = [e for _key, e in sorted(ranked, key=lambda r: r[0])[:PER_CLASS]]
    counts = Counter(e.label for e in out)
    return [e for e in out if counts[e.label] >= MIN_PER_CLASS]


def main(argv: list[str] | None = None) -> int:
    return fresh_eval.scored_once(
        argv,
        prog="python -m edgeroute.learn.fresh_eval_v5",
        description=(__doc__ or "").splitlines()[0],
        record_name=RECORD,
        title=TITLE,
        build=lambda cache: build_test_set(fetch(cache), rules(), training=task_devset.shipped_texts()),
    )


if __name__ == "__main__":
    raise SystemExit(main())
