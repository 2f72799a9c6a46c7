"""Featurizer and model-file tests that need no data (numpy optional)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeroute.learn.features import (
    FeaturizerConfig,
    bucket_ids,
    bucket_ids_fast,
    fmix64,
    fnv1a64,
    normalize,
)
from edgeroute.learn.model import TASK_CLASSES, LinearModel

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "rust" / "edgeroute-core" / "tests" / "fixtures" / "classify_parity.json"
MODELS = REPO / "edgeroute" / "models"


def test_hash_reference_values() -> None:
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fmix64(0) == 0


def test_tokens_and_ngrams() -> None:
    cfg = FeaturizerConfig(char_ngrams=())
    assert len(bucket_ids("Hi, x", cfg)) == 5  # hi , x + 2 bigrams
    cfg4 = FeaturizerConfig(char_ngrams=(4,), head_bytes=16, tail_bytes=8)
    assert normalize("x" * 100, cfg4) == b"x" * 24
    assert len(bucket_ids("abcdef", cfg4)) == 1 + 3


def test_fast_path_is_identical() -> None:
    pytest.importorskip("numpy")
    cfg = FeaturizerConfig()
    for text in ["", "a", "Hello, World! ünïcödé 日本語", "x" * 5000 + "é" * 3000]:
        assert bucket_ids_fast(text, cfg) == bucket_ids(text, cfg)


def test_model_file_round_trip() -> None:
    cfg = FeaturizerConfig(log2_buckets=8, char_ngrams=())
    k = len(TASK_CLASSES)
    m = LinearModel(
        featurizer=cfg,
        outputs=list(TASK_CLASSES),
        activation="softmax",
        dense=["length"],
        scale=0.01,
        hashed=[(i * 7919) % 601 - 300 for i in range(256 * k)],
        dense_weights=[0.1 * i for i in range(2 * k)],
        bias=[0.0] * k,
    )
    m2 = LinearModel.from_bytes(m.to_bytes())
    assert m2.to_bytes() == m.to_bytes()
    p = m2.predict_proba("write some code")
    assert sum(p) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        LinearModel.from_bytes(b"XXXX" + m.to_bytes()[4:])


def test_shipped_models_match_parity_fixture() -> None:
    """The Python reference reproduces the fixture the Rust test replays."""
    task = LinearModel.load(MODELS / "task.erlm")
    router = LinearModel.load(MODELS / "router-gpt4-mixtral.erlm")
    for p in (MODELS / "task.erlm", MODELS / "router-gpt4-mixtral.erlm"):
        assert p.stat().st_size < 2 * 1024 * 1024
    cases = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]
    for case in cases:
        assert bucket_ids(case["text"], task.featurizer) == case["buckets"]
        probs = task.predict_proba(case["text"])
        assert probs == pytest.approx(case["task_probabilities"], abs=1e-12)
        scores = router.predict_proba(case["text"], probs)
        assert scores == pytest.approx(case["router_scores"], abs=1e-12)


def test_shipped_models_share_one_featurizer() -> None:
    """The core hashes a prompt once and sums task + router weights in one pass only if they share a featurizer."""
    task = LinearModel.load(MODELS / "task.erlm")
    router = LinearModel.load(MODELS / "router-gpt4-mixtral.erlm")
    assert task.featurizer == router.featurizer == FeaturizerConfig()
    assert len(task.outputs) + len(router.outputs) <= 12  # the core's 24-byte fused rows
    assert router.task_outputs == [] or router.task_outputs == task.outputs


def test_source_weights_balance_by_square_root() -> None:
    pytest.importorskip("numpy")
    from edgeroute.learn.router import source_weights

    w = source_weights(["a"] * 100 + ["b"] * 4)
    assert w.mean() == pytest.approx(1.0)
    assert w[-1] / w[0] == pytest.approx(5.0)  # sqrt(100 / 4)
