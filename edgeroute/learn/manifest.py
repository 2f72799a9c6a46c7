"""The manifest of the shipped model files (`edgeroute/models/manifest.json`).

For each `.erlm` file: its size and sha256; for the set: the command that built them, the
featurizer version and the training inputs (each file's sha256, and one digest over all
of them as the data version). `build_models` rewrites it; a test checks that the files in
the repository are the ones it describes and that the label files in the repository are
the ones they were trained on, so a model or its data cannot change unrecorded.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from edgeroute.learn import data

MODELS = Path(__file__).resolve().parents[1] / "models"
MANIFEST = MODELS / "manifest.json"
COMMAND = "python -m edgeroute.learn.build_models"

# Everything the build reads: our labels (in the repository), the public data sets and the
# pinned PyPI files of the four scored fresh sets the task model trains on (task_devset). The
# label files of the fresh sets they were (bigbench_task_classes.json, fresh_task_sources*.json
# and eval/fresh_task_sources_v4.json) are training inputs now; eval/ holds the labels of
# the test sets nothing trains on (the fifth's) besides v4's.
NOT_TRAINING: frozenset[str] = frozenset()
LABEL_FILES = [
    *sorted(p.name for p in data.LABELS.iterdir() if p.suffix in (".json", ".jsonl") and p.name not in NOT_TRAINING),
    "eval/fresh_task_sources_v4.json",
]
DATA_FILES = [
    "task-type-prompts/task_type_prompts.jsonl",
    "task-type-prompts/arena_hard_v0.1_questions.jsonl",
    "routellm-gpt4-mixtral-outcomes/gsm8k_responses.csv",
    "routellm-gpt4-mixtral-outcomes/mmlu_responses.csv",
    "routellm-gpt4-mixtral-outcomes/gsm8k_contaminated_prompts.jsonl",
    "routellm-gpt4-mixtral-outcomes/mmlu_contaminated_prompts.jsonl",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pypi_files() -> dict[str, str]:
    """The scored fresh sets' files the task model trains on -> their pinned sha256 (pip checks each)."""
    from edgeroute.learn import fresh_eval, fresh_eval_v3, fresh_eval_v4, task_devset

    out = {task_devset.SDIST: task_devset.SDIST_SHA256, fresh_eval_v3.WHEEL: fresh_eval_v3.SHA256}
    for _req, name, sha in (*fresh_eval.WHEELS.values(), *fresh_eval_v4.WHEELS.values()):
        out[name] = sha
    return dict(sorted(out.items()))


def inputs() -> dict[str, str]:
    """Training input -> sha256: `labels/NAME` from the repository, `data/PATH` from the data sets,
    `pypi/FILE` the pinned files of the scored fresh sets."""
    out = {f"labels/{name}": sha256(data.LABELS / name) for name in LABEL_FILES}
    out |= {f"data/{rel}": sha256(data.data_root() / rel) for rel in DATA_FILES}
    out |= {f"pypi/{name}": sha for name, sha in pypi_files().items()}
    return out


def data_version(files: dict[str, str]) -> str:
    """One digest over every input's name and sha256."""
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()[:16]


def header(path: Path) -> dict[str, Any]:
    """The JSON header of a model file (see `edgeroute.learn.model`)."""
    raw = path.read_bytes()
    (length,) = struct.unpack_from("<I", raw, 4)
    out: dict[str, Any] = json.loads(raw[8 : 8 + length])
    return out


def describe(path: Path) -> dict[str, Any]:
    return {
        "bytes": path.stat().st_size,
        "sha256": sha256(path),
        "featurizer_version": header(path)["featurizer"].get("version", 1),
    }


def build() -> dict[str, Any]:
    files = inputs()
    return {
        "command": COMMAND,
        "data_version": data_version(files),
        "inputs": files,
        "models": {p.name: describe(p) for p in sorted(MODELS.glob("*.erlm"))},
    }


def write() -> None:
    MANIFEST.write_text(json.dumps(build(), indent=2) + "\n")
