"""The spend ledger: SQLite (default) and PostgreSQL, batching, shutdown and hard-kill bounds, throughput."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edgeroute.accounting import AttemptRecord, RequestRecord, Usage
from edgeroute.config import Price
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import Batch, PostgresBackend, SqliteBackend, _many_rows, rejects_row
from edgeroute.cost.writer_breath import Breather, never
from edgeroute.requestlog.settings import RequestLog
from tests.perf import Perf
from tests.serve_support import free_port
from tests.test_cost_support import one_deployment, require_postgres


def _record(i: int, key: str = "k") -> RequestRecord:
    usage = Usage(100 + i % 7, 20, 0)
    return RequestRecord(
        request_id=f"req-{i}",
        started=time.time(),
        model="m",
        route="m",
        key=key,
        team="t",
        user="u",
        status=200,
        outcome="ok",
        latency_ms=12.5,
        deployment="d-a",
        usage=usage,
        cost_usd=0.001,
        attempts=[AttemptRecord("d-a", "a", "success", 200, 12.0, usage=usage, cost_usd=0.001)],
    )


def _count(db: Path, sql: str = "SELECT COUNT(*) FROM spend") -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def test_sqlite_ledger_batches_and_close_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    ledger = Ledger(
        SqliteBackend(db), flush_interval=0.05, baseline={"m": Price(input_per_mtok=10, output_per_mtok=30)}
    )
    for i in range(1000):
        ledger.record(_record(i))
    ledger.close()
    assert _count(db) == 1000 and _count(db, "SELECT COUNT(*) FROM spend_attempts") == 1000
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    base = conn.execute("SELECT baseline_cost_usd FROM spend WHERE request_id = 'req-0'").fetchone()[0]
    assert base == pytest.approx((100 * 10 + 20 * 30) / 1e6)


def test_absent_values_are_stored_as_null(tmp_path: Path) -> None:
    """A record's absent values (a keyless cache hit: no key, team, user, rule, attempts) are
    NULL in the spend and request-log rows, as the reports and the stats filter them, and its
    present ones keep their types."""
    db = tmp_path / "l.db"
    ledger = Ledger(SqliteBackend(db), flush_interval=3600, request_log=RequestLog())
    hit = RequestRecord(
        request_id="req-hit", started=time.time(), model="m", route="m", status=200, outcome="cache_hit",
        latency_ms=0.4, deployment="d-a", cache="hit", saved_usd=0.002,
    )  # fmt: skip
    ledger.record(hit)
    ledger.close()
    conn = sqlite3.connect(db)
    spend = dict(zip(("key_id", "team", "user_id", "rule", "admission", "deployment", "cost_usd"), conn.execute(
        "SELECT typeof(key_id), typeof(team), typeof(user_id), typeof(rule), typeof(admission), typeof(deployment),"
        " typeof(cost_usd) FROM spend WHERE request_id = 'req-hit'").fetchone(), strict=True))  # fmt: skip
    assert spend == {"key_id": "null", "team": "null", "user_id": "null", "rule": "null", "admission": "null",
                     "deployment": "text", "cost_usd": "real"}  # fmt: skip
    logged = conn.execute(
        "SELECT typeof(correlation_id), typeof(key_id), typeof(policy), typeof(difficulty), typeof(provider),"
        " typeof(error_class), typeof(ttft_ms), typeof(content), typeof(cache) FROM requests WHERE id = 'req-hit'"
    ).fetchone()
    assert logged == ("null",) * 8 + ("text",)


def _mixed(i: int, started: float) -> RequestRecord:
    """Keyless requests (no key, team, user, rule), with a keyed one every third, some of them
    with a rule; from the hundredth, one in seven with a task and one in four with a TTFT."""
    rec = _record(i, key=f"k{i % 2}")
    rec.started = started + i / 1000
    if i % 3:
        rec.key = rec.team = rec.user = None
    rec.rule = "r" if i % 15 == 0 else None
    if i >= 100:
        rec.task = "t" if i % 7 == 0 else None
        rec.ttft_ms = 5.0 if i % 4 == 0 else None
    return rec


def test_nulls_common_to_rows_are_written_into_the_statement_and_stored_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPython's sqlite3 binds a None through its adapter registry (~1,200 instructions each; a
    keyless request's spend and request-log rows hold eighteen): a column NULL in every row of a
    statement is written as NULL into it instead. The rows stored are those binding every value
    stores, for keyless batches and batches that mix keyed and keyless requests."""
    started = time.time()
    dbs = []
    adapted: list[int] = []
    for literals in (True, False):
        db = tmp_path / f"nulls-{literals}.db"
        backend = SqliteBackend(db)
        if not literals:  # the same rows, every value bound, a statement a row
            backend._sql = dataclasses.replace(backend._sql, many=0)
        ledger = Ledger(backend, flush_interval=3600, request_log=RequestLog())
        bound: list[None] = []
        monkeypatch.setitem(sqlite3.adapters, (type(None), sqlite3.PrepareProtocol), bound.append)
        for i in range(1, 67, 3):  # keyless: 22 records, in pieces of 16, 4 and 2 rows
            rec = _mixed(i, started)
            rec.request_id += "-keyless"  # a request is recorded once (`spend_once`)
            ledger.record(rec)
        assert ledger.flush() == 22
        adapted.append(len(bound))
        for i in range(100):
            ledger.record(_mixed(i, started))
        assert ledger.flush() == 100
        n = 100
        for size in range(1, 20):  # pieces of every size, with more sets of NULL columns than are kept
            for i in range(n, n + size):
                ledger.record(_mixed(i, started))
            assert ledger.flush() == size
            n += size
        ledger.close()
        dbs.append(db)
    assert adapted == [0, 22 * 18]  # no None bound for the keyless batch; 18 a record when bound
    spend = "SELECT * FROM spend ORDER BY id"
    requests = "SELECT * FROM requests ORDER BY ts"
    rollups = "SELECT * FROM request_rollups ORDER BY dim, res, minute, value"
    for sql in (spend, requests, rollups):
        with_literals, bound_all = (_rows_of(db, sql) for db in dbs)
        if sql == spend:  # the writers' row ids differ
            with_literals, bound_all = ([r[:-1] for r in rows] for rows in (with_literals, bound_all))
        assert with_literals == bound_all and len(with_literals) >= 100
    nulls = _rows_of(dbs[0], "SELECT COUNT(*) FROM spend WHERE key_id IS NULL AND team IS NULL AND user_id IS NULL")
    assert nulls == [((int, 22 + sum(1 for i in range(n) if i % 3)),)]


