"""Loaders for the shared training data (`../shared/data` next to the repository).

Nothing here is copied into the package: the data stays where it is; only the
hand-made labels in ``labels/`` (our own annotation of Arena-Hard v0.1 uids and
a few hand-written seed prompts for classes the data lacks) ship with the code.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LABELS = Path(__file__).resolve().parent / "labels"

MMLU_MATH_SUBJECTS = frozenset(
    {
        "abstract_algebra",
        "college_mathematics",
        "elementary_mathematics",
        "high_school_mathematics",
        "high_school_statistics",
    }
)


def data_root() -> Path:
    """`../shared/data` relative to the repository root."""
    return REPO.parent / "shared" / "data"


def have_data() -> bool:
    root = data_root()
    return (root / "task-type-prompts").is_dir() and (root / "routellm-gpt4-mixtral-outcomes").is_dir()


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    source: str


def _jsonl(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def task_training_examples(seed: int = 0, gsm8k: int = 400, mmlu: int = 800) -> list[Example]:
    """Task-type training set. Arena-Hard v0.1 (the test set) is never included."""
    root = data_root()
    out: list[Example] = []
    for r in _jsonl(root / "task-type-prompts" / "task_type_prompts.jsonl"):
        label = str(r["task_type"])
        if label == "roleplay":  # our class list has no roleplay; it is creative writing
            label = "creative_writing"
        out.append(Example(str(r["prompt"]), label, str(r["source"])))
    with (root / "task-type-prompts" / "vllm_sr_domain_classify_cases.json").open() as f:
        for case in json.load(f):
            label = "math" if case["category"] == "math" else "knowledge_qa"
            out.append(Example(str(case["question"]), label, "vllm_sr"))
    rng = random.Random(seed)
    g = [p for p, _, _ in load_gsm8k()]
    rng.shuffle(g)
    out += [Example(p, "math", "gsm8k") for p in g[:gsm8k]]
    m = load_mmlu()
    rng.shuffle(m)
    for p, subject, _s, _w in m[:mmlu]:
        out.append(Example(p, "math" if subject in MMLU_MATH_SUBJECTS else "knowledge_qa", "mmlu"))
    for r in _jsonl(LABELS / "seed_prompts.jsonl"):
        out.append(Example(str(r["prompt"]), str(r["task_type"]), "seed"))
    return out


def arena_hard_test() -> list[Example]:
    """Arena-Hard v0.1 prompts with our per-prompt labels (code/math/creative_writing/other)."""
    labels = json.loads((LABELS / "arena_hard_v0.1_task_labels.json").read_text())
    rows = _jsonl(data_root() / "task-type-prompts" / "arena_hard_v0.1_questions.jsonl")
    return [Example(str(r["prompt"]), str(labels[str(r["uid"])]), "arena_hard_v0.1") for r in rows]


def _contaminated(name: str) -> set[str]:
    path = data_root() / "routellm-gpt4-mixtral-outcomes" / f"{name}_contaminated_prompts.jsonl"
    return {str(r["eval_prompt"]) for r in _jsonl(path)}


STRONG = "gpt-4-1106-preview"
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"


def load_gsm8k(decontaminate: bool = True) -> list[tuple[str, float, float]]:
    """(prompt, strong correct, weak correct), contaminated prompts dropped."""
    path = data_root() / "routellm-gpt4-mixtral-outcomes" / "gsm8k_responses.csv"
    bad = _contaminated("gsm8k") if decontaminate else set()
    with path.open(encoding="utf-8", newline="") as f:
        return [
            (r["prompt"], float(r[STRONG] == "True"), float(r[WEAK] == "True"))
            for r in csv.DictReader(f)
            if r["prompt"] not in bad
        ]


def load_mmlu(decontaminate: bool = True) -> list[tuple[str, str, float, float]]:
    """(prompt, subject, strong correct, weak correct), contaminated prompts dropped."""
    path = data_root() / "routellm-gpt4-mixtral-outcomes" / "mmlu_responses.csv"
    bad = _contaminated("mmlu") if decontaminate else set()
    with path.open(encoding="utf-8", newline="") as f:
        return [
            (r["prompt"], r["subject"], float(r[STRONG] == "True"), float(r[WEAK] == "True"))
            for r in csv.DictReader(f)
            if r["prompt"] not in bad
        ]
