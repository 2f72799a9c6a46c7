"""A ledger whose write hangs is failing, and what it holds meanwhile stays bounded.

A database that stops answering raises nothing: the write just waits. Past `Ledger.stall_s`
the ledger counts as failing as if the write had raised (`/readyz` and `on_unavailable` read
`failing_since`), and past `MAX_HELD` waiting records the oldest are logged (every column, so
their spend can be entered again) instead of held in memory, counted in `spilled`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from edgeroute.cost import ledger as ledger_module
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import Batch, Reader
from edgeroute.cost.writer_breath import never
from tests.test_cost_ledger import _FlakyBackend, _ids, _record


class _HangingBackend(_FlakyBackend):
    """A SQLite backend whose writes wait while `passing` is clear, as on a silent database."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.passing = threading.Event()
        self.passing.set()

    def write(self, batch: Batch, rest: Callable[[], None] = never) -> None:
        self.passing.wait()
        self.inner.write(batch, rest)

    def snapshot(self, within: float | None = None) -> AbstractContextManager[Reader]:
        return self.inner.snapshot(within)


def _until(what: str, probe: Callable[[], object], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not probe():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_hung_write_is_failing_and_the_held_records_stay_under_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ledger_module, "STALL_FLOOR_S", 0.3)
    monkeypatch.setattr(ledger_module, "MAX_HELD", 50)
    backend = _HangingBackend(tmp_path / "h.db")
    ledger = Ledger(backend, flush_interval=0.05, on_unavailable="open")
    assert ledger.stall_s == 0.3
    try:
        ledger.record(_record(0))
        _until("the first record written", lambda: ledger.written == 1)
        assert ledger.failing_since is None and ledger.failing_why() is None

        backend.passing.clear()
        ledger.record(_record(1))
        hung = time.monotonic()
        _until("failing once the write has hung past the bound", lambda: ledger.failing_since is not None)
        assert time.monotonic() - hung >= 0.3 - 0.1  # not before the bound (less a flush's wait)
        assert "has not completed" in (ledger.failing_why() or "")
        with caplog.at_level(logging.ERROR, logger="edgeroute.ledger"):
            for i in range(2, 102):
                ledger.record(_record(i))
            _until("the oldest waiting records logged instead", lambda: ledger.spilled == 101 - 50)
            _until("the stall logged", lambda: "served on (ledger.on_unavailable: open)" in caplog.text)
        assert ledger.queue_depth() == 50
        assert caplog.text.count("ledger: not held") == 51 and "'request_id': 'req-2'" in caplog.text

        backend.passing.set()  # answering again: the held records are written, the ledger is well
        _until("every held record written", lambda: ledger.written == 1 + 50)
        _until("writing again", lambda: ledger.failing_since is None)
    finally:
        backend.passing.set()
        ledger.close()
    spilled = {f"req-{i}" for i in range(2, 53)}
    assert _ids(tmp_path / "h.db") == {f"req-{i}" for i in range(102)} - spilled