def _rows_of(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """The rows `sql` reads, each value with its SQLite type."""
    conn = sqlite3.connect(db)
    try:
        return [tuple((type(v), v) for v in r) for r in conn.execute(sql)]
    finally:
        conn.close()


def _throughput(ledger: Ledger, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        ledger.record(_record(i))
    ledger.close()
    return n / (time.perf_counter() - t0)


@pytest.mark.perf
def test_sqlite_throughput(tmp_path: Path, perf: Perf) -> None:
    n = 50_000
    rate = _throughput(Ledger(SqliteBackend(tmp_path / "t.db"), flush_interval=0.2), n)
    assert _count(tmp_path / "t.db") == n
    perf.report("ledger sqlite, records with 1 attempt each, batched", rate, "records/s", "> 5000")
    # The hot path is an append.
    ledger = Ledger(SqliteBackend(tmp_path / "h.db"), flush_interval=1.0)
    rec = _record(0)
    t0 = time.perf_counter()
    for _ in range(100_000):
        ledger.record(rec)
    per = (time.perf_counter() - t0) / 100_000 * 1e9
    ledger.close()
    perf.report("ledger record() on the request path", per, "ns", "< 5000")


def _pg_reset(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        for table in (
            "spend",
            "spend_attempts",
            "requests",
            "request_rollups",
            "request_rollup_levels",
            "ledger_batches",
            "reservations",
            "feedback",
            "router_shadow",
        ):
            c.execute(f"DROP TABLE IF EXISTS {table}")


def test_postgres_same_schema_and_throughput(pg_schema_dsn: str) -> None:
    dsn = pg_schema_dsn
    import psycopg

    ledger = Ledger(PostgresBackend(dsn), flush_interval=0.05)
    for i in range(100):
        ledger.record(_record(i, key="pg"))
    ledger.close()
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT COUNT(*), SUM(cost_usd) FROM spend").fetchone() == (100, pytest.approx(0.1))
        cols = [r[0] for r in c.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'spend' ORDER BY ordinal_position"
        )]  # fmt: skip
    conn = sqlite3.connect(":memory:")
    from edgeroute.cost.ledger_store import schema

    for stmt in schema("sqlite"):
        conn.execute(stmt)
    assert cols == [r[1] for r in conn.execute("PRAGMA table_info(spend)")]
    _pg_reset(dsn)
    n = 20_000
    rate = _throughput(Ledger(PostgresBackend(dsn), flush_interval=0.2), n)
    print(f"\nledger postgres: {n} records (with 1 attempt each) in batches: {rate:,.0f} records/s")
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT COUNT(*) FROM spend").fetchone()[0] == n


# -- a row the store rejects, a store that is down ---------------------------------------------


def _poison(rid: str, tokens: int = 10**20) -> RequestRecord:
    """A record whose usage (say, an upstream's token count above 2**63) the store rejects."""
    return RequestRecord(rid, time.time(), "m", route="m", key="k-poison", cost_usd=0.5, usage=Usage(tokens, 5))


def _set_aside_logged(caplog: pytest.LogCaptureFixture, rid: str) -> str:
    [line] = [r.getMessage() for r in caplog.records if "set aside request " + rid + "," in r.getMessage()]
    return line


def test_sqlite_poison_row_is_set_aside_and_the_good_rows_are_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "p.db"
    ledger = Ledger(SqliteBackend(db), flush_interval=60)  # only the explicit flushes and close() write
    ledger.record(_record(0))
    ledger.record(_poison("poison"))
    unconvertible = _record(1)
    unconvertible.request_id, unconvertible.started = "no-date", float("nan")
    ledger.record(unconvertible)
    for i in range(2, 25):
        ledger.record(_record(i))
    assert ledger.flush() == 24  # one batch: the poison row does not hold the others back
    for i in range(25, 50):
        ledger.record(_record(i))
    assert ledger.flush() == 25  # ... nor the next batch
    ledger.record(_poison("poison-2"))
    ledger.record(_record(50))
    ledger.close()
    assert _ids(db) == {f"req-{i}" for i in range(51) if i != 1}
    assert _count(db, "SELECT COUNT(*) FROM spend_attempts") == 50
    assert (ledger.written, ledger.set_aside, ledger.failed_batches, ledger.lost_at_close) == (50, 3, 0, 0)
    line = _set_aside_logged(caplog, "poison")
    assert "OverflowError" in line and "'prompt_tokens': 100000000000000000000" in line
    assert "'cost_usd': 0.5" in line and "'key_id': 'k-poison'" in line
    assert "'started': nan" in _set_aside_logged(caplog, "no-date")
    assert _set_aside_logged(caplog, "poison-2")


def test_sqlite_rows_go_many_to_a_statement_and_a_poison_row_among_them_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each executed INSERT lets go of the GIL around its step, and the event loop, which wants it
    back after every system call, waited for it: a statement a row was a GIL handoff (futex,
    context switches) per row on a host where the writer runs on another core. A batch's rows
    go many to a statement; a rejected row among them still costs only itself."""
    db = tmp_path / "many.db"
    backend = SqliteBackend(db)
    inserts: list[str] = []
    backend._conn.set_trace_callback(lambda sql: inserts.append(sql) if sql.startswith("INSERT") else None)
    ledger = Ledger(backend, flush_interval=60, request_log=RequestLog())
    for i in range(100):
        ledger.record(_record(i, key=f"k{i % 3}"))
    assert ledger.flush() == 100
    # spend, attempts, requests: 32 + 32 + 32 + 4 rows, 4 statements each; the 19 rollups: 16 + 2 + 1
    assert len(inserts) <= 17, collections.Counter(x[:30] for x in inserts)
    backend._conn.set_trace_callback(None)
    for i in range(100, 170):
        ledger.record(_poison("poison-many") if i == 140 else _record(i))
    assert ledger.flush() == 69
    ledger.close()
    assert _ids(db) == {f"req-{i}" for i in range(170) if i != 140}
    assert _count(db, "SELECT COUNT(*) FROM spend_attempts") == 169
    assert _count(db, "SELECT COUNT(*) FROM requests") == 169
    assert _count(db, "SELECT SUM(requests) FROM request_rollups WHERE dim = 'none' AND res = 1") == 169
    assert (ledger.written, ledger.set_aside, ledger.failed_batches) == (169, 1, 0)
    assert "OverflowError" in _set_aside_logged(caplog, "poison-many")


def test_sqlite_batches_of_every_size_keep_few_statements_prepared(tmp_path: Path) -> None:
    """A statement for each number of rows up to 32 kept 155 prepared statements (19 MB a
    worker); batches of any size use pieces of 32, 16, 8, 4, 2 rows and single rows."""
    _many_rows.cache_clear()  # the process's: earlier tests' ledgers (other tables, columns) filled it
    ledger = Ledger(SqliteBackend(tmp_path / "sizes.db"), flush_interval=60, request_log=RequestLog())
    n = 0
    for size in range(1, 70):
        for _ in range(size):
            ledger.record(_record(n, key=f"k{n % 40}"))
            n += 1
        assert ledger.flush() == size
    ledger.close()
    assert _count(tmp_path / "sizes.db", "SELECT COUNT(*) FROM requests") == n
    assert _many_rows.cache_info().currsize <= 5 * 4  # five tables, four sizes over one row


class _FlakyBackend:
    """A SQLite backend that can be taken down: while `down`, every write fails as a locked store does."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.inner = SqliteBackend(path)
        self.down = False
        self.failures = 0

    def write(self, batch: Batch, rest: Callable[[], None] = never) -> None:
        if self.down:
            self.failures += 1
            raise sqlite3.OperationalError("database is locked")
        self.inner.write(batch, rest)

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> int:
        return self.inner.execute(sql, params)

    def scalar(self, sql: str) -> int:
        return self.inner.scalar(sql)

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self.inner.query(sql, params)

    def close(self) -> None:
        self.inner.close()


def test_store_outage_keeps_everything_until_the_store_is_back(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    backend = _FlakyBackend(db)
    ledger = Ledger(backend, flush_interval=0.02, close_timeout=10)
    backend.down = True
    for i in range(100):
        ledger.record(_record(i))
    ledger.record(_poison("poison"))
    deadline = time.monotonic() + 5
    while backend.failures < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ledger.failed_batches >= 3 and ledger.set_aside == 0  # an outage sets nothing aside
    backend.down = False
    deadline = time.monotonic() + 5
    while ledger.written < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ledger.written == 100 and ledger.set_aside == 1
    # Down again at shutdown, back while close() retries: still nothing lost.
    backend.down = True
    for i in range(100, 200):
        ledger.record(_record(i))
    failures = backend.failures
    threading.Timer(0.3, setattr, (backend, "down", False)).start()
    ledger.close()
    assert backend.failures > failures
    assert _ids(db) == {f"req-{i}" for i in range(200)}
    assert (ledger.written, ledger.set_aside, ledger.lost_at_close) == (200, 1, 0)


def test_the_writer_keeps_the_sqlite_wal_short(tmp_path: Path) -> None:
    """The writer checkpoints after each batch (SQLite's own checkpoint, inside a commit, is
    off): the WAL stays about a batch long (1.6 MB here; 13 MB without the checkpoints)."""
    db = tmp_path / "w.db"
    ledger = Ledger(SqliteBackend(db), flush_interval=0.05, request_log=RequestLog())
    peak = 0
    for k in range(10):
        for i in range(1000):
            ledger.record(_record(k * 1000 + i, key=f"k{i % 50}"))
        deadline = time.monotonic() + 20
        while ledger.written < (k + 1) * 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        peak = max(peak, os.path.getsize(f"{db}-wal"))
    ledger.close()
    assert ledger.written == 10_000 and _count(db) == 10_000
    assert peak < 6_000_000


def test_the_writer_rests_between_slices_of_its_work_and_nobody_else_does() -> None:
    """The writer thread sleeps as long as it worked, slice by slice, up to a quarter of the
    flush interval per batch; a flush from another thread (shutdown, a read-back) never waits."""

    def work(breather: Breather, cpu_s: float) -> None:
        end = time.thread_time() + cpu_s
        while time.thread_time() < end:
            breather.rest()

    writer = Breather(flush_interval=0.5)
    t = threading.Thread(target=lambda: (writer.begin(), work(writer, 0.01)))
    t0 = time.monotonic()
    t.start()
    t.join()
    assert 0.01 - 2 * writer.slice_s <= writer.rested_s <= 0.01 + writer.slice_s
    assert time.monotonic() - t0 >= 0.01 + writer.rested_s - 2 * writer.slice_s  # it slept, too

    capped = Breather(flush_interval=0.02)  # may rest 5 ms a batch
    t = threading.Thread(target=lambda: (capped.begin(), work(capped, 0.02)))
    t.start()
    t.join()
    assert capped.rested_s == pytest.approx(0.005)

    rested = writer.rested_s
    work(writer, 0.01)  # this thread is not the writer: not one rest
    assert writer.rested_s == rested


def test_store_down_through_close_logs_every_record_it_loses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = _FlakyBackend(tmp_path / "d.db")
    backend.down = True
    ledger = Ledger(backend, flush_interval=60, close_timeout=0.2)
    for i in range(3):
        ledger.record(_record(i))
    t0 = time.monotonic()
    ledger.close()
    assert time.monotonic() - t0 < 5
    assert (ledger.written, ledger.set_aside, ledger.lost_at_close) == (0, 0, 3)
    lost = [r.getMessage() for r in caplog.records if "not written at shutdown" in r.getMessage()]
    assert len(lost) == 3 and all(f"'request_id': 'req-{i}'" in m for i, m in enumerate(lost))
    assert "'cost_usd': 0.001" in lost[0]


def test_rejects_row_tells_rejected_data_from_an_unavailable_store() -> None:
    assert rejects_row(OverflowError("Python int too large to convert to SQLite INTEGER"))
    assert rejects_row(sqlite3.IntegrityError("NOT NULL constraint failed: spend.model"))
    assert not rejects_row(sqlite3.OperationalError("database is locked"))
    assert not rejects_row(ConnectionRefusedError())
    assert not rejects_row(RuntimeError("something we cannot classify"))


def test_postgres_poison_row_and_a_dropped_connection(pg_schema_dsn: str) -> None:
    dsn = pg_schema_dsn
    import psycopg

    backend = PostgresBackend(dsn)
    ledger = Ledger(backend, flush_interval=60, close_timeout=10)
    ledger.record(_record(0, key="pg"))
    ledger.record(_poison("poison"))  # above PostgreSQL's BIGINT
    ledger.record(_record(1, key="pg"))
    assert ledger.flush() == 2 and ledger.set_aside == 1
    # The server drops the ledger's connection: the batch is kept, and written once reconnected.
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(%s)", (backend._conn.info.backend_pid,))
    for i in range(2, 10):
        ledger.record(_record(i, key="pg"))
    assert ledger.flush() == 0 and ledger.failed_batches == 1 and ledger.set_aside == 1
    ledger.close()
    with psycopg.connect(dsn) as c:
        ids = {r[0] for r in c.execute("SELECT request_id FROM spend")}
        assert ids == {f"req-{i}" for i in range(10)}
        assert c.execute("SELECT COUNT(*) FROM spend_attempts").fetchone()[0] == 10
    assert (ledger.written, ledger.set_aside, ledger.lost_at_close) == (10, 1, 0)


# -- a real `edgeroute serve` process -------------------------------------------------------


def _serve(tmp_path: Path, upstream_url: str, flush: float) -> tuple[subprocess.Popen[str], str, Path]:
    db = tmp_path / "spend.db"
    port = free_port()
    cfg = one_deployment(upstream_url, ledger={"path": str(db), "flush_interval": flush})
    cfg_path = tmp_path / "edge.yaml"
    cfg_path.write_bytes(orjson.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "serve", "--config", str(cfg_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening" in line, line
    return proc, f"http://127.0.0.1:{port}", db


async def _drive(url: str, seconds: float) -> list[tuple[str, float]]:
    """Sequential requests for `seconds`; (request id, when its answer arrived)."""
    done: list[tuple[str, float]] = []
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.read()
            done.append((r.headers["x-request-id"], time.monotonic()))
    return done


def _ids(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT request_id FROM spend")}
    finally:
        conn.close()


async def test_sigkill_loses_at_most_one_flush_interval(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    flush = 0.25
    proc, url, db = _serve(tmp_path, up.base_url, flush)
    try:
        done = await _drive(url, 2.0)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)  # the process this test started
        await asyncio.to_thread(proc.wait, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
    stored = _ids(db)
    # Every answer older than one interval (plus the time a batch takes to commit) is in the ledger.
    slack = 0.1
    old = [rid for rid, t in done if t < killed_at - flush - slack]
    missing_old = [rid for rid in old if rid not in stored]
    lost = [rid for rid, _ in done if rid not in stored]
    per_interval = len(done) / 2.0 * (flush + slack)
    print(f"\nSIGKILL after {len(done)} requests: {len(lost)} lost (bound: the last {flush}s, ~{per_interval:.0f})")
    assert len(done) > 50
    assert not missing_old
    assert stored <= {rid for rid, _ in done}
    # The request log is written in the same transactions: the same requests, no more, no fewer.
    conn = sqlite3.connect(db)
    logged = {r[0] for r in conn.execute("SELECT id FROM requests")}
    conn.close()
    assert logged == stored


async def test_sigterm_drains_and_loses_nothing(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    proc, url, db = _serve(tmp_path, up.base_url, 1.0)
    try:
        done = await _drive(url, 0.5)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _ids(db) == {rid for rid, _ in done}


async def test_a_server_starts_on_postgres_while_a_backup_reads_the_ledger(start_upstream: Any, tmp_path: Path) -> None:
    """A server starting (or restarting) while another session reads the spend table (pg_dump, a
    report) waited for that reader to end: its start-up ran ALTER TABLE ... ADD COLUMN IF NOT
    EXISTS, which takes PostgreSQL's strongest lock even when the column is there, and every
    other instance's ledger writes and reads queued behind it. Now it alters only what lacks it."""
    import uuid

    import openai
    import psycopg
    import yaml

    from tests.conftest import simple_config
    from tests.governance_support import Instance

    dsn = require_postgres()
    schema = f"dump_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    target = f"{dsn}?options=-csearch_path%3D{schema}"
    PostgresBackend(target).close()  # the tables, as an earlier server left them
    up = await start_upstream()
    path = tmp_path / "edgeroute.yaml"
    path.write_text(yaml.safe_dump(simple_config({"a": up}, ledger={"backend": "postgres", "dsn": target})))
    backup = psycopg.connect(target)  # pg_dump's way: one transaction holds every table it read
    server = None
    try:
        backup.execute("SELECT count(*) FROM spend").fetchone()
        server = Instance(path, tmp_path / "edgeroute.log")
        await asyncio.to_thread(server.wait_ready, 15.0)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])

        def written() -> int:
            with psycopg.connect(target, autocommit=True) as c:
                return int(c.execute("SELECT count(*) FROM spend").fetchone()[0])

        for _ in range(100):  # the ledger flushes in the background
            if await asyncio.to_thread(written) == 1:
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(written) == 1  # written while the backup still reads
    finally:
        backup.close()
        if server is not None:
            server.stop()
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")


def test_records_held_for_their_fate_still_count_as_unwritten(tmp_path: Path) -> None:
    """Records taken back from the queue while this instance's shared-state run was in doubt
    (`liveness`) are still this process's spend: a refill of an emptied Redis reads them from
    `unwritten` (it missed them, and the shared budget counted 14 of 20 answers), `/readyz`
    counts them, and once decided each is written or dropped, once."""
    db = tmp_path / "l.db"
    ledger = Ledger(SqliteBackend(db), flush_interval=3600)
    try:
        for i in range(3):
            ledger.record(_record(i))
        late = _record(3)
        late.held_back = True  # settled while in doubt: never queued
        ledger.record(late)
        taken = ledger.withdraw(5)
        assert taken is not None and [r.request_id for r in taken] == ["req-0", "req-1", "req-2"]
        held = ledger.unwritten(5)
        assert held is not None and sorted(r.request_id for r in held[0]) == ["req-0", "req-1", "req-2", "req-3"]
        assert ledger.queue_depth() == 4
        ledger.release(taken[0], write=True)
        ledger.release(taken[1], write=False)  # recorded as crashed by another instance
        ledger.release(late, write=True)
        assert ledger.flush() == 2
        assert ledger.queue_depth() == 1  # req-2: still waiting for its fate
        ledger.release(taken[2], write=False)
        assert ledger.queue_depth() == 0
    finally:
        ledger.close()
    conn = sqlite3.connect(db)
    assert sorted(r[0] for r in conn.execute("SELECT request_id FROM spend")) == ["req-0", "req-3"]
