"""A request has one spend row, whichever of two instances writes one first (`cost.spend_once`).

An instance paused (or cut off from Redis) while its request's row waited in a batch the store
had refused was taken over by another, which wrote the request's `crashed` row; the paused
one's batch, retried once it resumed, then wrote the real row too: the request counted twice in
the reports, the request log's stats, and a budget rebuilt from the ledger. Now the row
committed second is not written (logged and counted), with its attempts, request-log row and
rollups, on SQLite and PostgreSQL; a ledger that holds such pairs already keeps one row each.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeroute.accounting import AttemptRecord, RequestRecord, Usage
from edgeroute.cost import spend_once
from edgeroute.cost.control import crashed
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import Backend, Batch, PostgresBackend, SqliteBackend
from edgeroute.cost.writer_breath import never
from edgeroute.requestlog.settings import RequestLog
from tests.conftest import new_pg_schema_dsn
from tests.test_cost_support import require_postgres

RESERVED = 0.1


def _real(request_id: str, cost: float = 0.003) -> RequestRecord:
    usage = Usage(100, 20, 0)
    return RequestRecord(
        request_id=request_id, started=time.time(), model="m", route="m", key="k", status=200, outcome="ok",
        latency_ms=12.5, deployment="d-a", usage=usage, cost_usd=cost,
        attempts=[AttemptRecord("d-a", "a", "success", 200, 12.0, usage=usage, cost_usd=cost)],
    )  # fmt: skip


def _crashed(request_id: str) -> RequestRecord:
    """The row a survivor writes for a request of a run it took over (`liveness`), at its reservation."""
    rec = crashed._record(request_id, time.time())
    rec.route = rec.model = "m"
    rec.key = "k"
    rec.cost_usd = RESERVED
    return rec


class _Refusing:
    """A store that is unavailable for its first `n` writes (the batch is kept and retried)."""

    def __init__(self, inner: Backend, n: int) -> None:
        self.inner, self.n = inner, n

    def write(self, batch: Batch, rest: Callable[[], None] = never) -> None:
        if self.n > 0:
            self.n -= 1
            raise ConnectionError("the store does not answer")
        self.inner.write(batch, rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Backend]]:
    """Opens a store on one shared ledger (each call: another instance's connection)."""
    if request.param == "sqlite":
        yield lambda: SqliteBackend(tmp_path / "ledger.db")
    else:
        require_postgres()
        dsn = new_pg_schema_dsn()
        yield lambda: PostgresBackend(dsn)


def _rows(db: Backend, sql: str) -> list[tuple[Any, ...]]:
    return sorted(db.query(sql, []))


def _stats(db: Backend) -> tuple[int, float]:
    """Requests and cost in the request log's rollups (every request is pending or in level 1)."""
    n, cost = db.query("SELECT sum(requests), sum(cost_usd) FROM request_rollups WHERE dim = 'none' AND res <= 1", [])[
        0
    ]
    return int(n), float(cost)


def _ledger(db: Backend) -> Ledger:
    return Ledger(db, flush_interval=3600, request_log=RequestLog())


def test_a_row_kept_from_a_refused_batch_loses_to_a_crashed_row_written_meanwhile(
    open_store: Callable[[], Backend], caplog: pytest.LogCaptureFixture
) -> None:
    paused = _ledger(_Refusing(open_store(), 1))  # type: ignore[arg-type]
    survivor = _ledger(open_store())
    try:
        paused.record(_real("req-x"))
        paused.record(_real("req-y", 0.005))
        assert paused.flush() == 0 and paused.queue_depth() == 2  # refused: kept for the next flush
        survivor.record(_crashed("req-x"))  # took the paused instance's run over meanwhile
        assert survivor.flush() == 1
        with caplog.at_level(logging.WARNING, "edgeroute.ledger"):
            assert paused.flush() == 1  # resumed: its kept batch is written without req-x
        assert paused.already_recorded == 1 and paused.queue_depth() == 0
        db = survivor.backend
        assert _rows(db, "SELECT request_id, outcome, cost_usd FROM spend") == [
            ("req-x", "crashed", RESERVED), ("req-y", "ok", 0.005),
        ]  # fmt: skip
        assert _rows(db, "SELECT request_id FROM spend_attempts") == [("req-y",)]
        assert _rows(db, "SELECT id, outcome FROM requests") == [("req-x", "crashed"), ("req-y", "ok")]
        assert _stats(db) == (2, pytest.approx(RESERVED + 0.005))
        assert "request req-x has a spend row already" in caplog.text
    finally:
        paused.close()
        survivor.close()


def test_a_crashed_row_written_after_the_request_s_own_is_dropped(open_store: Callable[[], Backend]) -> None:
    mine, survivor = _ledger(open_store()), _ledger(open_store())
    try:
        mine.record(_real("req-x"))
        assert mine.flush() == 1
        survivor.record(_crashed("req-x"))
        survivor.record(_crashed("req-z"))
        assert survivor.flush() == 1 and survivor.already_recorded == 1
        db = mine.backend
        assert _rows(db, "SELECT request_id, outcome FROM spend") == [("req-x", "ok"), ("req-z", "crashed")]
        assert _stats(db) == (2, pytest.approx(0.003 + RESERVED))
        assert mine.written == 1 and mine.already_recorded == 0
    finally:
        mine.close()
        survivor.close()


def test_a_ledger_holding_a_request_twice_keeps_its_own_row_and_moves_the_crashed_one_aside(
    open_store: Callable[[], Backend], caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger an earlier release wrote a request's `crashed` row and its own row into."""
    first = _ledger(open_store())
    for rid in ("req-x", "req-y"):
        first.record(_real(rid))
    first.record(_crashed("req-z"))
    first.close()
    old = open_store()
    old.execute("DROP INDEX spend_request_once")  # as an earlier release left it
    old.execute(
        "INSERT INTO spend (request_id, ts, day, model, route, stream, status, outcome, prompt_tokens,"
        " completion_tokens, cached_tokens, usage_estimated, cost_usd, baseline_cost_usd, latency_ms, attempts,"
        f" row_id) SELECT request_id, ts, day, model, route, 0, 0, 'crashed', 0, 0, 0, 1, {RESERVED}, {RESERVED},"
        " 0, 0, row_id || '-c' FROM spend WHERE request_id IN ('req-x', 'req-z')"
    )
    old.close()
    with caplog.at_level(logging.WARNING, "edgeroute.ledger"):
        db = open_store()
    try:
        assert _rows(db, "SELECT request_id, outcome FROM spend") == [
            ("req-x", "ok"), ("req-y", "ok"), ("req-z", "crashed"),
        ]  # fmt: skip
        assert _rows(db, "SELECT request_id, outcome FROM spend_duplicates") == [
            ("req-x", "crashed"),
            ("req-z", "crashed"),
        ]
        assert "2 spend rows recorded a request a second time" in caplog.text
    finally:
        db.close()
    again = open_store()  # once: the next start finds the index
    again.close()


def test_the_unique_index_serves_a_reservation_s_lookup(tmp_path: Path) -> None:
    """The index by request id the restore and liveness queries read is the unique one now."""
    SqliteBackend(tmp_path / "l.db").close()
    conn = sqlite3.connect(tmp_path / "l.db")
    plan = " ".join(
        str(r[-1])
        for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT 1 FROM reservations r WHERE NOT EXISTS"
            " (SELECT 1 FROM spend s WHERE s.request_id = r.request_id)"
        )
    )
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "spend_request_once" in plan and "spend_request" not in names, (plan, names)


def test_a_refusal_that_names_none_of_the_batch_keeps_it_for_later(tmp_path: Path) -> None:
    """A store that says rows are recorded already but names none of the batch's (a bug, or a
    schema another release changed) is a failing write: the batch is kept and the ledger says
    it is failing, not a writer thread that loops on the same batch for ever."""

    class Confused(SqliteBackend):
        def write(self, batch: Batch, rest: Callable[[], None] = never) -> None:
            raise spend_once.AlreadyRecorded({"not-a-row-of-this-batch"})

    ledger = Ledger(Confused(str(tmp_path / "l.db")), flush_interval=3600)
    ledger.close_timeout = 0.1
    try:
        ledger.record(_real("req-confused"))
        assert ledger.flush() == 0
        assert ledger.failing_since is not None and ledger.queue_depth() == 1
    finally:
        ledger.close()
    assert ledger.lost_at_close == 1
