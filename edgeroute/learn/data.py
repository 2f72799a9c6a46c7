"""Loaders for the shared training data (`../shared/data` next to the repository).

Nothing here is copied into the package: the data stays where it is; only the
hand-made labels in ``labels/`` (our own annotation of Arena-Hard v0.1 uids and
a few hand-written seed prompts for classes the data lacks) ship with the code.
"""

from __future__ import annotations

import csv
import json
import os
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
# Calculation-heavy subjects: Arena-Hard files such problems (circuits, kinetics,
# econometrics) under "math", and so does TaskType::Math ("calculation").
MMLU_QUANT_SUBJECTS = MMLU_MATH_SUBJECTS | frozenset(
    {
        "college_physics",
        "high_school_physics",
        "conceptual_physics",
        "college_chemistry",
        "high_school_chemistry",
        "electrical_engineering",
        "econometrics",
    }
)
VLLM_SR_QUANT_CATEGORIES = frozenset({"math", "physics", "engineering", "chemistry"})


def data_root() -> Path:
    """`$EDGEROUTE_DATA`, else `../shared/data` beside the repository."""
    env = os.environ.get("EDGEROUTE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


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


ARENA_V2 = "arena_hard_v2.0"
ARENA_V01 = "arena_hard_v0.1"
# seed_prompts_harness.jsonl: exam- and harness-style requests of the classes the other
# files lack (reasoning, translation, knowledge questions, programming problems full of
# numbers), written without reading any prompt of a test set. seed_prompts_thin.jsonl:
# more of the thinnest classes (reasoning puzzles, extraction, summaries, small talk),
# written before the second fresh test set was read.
SEED_FILES = (
    "seed_prompts.jsonl",
    "seed_prompts_multilingual.jsonl",
    "seed_prompts_harness.jsonl",
    "seed_prompts_thin.jsonl",
)
# Hand-written prompts in the style of real chat-assistant users (long, specific, messy;
# code / math / creative writing and the "other" requests that border on them). Written
# by us without looking at the Arena-Hard v2.0 test prompts; source "seed_chat".
CHAT_SEED_FILES = (
    "seed_prompts_chat_style.jsonl",
    "seed_prompts_chat_style_2.jsonl",
    "seed_prompts_chat_multilingual.jsonl",
)
SEED_CHAT = "seed_chat"
# Sources that look like real user traffic (weighted up by the task trainer).
REALISTIC_SOURCES = frozenset({ARENA_V2, ARENA_V01, SEED_CHAT})


def _task_type_rows() -> list[Example]:
    out: list[Example] = []
    for r in _jsonl(data_root() / "task-type-prompts" / "task_type_prompts.jsonl"):
        label = str(r["task_type"])
        if label == "roleplay":  # our class list has no roleplay; it is creative writing
            label = "creative_writing"
        out.append(Example(str(r["prompt"]), label, str(r["source"])))
    return out


def task_training_examples(
    seed: int = 0,
    gsm8k: int = 400,
    mmlu: int = 800,
    *,
    arena_v2: bool = False,
    arena_v01: bool = False,
) -> list[Example]:
    """Task-type training set.

    Always: MT-Bench, HumanEval, vLLM-SR domain cases, a sample of GSM8K and
    MMLU (quantitative subjects -> math, the rest -> knowledge_qa) and our
    hand-written seed prompts (templated ones, source ``seed``; chat-style ones,
    source ``seed_chat``). The two real-user sets are test sets and come
    in only when asked: ``arena_v2`` (the 750 labelled Arena-Hard v2.0 prompts)
    and ``arena_v01`` (the 500 Arena-Hard v0.1 prompts with our hand labels).
    """
    root = data_root()
    out = [e for e in _task_type_rows() if arena_v2 or e.source != ARENA_V2]
    with (root / "task-type-prompts" / "vllm_sr_domain_classify_cases.json").open() as f:
        for case in json.load(f):
            label = "math" if case["category"] in VLLM_SR_QUANT_CATEGORIES else "knowledge_qa"
            out.append(Example(str(case["question"]), label, "vllm_sr"))
    rng = random.Random(seed)
    g = [p for p, _, _ in load_gsm8k()]
    rng.shuffle(g)
    out += [Example(p, "math", "gsm8k") for p in g[:gsm8k]]
    m = load_mmlu()
    rng.shuffle(m)
    for p, subject, _s, _w in m[:mmlu]:
        out.append(Example(p, "math" if subject in MMLU_QUANT_SUBJECTS else "knowledge_qa", "mmlu"))
    for name in SEED_FILES:
        for r in _jsonl(LABELS / name):
            out.append(Example(str(r["prompt"]), str(r["task_type"]), "seed"))
    for name in CHAT_SEED_FILES:
        for r in _jsonl(LABELS / name):
            out.append(Example(str(r["prompt"]), str(r["task_type"]), SEED_CHAT))
    if arena_v01:
        out += arena_hard_test()
    return out


def arena_hard_v2_test() -> list[Example]:
    """The 750 Arena-Hard v2.0 prompts labelled code / math / creative_writing by their source."""
    return [e for e in _task_type_rows() if e.source == ARENA_V2]


def arena_hard_v2_annotation() -> list[tuple[Example, str]]:
    """Each Arena-Hard v2.0 prompt (source label) with our own label for it.

    Our labels (``labels/arena_hard_v2.0_annotation.json``, id -> label) were given
    blind to the source labels, by the class definitions the seed prompts follow. They
    measure how far the source's conventions are from those definitions; nothing
    trains or selects on them.
    """
    ours = json.loads((LABELS / "arena_hard_v2.0_annotation.json").read_text())
    rows = _jsonl(data_root() / "task-type-prompts" / "task_type_prompts.jsonl")
    return [
        (Example(str(r["prompt"]), str(r["task_type"]), ARENA_V2), str(ours[str(r["id"])]))
        for r in rows
        if r["source"] == ARENA_V2
    ]


def arena_hard_test() -> list[Example]:
    """Arena-Hard v0.1 prompts with our per-prompt labels (code/math/creative_writing/other)."""
    labels = json.loads((LABELS / "arena_hard_v0.1_task_labels.json").read_text())
    rows = _jsonl(data_root() / "task-type-prompts" / "arena_hard_v0.1_questions.jsonl")
    return [Example(str(r["prompt"]), str(labels[str(r["uid"])]), ARENA_V01) for r in rows]


def arena_hard_v01_clusters() -> list[str]:
    """Topic cluster of each :func:`arena_hard_test` prompt (same order), for grouped CV."""
    rows = _jsonl(data_root() / "task-type-prompts" / "arena_hard_v0.1_questions.jsonl")
    return [str(r["cluster"]) for r in rows]


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
