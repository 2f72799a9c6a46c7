"""The fourth fresh task set's protocol (``edgeroute.learn.fresh_eval_v4``) on small wheels of the
sources' layout: the labels, what a prompt is, sampling per problem and per language, and the
minimum per class. The real wheels are fetched only by the eval itself."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from edgeroute.learn import fresh_eval, fresh_eval_v4
from edgeroute.learn.model import TASK_CLASSES


def _wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in files.items():
            z.writestr(name, raw)
    return path


def _step(desc: str, header: str = "def f(x):", ret: str = "    return y") -> dict[str, object]:
    return {"step_number": "1.1", "step_description_prompt": desc, "function_header": header, "return_line": ret}


def _problem(pid: str, steps: list[dict[str, object]]) -> str:
    return json.dumps({"problem_id": pid, "problem_description_main": "not a prompt here", "sub_steps": steps})


def test_the_label_rules_name_our_classes() -> None:
    r = fresh_eval_v4.rules()
    assert r["benchmarks"] == {"scicode": "code", "mmath": "math"}
    assert set(r["benchmarks"].values()) <= set(TASK_CLASSES)
    assert len(r["mmath_languages"]) == 10


def test_a_scicode_prompt_is_the_step_and_the_function_to_complete() -> None:
    step = _step("Compute the Fermi energy.", "def fermi(n):", "    return e_f")
    assert fresh_eval_v4.step_prompt(step) == "Compute the Fermi energy.\n\ndef fermi(n):\n    return e_f"
    assert fresh_eval_v4.step_prompt(_step("Only words.", "", "")) == "Only words."
    assert fresh_eval_v4.step_prompt(_step("  ")) is None
    assert fresh_eval_v4.step_prompt({"function_header": "def f():"}) is None
    assert fresh_eval_v4.step_prompt("not a step") is None


def test_the_set_is_sampled_per_problem_and_per_language(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fresh_eval_v4, "MIN_PER_CLASS", 3)
    monkeypatch.setattr(fresh_eval_v4, "PER_CLASS", 4)
    problems = [_problem(str(p), [_step(f"Step {s} of problem {p}.") for s in range(5)]) for p in range(3)]
    problems.append(_problem("9", [_step("a training text", "", "")]))
    sci = _wheel(
        tmp_path / "sci.whl",
        {
            fresh_eval_v4.SCICODE_FILES[0]: "\n".join(problems[:2]) + "\nnot json\n",
            fresh_eval_v4.SCICODE_FILES[1]: "\n".join(problems[2:]),
        },
    )
    rows = {
        lang: json.dumps(
            [{"question": f"{lang}: solve x + {g} = 0.", "gid": g} for g in range(4)]
            + [{"question": "x" * (fresh_eval_v4.MAX_CHARS + 1), "gid": 99}, {"gid": 5}]
        )
        for lang in ("en", "zh")
    }
    mm = _wheel(tmp_path / "mm.whl", {fresh_eval_v4.MMATH_DIR + f"{k}.json": v for k, v in rows.items()})
    r = {"benchmarks": {"scicode": "code", "mmath": "math"}, "mmath_languages": ["en", "zh", "xx"]}
    test = fresh_eval_v4.build_test_set({"scicode": sci, "mmath": mm}, r, training={"a training text"})
    assert fresh_eval_v4.build_test_set({"scicode": sci, "mmath": mm}, r, training={"a training text"}) == test
    code = [e for e in test if e.label == "code"]
    math = [e for e in test if e.label == "math"]
    # PER_CLASS caps each class; the first rank of every problem comes before any second rank
    assert len(code) == 4 and len(math) == 4
    assert {e.source for e in code[:3]} == {"scicode/0", "scicode/1", "scicode/2"}
    assert all(e.text.endswith("def f(x):\n    return y") for e in code)
    # ceil(4 / 3 languages) = 2 per language, the missing language gives none
    assert sorted(e.source for e in math) == ["mmath/en", "mmath/en", "mmath/zh", "mmath/zh"]
    texts = [e.text for e in test]
    assert "a training text" not in texts and len(texts) == len(set(texts))
    assert all(len(t) <= fresh_eval_v4.MAX_CHARS for t in texts)
    # a class under the minimum is left out whole
    monkeypatch.setattr(fresh_eval_v4, "MIN_PER_CLASS", 5)
    assert fresh_eval_v4.build_test_set({"scicode": sci, "mmath": mm}, r, training=set()) == []


def test_a_tampered_wheel_is_refused(tmp_path: Path) -> None:
    (tmp_path / fresh_eval_v4.WHEELS["scicode"][1]).write_bytes(b"not the wheel")
    with pytest.raises(fresh_eval.Unavailable, match="sha256"):
        fresh_eval_v4.fetch(tmp_path)
