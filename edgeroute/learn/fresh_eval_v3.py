"""``python -m edgeroute.learn.fresh_eval_v3``: the task classifier on a third fresh test set.

The first two fresh sets (BIG-bench; evalscope + inspect-evals) have been scored and
read, so they are development sets now (:mod:`edgeroute.learn.task_devset`,
:mod:`edgeroute.learn.fresh_eval`). This protocol was fixed and committed before any
prompt of its source was read; only file names, eval ids and the registry's eval
descriptions were looked at:

* **Source.** The OpenAI evals registry as shipped in the ``evals==3.0.1.post1`` wheel on
  PyPI (sha256 :data:`SHA256`), fetched with pip into the cache
  (:func:`~edgeroute.learn.fresh_eval.cache_dir`). No training or development step has
  used it: its samples were written by the evals' contributors, not drawn from the
  benchmarks we train or develop on (the folders that are derived from them are left
  out, see below).
* **Labels**, from the registry's own metadata by ``labels/fresh_task_sources_v3.json``:
  a class per data folder (``evals/registry/data/<folder>/``), written from the folder
  names and the eval descriptions alone; a folder not listed is left out, and so are
  folders derived from MMLU, Spider / CoSQL or BIG-bench, agent and tool evals, and
  images.
* **Prompts.** Every ``*.jsonl`` file under a listed folder, except files whose name
  says they hold graded answers (``meta`` or ``labeled`` in the name). A row's prompt is
  what the core classifies: the text of its ``input``'s user messages, joined by a
  newline (``input`` as a plain string is the text itself); a row with no user message
  gives the text of all its messages (the harness sends the instruction as the system
  message then). Rows without ``input``, non-text parts, texts over :data:`MAX_CHARS`
  characters, exact duplicates and training texts are dropped.
* **Sample.** Per folder the :data:`PER_FOLDER` prompts with the smallest
  ``sha256(folder + prompt)``; per class at most :data:`PER_CLASS`, round-robin over the
  folders; a class with fewer than :data:`MIN_PER_CLASS` prompts is left out whole.
* **Score.** As :func:`edgeroute.learn.fresh_eval.score`: per-class F1, macro-F1 over all
  classes and over code / math / creative writing (with a bootstrap interval), accuracy,
  calibration, the keyword rule beside it.
* **Once.** The first scoring of a model file is written to
  ``<cache>/fresh_eval_v3_result.json`` under the file's sha256; later runs print it.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from edgeroute.learn import data, fresh_eval
from edgeroute.learn.data import Example

REQUIREMENT = "evals==3.0.1.post1"
WHEEL = "evals-3.0.1.post1-py3-none-any.whl"
SHA256 = "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"
DATA = "evals/registry/data/"
RULES_FILE = data.LABELS / "fresh_task_sources_v3.json"
PER_FOLDER = 20
PER_CLASS = 150
MIN_PER_CLASS = 20
MAX_CHARS = 8000
RECORD = "fresh_eval_v3_result.json"
TITLE = "third fresh task test set (OpenAI evals 3.0.1.post1 registry)"


def fetch(cache: Path) -> Path:
    """The verified wheel in ``cache``, downloaded with pip when it is not there yet."""
    return fresh_eval.pip_fetch(cache, REQUIREMENT, WHEEL, SHA256)


def folder_labels() -> dict[str, str]:
    raw: dict[str, Any] = json.loads(RULES_FILE.read_text(encoding="utf-8"))
    return {folder: label for label, folders in raw["folders"].items() for folder in folders}


def prompt_text(row: dict[str, Any]) -> str | None:
    """The text the core would classify for one sample, or None when it has none."""
    inp = row.get("input")
    if isinstance(inp, str):
        return inp or None
    if not isinstance(inp, list):
        return None
    user: list[str] = []
    every: list[str] = []
    for m in inp:
        if not isinstance(m, dict):
            return None
        content = m.get("content")
        if not isinstance(content, str):
            return None
        every.append(content)
        if m.get("role") == "user":
            user.append(content)
    text = "\n".join(user) if user else "\n".join(every)
    return text if text.strip() else None


def _folder_of(member: str, labels: dict[str, str]) -> str | None:
    rel = member[len(DATA) :]
    # the longest listed folder that contains the file (``test_multiio/battles`` before ``test_multiio``)
    hits = [f for f in labels if rel.startswith(f + "/")]
    return max(hits, key=len) if hits else None


def candidates(wheel: Path, labels: dict[str, str]) -> dict[str, list[str]]:
    """folder -> its prompts, in file order (before sampling)."""
    out: dict[str, list[str]] = {}
    with zipfile.ZipFile(wheel) as z:
        for member in sorted(z.namelist()):
            if not member.startswith(DATA) or not member.endswith(".jsonl"):
                continue
            name = member.rsplit("/", 1)[-1].lower()
            folder = _folder_of(member, labels)
            if folder is None or "meta" in name or "labeled" in name:
                continue
            for line in z.read(member).decode("utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                text = prompt_text(row) if isinstance(row, dict) else None
                if text is not None:
                    out.setdefault(folder, []).append(text)
    return out


def _h(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def build_test_set(wheel: Path, labels: dict[str, str], training: set[str] | None = None) -> list[Example]:
    """The test prompts by the protocol above (source = ``evals/<folder>``)."""
    training = fresh_eval.training_texts() if training is None else training
    seen: set[str] = set()
    by_class: dict[str, list[tuple[tuple[int, str], Example]]] = {}
    for folder, texts in sorted(candidates(wheel, labels).items()):
        keep = sorted({t for t in texts if 0 < len(t) <= MAX_CHARS and t not in training}, key=lambda t: _h(folder, t))
        rank = 0
        for t in keep:
            if rank == PER_FOLDER:
                break
            if t in seen:  # the same text under two folders counts once, first folder wins
                continue
            seen.add(t)
            label = labels[folder]
            by_class.setdefault(label, []).append(((rank, _h(folder)), Example(t, label, f"evals/{folder}")))
            rank += 1
    out: list[Example] = []
    for label in sorted(by_class):
        rows = [e for _order, e in sorted(by_class[label], key=lambda r: r[0])[:PER_CLASS]]
        if len(rows) >= MIN_PER_CLASS:
            out += rows
    return out


def class_counts(test: list[Example]) -> dict[str, int]:
    return dict(Counter(e.label for e in test))


def main(argv: list[str] | None = None) -> int:
    return fresh_eval.scored_once(
        argv,
        prog="python -m edgeroute.learn.fresh_eval_v3",
        description=(__doc__ or "").splitlines()[0],
        record_name=RECORD,
        title=TITLE,
        build=lambda cache: build_test_set(fetch(cache), folder_labels()),
    )


if __name__ == "__main__":
    raise SystemExit(main())
