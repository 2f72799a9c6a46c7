"""The third fresh task set's protocol (``edgeroute.learn.fresh_eval_v3``) on a small wheel of the
registry's layout: labels by folder, what a prompt is, sampling, and the minimum per class. The
real wheel is fetched only by the eval itself."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from edgeroute.learn import fresh_eval, fresh_eval_v3
from edgeroute.learn.model import TASK_CLASSES


def _rows(*rows: object) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def _wheel(tmp: Path, files: dict[str, bytes]) -> Path:
    path = tmp / fresh_eval_v3.WHEEL
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in files.items():
            z.writestr(fresh_eval_v3.DATA + name, raw)
    return path


def test_the_label_rules_name_our_classes_and_each_folder_once() -> None:
    raw = json.loads(fresh_eval_v3.RULES_FILE.read_text())
    folders = [f for fs in raw["folders"].values() for f in fs]
    assert len(folders) == len(set(folders))
    assert set(raw["folders"]) <= set(TASK_CLASSES)
    labels = fresh_eval_v3.folder_labels()
    assert labels["simple_math"] == "math" and labels["regex-match"] == "code"
    # sources we train or develop on are never listed
    assert not {"mmlu", "sql", "tracking-shuffled-objects"} & set(labels)


def test_a_prompt_is_the_user_text_the_core_classifies() -> None:
    chat = {
        "input": [
            {"role": "system", "content": "You are a grader."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ]
    }
    assert fresh_eval_v3.prompt_text(chat) == "What is 2+2?\nAnd 3+3?"
    assert fresh_eval_v3.prompt_text({"input": [{"role": "system", "content": "Solve x+1=2."}]}) == "Solve x+1=2."
    assert fresh_eval_v3.prompt_text({"input": "plain"}) == "plain"
    assert fresh_eval_v3.prompt_text({"input": [{"role": "user", "content": [{"type": "image_url"}]}]}) is None
    assert fresh_eval_v3.prompt_text({"input1": "x"}) is None
    assert fresh_eval_v3.prompt_text({"input": [{"role": "user", "content": "  "}]}) is None


def test_the_set_is_sampled_per_folder_and_thin_classes_are_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fresh_eval_v3, "MIN_PER_CLASS", 3)
    math = [{"input": [{"role": "user", "content": f"Compute {i} * {i}."}]} for i in range(30)]
    files = {
        "simple_math/samples.jsonl": _rows(*math, {"input": "x" * (fresh_eval_v3.MAX_CHARS + 1)}),
        "simple_math/labeled-samples.jsonl": _rows({"input": "graded answers are not prompts"}),
        "regex-match/samples.jsonl": _rows(
            {"input": "Match a date with a regex."}, {"input": "Compute 0 * 0."}, {"input": "a training text"}
        ),
        "crontab/samples.jsonl": _rows({"input": "Every monday at 5?"}, {"input": "Every minute?"}),
        "test_multiio/battles/rap.jsonl": _rows({"input": "Write a rap battle."}),
        "test_multiio/other.jsonl": _rows({"input": "not listed"}),
        "unlisted/samples.jsonl": _rows({"input": "What is 1+1?"}),
    }
    wheel = _wheel(tmp_path, files)
    labels = {
        "simple_math": "math",
        "regex-match": "code",
        "crontab": "code",
        "test_multiio/battles": "creative_writing",
    }
    test = fresh_eval_v3.build_test_set(wheel, labels, training={"a training text"})
    assert fresh_eval_v3.build_test_set(wheel, labels, training={"a training text"}) == test  # deterministic
    counts = fresh_eval_v3.class_counts(test)
    assert counts == {"math": fresh_eval_v3.PER_FOLDER, "code": 4}  # one rap: under the minimum, left out
    # a text in two folders counts once, under the first folder in name order
    assert [e.source for e in test if e.text == "Compute 0 * 0."] == ["evals/regex-match"]
    texts = [e.text for e in test]
    assert "a training text" not in texts and "graded answers are not prompts" not in texts
    assert all(len(t) <= fresh_eval_v3.MAX_CHARS for t in texts)
    assert len(texts) == len(set(texts))
    assert {e.source for e in test} == {"evals/simple_math", "evals/regex-match", "evals/crontab"}


def test_a_tampered_wheel_is_refused(tmp_path: Path) -> None:
    (tmp_path / fresh_eval_v3.WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(fresh_eval.Unavailable, match="sha256"):
        fresh_eval_v3.fetch(tmp_path)
