"""The request log's key and team indexes leave out requests without a key (or a team), and
`/admin/requests?key=` / `?team=` (and a team key's own view) still find their rows through
them; a database made by an earlier release has its full indexes replaced at start."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from edgeroute.cost import ledger_store
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import PostgresBackend, SqliteBackend
from edgeroute.requestlog import query
from edgeroute.requestlog.settings import RequestLog
from tests.test_requestlog import _synthetic


class _Plans:
    """A reader that answers each query and keeps its plan (SQLite's EXPLAIN QUERY PLAN)."""

    dialect = "sqlite"

    def __init__(self, db: SqliteBackend) -> None:
        self.db = db
        self.plans: list[str] = []

    def query(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        if sql.startswith("SELECT") and "FROM requests" in sql:
            self.plans.append(" | ".join(str(r[-1]) for r in self.db.query(f"EXPLAIN QUERY PLAN {sql}", params)))
        return self.db.query(sql, params)


def _filled(backend: SqliteBackend | PostgresBackend) -> float:
    """60 requests in the last hour: a third of them (i % 3 == 1) without a key or a team."""
    t0 = time.time() - 3600
    recs = _synthetic(60, t0, random.Random(7))
    for i, r in enumerate(recs):
        if i % 3 == 1:
            r.key = r.team = None
    ledger = Ledger(backend, flush_interval=60, request_log=RequestLog())
    for r in recs:
        ledger.record(r)
    ledger.close()
    return t0


def _ids(page: dict[str, Any]) -> set[str]:
    return {r["id"] for r in page["data"]}


def _expected(key: str | None = None, team: str | None = None) -> set[str]:
    """The ids `_filled` gave that key or team (`_synthetic`: key k{i % 5}, team red/blue by parity)."""
    return {
        f"syn-{i}"
        for i in range(60)
        if i % 3 != 1 and (key is None or f"k{i % 5}" == key) and (team is None or ("red", "blue")[i % 2] == team)
    }


def test_key_and_team_filters_read_partial_indexes_without_keyless_requests(tmp_path: Path) -> None:
    db = SqliteBackend(tmp_path / "l.db")
    since = _filled(db)
    reader = _Plans(db)
    q = {"since": str(since - 1), "limit": "500"}
    assert _ids(query.list_requests(reader, {**q, "key": "k2"})) == _expected(key="k2") != set()
    assert "USING INDEX requests_by_key" in reader.plans[-1]
    assert _ids(query.list_requests(reader, {**q, "team": "red"})) == _expected(team="red") != set()
    assert "USING INDEX requests_by_team" in reader.plans[-1]
    # A team key's view: its team's requests alone, keyless ones never among them.
    assert _ids(query.list_requests(reader, q, tenant="red")) == _expected(team="red")
    assert len(query.list_requests(reader, q)["data"]) == 60  # unfiltered, the keyless ones are there
    conn = sqlite3.connect(tmp_path / "l.db")
    partial = {name: bool(p) for _, name, _, _, p in conn.execute("PRAGMA index_list(requests)")}
    assert partial["requests_by_key"] and partial["requests_by_team"]
    assert "requests_key" not in partial and "requests_team" not in partial
    conn.close()
    db.close()


def test_a_database_with_the_earlier_full_indexes_has_them_replaced_at_start(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    SqliteBackend(path).close()
    conn = sqlite3.connect(path)  # as an earlier release left it
    conn.execute("DROP INDEX requests_by_key")
    conn.execute("DROP INDEX requests_by_team")
    conn.execute("CREATE INDEX requests_key ON requests (key_id, ts)")
    conn.execute("CREATE INDEX requests_team ON requests (team, ts)")
    conn.commit()
    conn.close()
    db = SqliteBackend(path)
    since = _filled(db)
    names = {r[1] for r in sqlite3.connect(path).execute("PRAGMA index_list(requests)")}
    assert {"requests_by_key", "requests_by_team"} <= names and not {"requests_key", "requests_team"} & names
    page = query.list_requests(db, {"since": str(since - 1), "limit": "500", "key": "k4"})
    assert _ids(page) == _expected(key="k4")
    db.close()


def test_postgres_key_and_team_indexes_are_partial_and_filters_find_their_rows(pg_schema_dsn: str) -> None:
    db = PostgresBackend(pg_schema_dsn)
    since = _filled(db)
    defs = dict(
        db.query(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'requests'",
            [],
        )
    )
    assert "WHERE (key_id IS NOT NULL)" in defs["requests_by_key"]
    assert "WHERE (team IS NOT NULL)" in defs["requests_by_team"]
    assert "requests_key" not in defs and "requests_team" not in defs
    reader = PostgresBackend(pg_schema_dsn)
    q = {"since": str(since - 1), "limit": "500"}
    assert _ids(query.list_requests(reader, {**q, "key": "k1"})) == _expected(key="k1")
    assert _ids(query.list_requests(reader, {**q, "team": "blue"})) == _expected(team="blue")
    reader.close()
    db.close()


def test_a_second_worker_waits_for_an_index_another_builds_at_start(tmp_path: Path) -> None:
    """Two workers start on a database an upgrade rebuilds indexes on: the first holds the write
    lock while it builds (~5 s a million rows), and the second gave up after SQLite's ordinary
    busy timeout (10 s): "database is locked", a worker that did not start. The schema's
    statements now wait as long as such a build may take; writes after them wait as before."""
    path = tmp_path / "l.db"
    SqliteBackend(path).close()
    held = threading.Event()

    def build_for(seconds: float) -> None:  # the first worker, building an index
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
        conn.close()

    first = threading.Thread(target=build_for, args=(ledger_store.BUSY_TIMEOUT_S + 1.5,))
    first.start()
    held.wait()
    started = time.monotonic()
    second = SqliteBackend(path)  # waits for it, then finds every index there
    assert time.monotonic() - started > ledger_store.BUSY_TIMEOUT_S
    first.join()
    busy = second._conn.execute("PRAGMA busy_timeout").fetchone()[0]
    assert busy == int(ledger_store.BUSY_TIMEOUT_S * 1000)
    second.close()


def _attempt_indexes(db: SqliteBackend | PostgresBackend) -> set[str]:
    if isinstance(db, SqliteBackend):
        return {r[1] for r in db.query("PRAGMA index_list(spend_attempts)", [])}
    sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'spend_attempts'"
    return {r[0] for r in db.query(sql, [])}


def test_the_attempts_index_no_query_reads_is_dropped_at_start(tmp_path: Path) -> None:
    """`spend_attempts` by request id served no query (a request's attempts are read from its
    request-log row): a B-tree insert per attempt, for nothing. An earlier release's database
    loses it at start; the attempts are still written, each once (their row id's index)."""
    path = tmp_path / "old.db"
    SqliteBackend(path).close()
    conn = sqlite3.connect(path)  # as an earlier release left it
    conn.execute("CREATE INDEX IF NOT EXISTS spend_attempts_request ON spend_attempts (request_id)")
    conn.commit()
    conn.close()
    db = SqliteBackend(path)
    _filled(db)
    assert _attempt_indexes(db) == {"spend_attempts_row_id"}
    assert db.query("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM spend_attempts", []) == [(60, 60)]
    db.close()


def test_postgres_drops_the_attempts_index_no_query_reads(pg_schema_dsn: str) -> None:
    db = PostgresBackend(pg_schema_dsn)
    db.execute("CREATE INDEX IF NOT EXISTS spend_attempts_request ON spend_attempts (request_id)")
    db.close()
    db = PostgresBackend(pg_schema_dsn)
    _filled(db)
    assert _attempt_indexes(db) == {"spend_attempts_row_id"}
    db.close()


def test_postgres_start_neither_waits_for_a_reader_nor_queues_writes_behind_a_retired_index(
    pg_schema_dsn: str,
) -> None:
    """DROP INDEX takes its table's strongest lock: run in the start's schema transaction, it
    waited for any open reader of `spend_attempts` (a pg_dump, a report) with the other tables'
    locks held, and every instance's writes queued behind it. Now it waits a second at most,
    alone, and the index is dropped at a later start."""
    import psycopg

    db = PostgresBackend(pg_schema_dsn)
    db.execute("CREATE INDEX IF NOT EXISTS spend_attempts_request ON spend_attempts (request_id)")
    db.close()
    with psycopg.connect(pg_schema_dsn) as reader:  # a report left open in its transaction
        reader.execute("SELECT COUNT(*) FROM spend_attempts").fetchone()
        started: list[float] = []
        t0 = time.monotonic()
        th = threading.Thread(target=lambda: (PostgresBackend(pg_schema_dsn).close(), started.append(time.monotonic())))
        th.start()
        with psycopg.connect(pg_schema_dsn) as writer:  # another instance's writes go on meanwhile
            writer.execute("SET lock_timeout = '5s'")
            for table in ("spend", "spend_attempts"):  # what an insert takes
                writer.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")
            writer.commit()
        th.join(30)
        assert started and started[0] - t0 < 10  # not held until the reader went
        reader.rollback()
    assert "spend_attempts_request" in _attempt_indexes_pg(pg_schema_dsn)  # left for the next start
    PostgresBackend(pg_schema_dsn).close()
    assert "spend_attempts_request" not in _attempt_indexes_pg(pg_schema_dsn)


def _attempt_indexes_pg(dsn: str) -> set[str]:
    import psycopg

    with psycopg.connect(dsn) as c:
        sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'spend_attempts'"
        return {r[0] for r in c.execute(sql)}
