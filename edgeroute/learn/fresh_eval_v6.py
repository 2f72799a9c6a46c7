"""``python -m edgeroute.learn.fresh_eval_v6``: the task classifier on a sixth fresh test set.

The first five fresh sets (BIG-bench; evalscope + inspect-evals; the OpenAI evals registry;
SciCode + MMATH; VerilogEval) and Arena-Hard v2.0 have been scored and read, so they are
development sets now; the shipped task model trains on the first four. None of them had
code, maths and creative writing together from a source of their own. This protocol was
fixed and committed before any prompt of its source was read; only the wheel's file list
and sizes, the two files' field names, their category names (and the source's own
grouping of them) and the number of distinct prompts per category were looked at:

* **Source.** ``evalscope==0.16.3`` from PyPI, pinned by sha256 (:data:`WHEEL`), fetched
  with pip into the cache (:func:`~edgeroute.learn.fresh_eval.cache_dir`). Not the
  benchmark samples the second set took from evalscope 1.14.1, but the data of its old
  arena registry, which evalscope 0.8 to 0.16 ship and 0.17 dropped:

  - :data:`BATTLE`, the QA browser's battles: 317 distinct questions in Chinese, each
    with one of 27 categories of the source's own (``question``, ``category``; each
    question comes twice, once per model pair);
  - :data:`VICUNA`, the Vicuna benchmark's 80 questions (``text``, ``category``).

  No training or development step has used either (the training data's benchmarks are
  MT-Bench, Arena-Hard, HumanEval, GSM8K, MMLU, vLLM-SR's cases and the first four fresh
  sets; the development sets are those and VerilogEval).
* **Labels**, by ``labels/eval/fresh_task_sources_v6.json``: a class per category, from the
  category names and our class definitions (code, math and creative writing among them:
  CODING, 数学解题, 通用写作 / 续写生成 / 角色扮演; coding, math, roleplay); an unlisted
  category is left out.
* **Prompts.** A battle's ``question`` and a Vicuna question's ``text``, as shipped (one
  user turn each). Battles first, then Vicuna, each in file order; texts that are not a
  non-blank string, texts over :data:`MAX_CHARS` characters, exact duplicates (the first
  kept) and training texts (:func:`~edgeroute.learn.task_devset.shipped_texts`) are
  dropped; a class with fewer than :data:`MIN_PER_CLASS` prompts is left out whole. No
  sampling: the sources are small (about 20 code, 20 maths and 40 creative-writing
  prompts are expected), so the figures carry bootstrap intervals.
* **Score.** As :func:`edgeroute.learn.fresh_eval.score`: per-class F1, macro-F1 over all
  classes in the set and over code / math / creative writing (with a bootstrap interval),
  accuracy, calibration, the keyword rule beside it.
* **Once.** The first scoring of a model file is written to
  ``<cache>/fresh_eval_v6_result.json`` under the file's sha256; later runs print it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from edgeroute.learn import data, fresh_eval, task_devset
from edgeroute.learn.data import Example

# (requirement, file pip writes, its sha256)
WHEEL = (
    "evalscope==0.16.3",
    "evalscope-0.16.3-py3-none-any.whl",
    "b3115239733c79475e7507540dc32f2d07a2bbf0fb8799d1b6f38aa74bf20329",
)
BATTLE = "evalscope/registry/data/qa_browser/battle.jsonl"
VICUNA = "evalscope/registry/data/question.jsonl"
RULES_FILE = data.LABELS / "eval" / "fresh_task_sources_v6.json"
MAX_CHARS = 8000
MIN_PER_CLASS = 5
RECORD = "fresh_eval_v6_result.json"
TITLE = "sixth fresh task test set (evalscope 0.16.3's arena registry: QA-browser battles, Vicuna questions)"

# member -> (the rules' category map, the prompt's field, the source's name)
FILES = {
    BATTLE: ("battle_categories", "question", "evalscope-battle"),
    VICUNA: ("vicuna_categories", "text", "vicuna"),
}


def fetch(cache: Path) -> Path:
    """The verified wheel (downloaded with pip when not cached)."""
    req, fname, sha = WHEEL
    return fresh_eval.pip_fetch(cache, req, fname, sha)


def rules() -> dict[str, Any]:
    return fresh_eval.load_rules(RULES_FILE)


def candidates(wheel: Path, r: dict[str, Any]) -> list[Example]:
    """Every labelled prompt of the two files, in order (source = ``<file>/<category>``)."""
    out: list[Example] = []
    with zipfile.ZipFile(wheel) as z:
        for member, (rules_key, field, name) in FILES.items():
            labels: dict[str, str] = r[rules_key]
            for row in fresh_eval.jsonl_rows(z, member):
                category, text = row.get("category"), row.get(field)
                label = labels.get(category) if isinstance(category, str) else None
                if label and isinstance(text, str) and text.strip():
                    out.append(Example(text, label, f"{name}/{category}"))
    return out


def build_test_set(wheel: Path, r: dict[str, Any], training: set[str] | None = None) -> list[Example]:
    """The test prompts by the protocol above."""
    training = task_devset.shipped_texts() if training is None else training
    return fresh_eval.usable(candidates(wheel, r), training, MAX_CHARS, MIN_PER_CLASS)


def main(argv: list[str] | None = None) -> int:
    return fresh_eval.scored_once(
        argv,
        prog="python -m edgeroute.learn.fresh_eval_v6",
        description=(__doc__ or "").splitlines()[0],
        record_name=RECORD,
        title=TITLE,
        build=lambda cache: build_test_set(fetch(cache), rules()),
    )


if __name__ == "__main__":
    raise SystemExit(main())
