"""The fresh task test set's protocol (``edgeroute.learn.fresh_eval``) and wrapper augmentation.

The real source (BIG-bench from PyPI) is fetched only by the eval itself; these tests
build a small archive of the same layout, so they check the protocol, not the figure.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from edgeroute.learn import augment, fresh_eval
from edgeroute.learn.data import Example
from edgeroute.learn.model import TASK_CLASSES


def _archive(path: Path, tasks: dict[str, dict[str, object]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, task in tasks.items():
            raw = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_task_labels_are_our_classes_and_each_task_has_one() -> None:
    raw = json.loads(fresh_eval.TASK_CLASSES_FILE.read_text())
    tasks = [t for label, ts in raw.items() if not label.startswith("_") for t in ts]
    assert len(tasks) == len(set(tasks))
    assert {label for label in raw if not label.startswith("_")} <= set(TASK_CLASSES)
    assert fresh_eval.task_labels()["gem/xsum"] == "summarization"


def test_prompts_follow_bigbench_zero_shot_format_and_sampling_is_fixed(tmp_path: Path) -> None:
    many = [{"input": f"What is {i} plus {i}?", "target": str(2 * i)} for i in range(40)]
    mc = [{"input": "Which is a fruit?", "target_scores": {"apple": 1, "chair": 0}}]
    sub: dict[str, object] = {"task_prefix": "Summarize.\n", "examples": [{"input": "Long text " * 5, "target": "t"}]}
    tasks: dict[str, dict[str, object]] = {
        "arith": {"examples": many},
        "quiz": {"examples": [*mc, {"input": "x" * (fresh_eval.MAX_CHARS + 1), "target": "y"}]},
        "gem/xsum": sub,
        "gem/other_subtask": sub,  # not listed: left out
        "unlisted": {"examples": many},
    }
    sdist = _archive(tmp_path / "bb.tar.gz", tasks)
    labels = {"arith": "math", "quiz": "knowledge_qa", "gem/xsum": "summarization"}
    test = fresh_eval.build_test_set(sdist, labels)
    assert fresh_eval.build_test_set(sdist, labels) == test  # deterministic
    by_task: dict[str, list[Example]] = {}
    for e in test:
        by_task.setdefault(e.source, []).append(e)
    assert set(by_task) == {"arith", "quiz", "gem/xsum"}
    assert len(by_task["arith"]) == fresh_eval.PER_TASK  # capped per task
    assert [e.text for e in by_task["quiz"]] == ["Which is a fruit?\n  choice: apple\n  choice: chair\nA: "]
    assert by_task["gem/xsum"][0].text.startswith("Summarize.\nLong text")
    assert all(e.label == labels[e.source] for e in test)


def test_a_recorded_score_is_shown_not_recomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEROUTE_CACHE", str(tmp_path))
    cache = fresh_eval.cache_dir()
    cache.mkdir(parents=True)
    result = {
        "n": 2,
        "classes": {"math": 2},
        "focus": ["math"],
        "model": {
            "f1": {"math": 1.0},
            "macro_f1": 1.0,
            "macro_f1_focus": 1.0,
            "accuracy": 1.0,
            "mean_confidence": 0.9,
            "ece": 0.1,
        },
        "keyword": {"f1": {"math": 0.5}, "macro_f1": 0.5, "macro_f1_focus": 0.5, "accuracy": 0.5},
        "confusions": {},
    }
    model = tmp_path / "task.erlm"
    model.write_bytes(b"any model file")
    sha = hashlib.sha256(b"any model file").hexdigest()
    record = {"runs": {sha: {"scored_at": "2026-01-01T00:00:00Z", "model": str(model), "result": result}}}
    (cache / "fresh_eval_result.json").write_text(json.dumps(record))
    assert fresh_eval.main(["--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert "recorded at 2026-01-01T00:00:00Z" in out and "--again" in out


def test_a_tampered_download_is_refused(tmp_path: Path) -> None:
    (tmp_path / fresh_eval.SDIST).write_bytes(b"not the archive")
    with pytest.raises(fresh_eval.Unavailable, match="sha256"):
        fresh_eval.fetch(tmp_path)


def test_wrapped_copies_keep_the_class_and_code_instructions_make_code() -> None:
    examples = [Example(f"Compute {i} * {i + 7} + 13, showing each step.", "math", "gsm8k") for i in range(200)]
    examples += [Example(f"Write a poem about the number {i}.", "creative_writing", "seed") for i in range(200)]
    examples += [Example(f"hi there {i}", "chat", "seed") for i in range(50)]
    copies = augment.wrapped(examples)
    assert copies == augment.wrapped(examples)  # deterministic
    assert all(c.source == augment.WRAPPED for c in copies)
    assert not any("hi there" in c.text for c in copies)  # small talk is never framed
    poems = [c for c in copies if "poem" in c.text]
    assert poems and all(c.label == "creative_writing" for c in poems)
    as_code = [c for c in copies if c.label == "code"]
    assert as_code and all(
        any(c.text == w.format(x=e.text) for w in augment.CODE_INSTRUCTIONS for e in examples) for c in as_code
    )
    framed_math = [c for c in copies if c.label == "math"]
    assert framed_math and all(
        any(c.text == w.format(x=e.text) for w in augment.GENERIC_WRAPPERS for e in examples) for c in framed_math
    )
    assert not set(augment.DEV_WRAPPERS) & set(augment.GENERIC_WRAPPERS)


def test_wrapper_robustness_counts_changed_predictions() -> None:
    examples = [Example("solve 2+2", "math", "x"), Example("write a poem", "creative_writing", "x")]

    def fooled(texts: list[str]) -> list[str]:  # any framing makes it say "other"
        return ["math" if t == "solve 2+2" else "creative_writing" if t == "write a poem" else "other" for t in texts]

    r = augment.wrapper_robustness(fooled, examples)
    assert r == {"bare_accuracy": 1.0, "wrapped_accuracy": 0.0, "flip": 1.0}


def test_without_the_source_the_eval_skips_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEROUTE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip as without network: no index to fetch from
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    assert fresh_eval.main([]) == 3
    err = capsys.readouterr().err
    assert err.startswith("skipped: the fresh test set is unavailable (pip could not fetch")
    assert not (fresh_eval.cache_dir() / "fresh_eval_result.json").exists()
