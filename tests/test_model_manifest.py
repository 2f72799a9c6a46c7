"""The shipped model files are the ones their manifest describes, built from the data in the
repository: a model or its training data cannot change without the manifest saying so
(`python -m edgeroute.learn.build_models` rewrites all three)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgeroute.core import BUILTIN_ROUTER, BUILTIN_TASK
from edgeroute.learn import data, manifest

RECORDED = json.loads(manifest.MANIFEST.read_text())


def test_every_model_file_is_recorded_with_its_hash() -> None:
    on_disk = {p.name for p in manifest.MODELS.glob("*.erlm")}
    assert on_disk == set(RECORDED["models"]) and {BUILTIN_TASK, BUILTIN_ROUTER} <= on_disk
    for name, entry in RECORDED["models"].items():
        assert manifest.describe(manifest.MODELS / name) == entry, f"{name} differs from its manifest entry"


def test_the_labels_in_the_repository_are_the_ones_the_models_were_trained_on() -> None:
    labels = {k: v for k, v in RECORDED["inputs"].items() if k.startswith("labels/")}
    assert labels == {f"labels/{n}": manifest.sha256(data.LABELS / n) for n in manifest.LABEL_FILES}
    assert RECORDED["data_version"] == manifest.data_version(RECORDED["inputs"])
    assert RECORDED["command"] == "python -m edgeroute.learn.build_models"


def test_the_public_data_sets_are_the_recorded_versions() -> None:
    if not data.have_data():
        pytest.skip(f"no data sets at {data.data_root()}")
    assert manifest.inputs() == RECORDED["inputs"]


def test_a_changed_model_file_is_caught(tmp_path: Path) -> None:
    changed = tmp_path / BUILTIN_TASK
    raw = bytearray((manifest.MODELS / BUILTIN_TASK).read_bytes())
    raw[-1] ^= 1
    changed.write_bytes(bytes(raw))
    assert manifest.describe(changed) != RECORDED["models"][BUILTIN_TASK]


def test_git_treats_model_files_as_binary() -> None:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        ["git", "check-attr", "binary", "diff", "--", f"edgeroute/models/{BUILTIN_TASK}"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "binary: set" in out and "diff: unset" in out
