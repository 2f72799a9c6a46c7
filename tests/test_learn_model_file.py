"""A router file is replaced whole: a proxy reloading it while `router train` writes it, or a
crash mid-write, finds the old model or the new one, never a part of one."""

from __future__ import annotations

import threading
from pathlib import Path

from edgeroute.learn.features import FeaturizerConfig
from edgeroute.learn.model import LinearModel


def _model(weight: int) -> LinearModel:
    cfg = FeaturizerConfig()
    return LinearModel(
        featurizer=cfg,
        outputs=["strong", "weak"],
        activation="sigmoid",
        dense=["length"],
        scale=1e-4,
        hashed=[weight] * ((1 << cfg.log2_buckets) * 2),
        dense_weights=[0.0] * 4,
        bias=[0.0, 0.0],
    )


def test_a_reader_never_sees_a_partly_written_model(tmp_path: Path) -> None:
    path = tmp_path / "router.erlm"
    models = [_model(1), _model(2)]
    models[0].save(path)
    done = threading.Event()
    seen: list[str] = []

    def read() -> None:
        while not done.is_set():
            try:
                seen.append(str(LinearModel.from_bytes(path.read_bytes()).hashed[0]))
            except Exception as e:  # any failure to read is what this test looks for
                seen.append(type(e).__name__)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(60):
            models[i % 2].save(path)
    finally:
        done.set()
        reader.join()
    assert seen and set(seen) <= {"1", "2"}, sorted(set(seen))
    assert [p.name for p in tmp_path.iterdir()] == ["router.erlm"]  # no temporary file left behind
