"""The spend ledger's tables and the two stores that write them (SQLite, PostgreSQL).

A store writes one `Batch` per transaction, idempotently (each batch's id is recorded in
`ledger_batches` in the same transaction), and runs the read queries of the reports, the
request log and the stats on connections of their own. The writer that fills the batches,
and what it does when a store fails, is `ledger.py`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from edgeroute import pg_dead_peer, pg_schema, redact, secrets, sqlite_wal
from edgeroute.config import Ledger as LedgerConfig
from edgeroute.cost import spend_once
from edgeroute.cost.null_literals import NullLiterals, nullable
from edgeroute.cost.writer_breath import never
from edgeroute.errors import StartError
from edgeroute.requestlog import outcomes as requestlog_outcomes
from edgeroute.requestlog import rollup
from edgeroute.requestlog import rows as requestlog_rows
from edgeroute.requestlog import store as requestlog_store

log = logging.getLogger("edgeroute.ledger")

# A None parameter binds as NULL either way, but without an adapter of its own the sqlite3
# module first looks for `__adapt__` on its protocol type and formats the AttributeError it
# then drops: ~1.2 µs a None, and a keyless request's spend and request-log rows hold about
# eighteen (15 % of the writer's instructions per record). With an adapter registered (for
# the whole process: every SQLite store gains) the registry answers in one dict lookup; the
# adapter is C (no Python frame) and returns None, which binds NULL as before.
sqlite3.register_adapter(type(None), cast("Callable[[None], None]", {}.get))

Row = tuple[Any, ...]

COLUMNS = (
    "request_id", "ts", "day", "key_id", "team", "user_id", "model", "route", "rule", "deployment", "stream",
    "status", "outcome", "admission", "prompt_tokens", "completion_tokens", "cached_tokens", "usage_estimated",
    "cost_usd", "baseline_cost_usd", "latency_ms", "attempts", "row_id",
)  # fmt: skip
ATTEMPT_COLUMNS = (
    "request_id", "n", "deployment", "provider", "outcome", "status", "latency_ms", "hedge",
    "prompt_tokens", "completion_tokens", "cost_usd", "row_id",
)  # fmt: skip
JOURNAL_COLUMNS = ("row_id", "request_id", "ts", "store_key", "amount_nano")
CHUNK_ROWS = 32  # rows (or records made into rows) between the writer's rests: well under its CPU slice

_BODY = """
    request_id TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    day TEXT NOT NULL,
    key_id TEXT,
    team TEXT,
    user_id TEXT,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    rule TEXT,
    deployment TEXT,
    stream INTEGER NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    admission TEXT,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    usage_estimated INTEGER NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    baseline_cost_usd DOUBLE PRECISION NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL,
    row_id TEXT
"""
_ATTEMPTS = """
CREATE TABLE IF NOT EXISTS spend_attempts (
    request_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    deployment TEXT NOT NULL,
    provider TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    latency_ms DOUBLE PRECISION NOT NULL,
    hedge INTEGER NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    row_id TEXT
)"""
# One row per batch written: a batch whose id is already here was committed before (its
# acknowledgement was lost) and is skipped whole.
_BATCHES = "CREATE TABLE IF NOT EXISTS ledger_batches (batch_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL)"
# Budget reservations as admission made them: one whose request has no spend row yet was in
# flight, and counts as spent when budgets are rebuilt at start.
_JOURNAL = """
CREATE TABLE IF NOT EXISTS reservations (
    row_id TEXT NOT NULL PRIMARY KEY,
    request_id TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    store_key TEXT NOT NULL,
    amount_nano BIGINT NOT NULL
)"""
# Each serves a query: reports and the budgets' restore read `spend` by time, and look a
# reservation's request up in it (`spend_once.INDEX`, made by its migration); retention reads
# `reservations` by time.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS spend_ts ON spend (ts)",
    "CREATE INDEX IF NOT EXISTS reservations_ts ON reservations (ts)",
)
# Indexes of earlier releases no query reads, dropped at start: `spend_attempts` by request id
# (a request's attempts are read from its request-log row), a B-tree insert per attempt; `spend`
# by request id, which `spend_once.INDEX` (unique) serves now.
RETIRED_INDEXES = ("spend_attempts_request", "spend_request", *requestlog_store.RETIRED_INDEXES)
# PostgreSQL's DROP INDEX waits for every open reader of the table (a pg_dump, a report) and,
# while it waits, queues every instance's writes behind it: it may wait this long, in a
# transaction of its own, and is tried again at the next start.
RETIRE_LOCK_TIMEOUT = "1s"
# After the migration, on databases old and new.
_ROW_IDS = (
    "CREATE UNIQUE INDEX IF NOT EXISTS spend_row_id ON spend (row_id)",
    "CREATE UNIQUE INDEX IF NOT EXISTS spend_attempts_row_id ON spend_attempts (row_id, n)",
)


def schema(dialect: str) -> list[str]:
    """The same tables on both backends; only the surrogate key's syntax differs."""
    ident = "id INTEGER PRIMARY KEY" if dialect == "sqlite" else "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    return [
        f"CREATE TABLE IF NOT EXISTS spend (\n    {ident},{_BODY})",
        _ATTEMPTS,
        _BATCHES,
        _JOURNAL,
        *_INDEXES,
        *requestlog_store.schema(dialect),
        *requestlog_outcomes.schema(dialect),
    ]


def _missing_row_id(columns: Sequence[str]) -> bool:
    return "row_id" not in columns


# Token counts are 64-bit: earlier releases made them PostgreSQL's 32-bit `integer`, so an
# upstream's usage past 2,147,483,647 tokens (accepted up to 2^40) failed the insert, and the
# request, its spend with it, was set aside out of the ledger (budgets read back without it).
_COUNTS = ("prompt_tokens", "completion_tokens", "cached_tokens")


def _narrow_counts(types: Mapping[str, str]) -> list[str]:
    """The token-count columns of a PostgreSQL table still 32-bit (`types`: column -> data_type)."""
    return [c for c in _COUNTS if types.get(c) == "integer"]


@dataclasses.dataclass(slots=True)
class Batch:
    """Everything one transaction writes; `batch_id` makes the write idempotent."""

    batch_id: str
    spend: list[tuple[Any, ...]]
    attempts: list[tuple[Any, ...]]
    requests: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    rollup: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    journal: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    # (table, row) of `requestlog.outcomes`: feedback scores, a candidate router's choices
    outcomes: list[tuple[str, tuple[Any, ...]]] = dataclasses.field(default_factory=list)


class Reader(Protocol):
    """Runs read queries: a store's, each on its own, or a `Backend.snapshot`'s, all at one moment."""

    dialect: str

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Runs a read query written with `?` placeholders."""
        ...


class Backend(Protocol):
    dialect: str

    def write(self, batch: Batch, rest: Callable[[], None] = never) -> None:
        """Writes the batch in one transaction, unless a batch with its id was written before;
        `rest` is called between pieces of the work (`writer_breath`)."""
        ...

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> int:
        """Runs one statement (`?` placeholders) on the writer's connection, committed; the row count."""
        ...

    def scalar(self, sql: str) -> int: ...

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Runs a read query written with `?` placeholders, on its own connection."""
        ...

    def snapshot(self, within: float | None = None) -> contextlib.AbstractContextManager[Reader]:
        """A reader whose queries all see the store as one moment left it (one read transaction):
        what another connection commits after the first of them, none of them sees. With
        `within` (seconds), its queries fail once that long has passed: one blocked on a lock
        (a migration's, a VACUUM FULL's) or scanning millions of rows ends instead of holding its thread."""
        ...

    def close(self) -> None: ...


def rejects_row(exc: BaseException) -> bool:
    """True when `exc` says the store rejected the data (a value out of range, a NOT NULL or
    other constraint), so the same rows would fail again; False for anything else (the store
    is down, locked, full, the connection lost, or an error we cannot tell): retry later."""
    if isinstance(exc, (OverflowError, ValueError, TypeError, sqlite3.IntegrityError, sqlite3.DataError)):
        return True
    psycopg = sys.modules.get("psycopg")  # imported by PostgresBackend, if one is in use
    return psycopg is not None and isinstance(exc, (psycopg.DataError, psycopg.IntegrityError))


def _insert(table: str, cols: Sequence[str], mark: str, conflict: str | None) -> str:
    """An insert that skips a row a unique index holds already: the index on `conflict`'s
    columns, or any (None)."""
    values = ", ".join([mark] * len(cols))
    on = f" ({conflict})" if conflict else ""
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({values}) ON CONFLICT{on} DO NOTHING"


@dataclasses.dataclass(frozen=True, slots=True)
class _Statements:
    batch: str
    spend: str
    attempts: str
    requests: str
    holdings: str  # the requests' counts by tenant (`requestlog.store.held`)
    journal: str
    outcomes: dict[str, str]
    # The batch's rollup rows, added in by these (in order; the first takes the rows).
    rollup: tuple[str, ...]
    # SQLite: a chunk's rows go in one statement (`_many_rows`) binding at most this many
    # values (the connection's limit); 0: one statement a row.
    many: int = 0
    # SQLite: the tables whose rows' NULLs go into the statement, not bound (`null_literals`),
    # by their insert statement: spend and requests, whose rows hold most of the Nones.
    nulls: Mapping[str, NullLiterals] = dataclasses.field(default_factory=dict)
    mark: str = "?"  # the placeholder

    @classmethod
    def for_mark(cls, mark: str, dialect: str) -> _Statements:
        return cls(
            f"INSERT INTO ledger_batches (batch_id, ts) VALUES ({mark}, {mark}) ON CONFLICT (batch_id) DO NOTHING",
            _insert("spend", COLUMNS, mark, None),  # its row id, or its request's (`spend_once`)
            _insert("spend_attempts", ATTEMPT_COLUMNS, mark, "row_id, n"),
            requestlog_store.insert_sql(mark),
            requestlog_store.holdings_sql(mark, dialect),
            _insert("reservations", JOURNAL_COLUMNS, mark, "row_id"),
            requestlog_outcomes.insert_sql(mark),
            tuple(rollup.batch_sql(mark, dialect)),
            mark=mark,
        )

    def with_nulls(self) -> _Statements:
        """These statements with NULL literals for the spend and requests tables (SQLite's)."""
        tables = (
            (self.spend, _BODY, COLUMNS),
            (self.requests, requestlog_store.schema("sqlite")[0], requestlog_rows.COLUMNS),
        )
        nulls = {sql: NullLiterals(sql, nullable(body, cols), len(cols)) for sql, body, cols in tables}
        return dataclasses.replace(self, nulls=nulls)

    def _insert(self, cur: Any, sql: str, rows: list[Row], rest: Callable[[], None]) -> int:
        """Inserts `rows`; how many went in (an ON CONFLICT DO NOTHING skips some)."""
        nulls = self.nulls.get(sql)
        done = 0
        for i in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[i : i + CHUNK_ROWS]
            if len(chunk) * len(chunk[0]) > self.many:
                cur.executemany(sql, chunk)
                done += cur.rowcount
            else:
                # In pieces of 32, 16, 8, 4, 2 and 1 rows: five statements a table stay prepared
                # (one for each size up to 32 held 19 MB a worker; these 2.6 MB), five for each
                # set of NULL columns spend and requests have statements for (`null_literals`).
                at = 0
                while at < len(chunk):
                    n = 1 << (len(chunk) - at).bit_length() - 1
                    piece = chunk[at : at + n]
                    shaped = nulls.statement(piece) if nulls is not None else None
                    one, values = shaped if shaped is not None else (sql, _flat(piece))
                    cur.execute(_many_rows(one, n) if n > 1 else one, values)
                    done += cur.rowcount
                    at += n
            rest()
        return done

    def run(
        self,
        cur: Any,
        b: Batch,
        stage: Callable[[Any, list[Row]], None] | None = None,
        rest: Callable[[], None] = never,
    ) -> None:
        """Writes `b` through a cursor inside a transaction (the caller's); `stage` puts the
        rollup rows into PostgreSQL's stage (default: the first rollup statement, row by row).
        Rows go in `CHUNK_ROWS` at a time, with a `rest` after each chunk."""
        cur.execute(self.batch, (b.batch_id, time.time()))
        if cur.rowcount == 0:
            log.warning("ledger: batch %s was written before (a lost acknowledgement); not written again", b.batch_id)
            return
        spend_once.check(cur, self.mark, b.spend, self._insert(cur, self.spend, b.spend, rest))
        for sql, rows in ((self.attempts, b.attempts), (self.requests, b.requests), (self.journal, b.journal)):
            self._insert(cur, sql, rows, rest)
        if b.requests:
            self._insert(cur, self.holdings, requestlog_store.held(b.requests), rest)
        for table, rows in requestlog_outcomes.group(b.outcomes).items():
            cur.executemany(self.outcomes[table], rows)
        if b.rollup:
            insert, *then = self.rollup
            if stage is None:
                self._insert(cur, insert, b.rollup, rest)
            else:
                stage(cur, b.rollup)
            for sql in then:
                cur.execute(sql)


def _flat(rows: list[Row]) -> list[Any]:
    """The rows' values in one list, as a many-row statement binds them: a row's tuple is
    copied whole (`itertools.chain` went value by value: 0.24 µs a 31-column row, this 0.07)."""
    out: list[Any] = []
    add = out.extend
    for r in rows:
        add(r)
    return out


@functools.lru_cache(maxsize=128)  # five tables, up to five statements each for two of them, five sizes
def _many_rows(sql: str, n: int) -> str:
    """The single-row `INSERT ... VALUES (?, ...) ...` `sql` made to insert `n` rows at once.

    Why: CPython's sqlite3 lets go of the GIL around every step, so `executemany` handed the
    GIL over once a row; where the writer thread runs on another core than the event loop
    (workers not pinned), the loop, which takes the GIL back after each of its system calls,
    waited for it: 2.1-3.0 futex calls a proxied request with two workers, 1.3-1.5 with rows
    many to a statement. The same rows, bound the same way."""
    head, values, tail = sql.partition(" VALUES ")
    row, close, rest = tail.partition(")")
    return f"{head}{values}{', '.join([row + close] * n)}{rest}"


# How long a write waits for another connection's (SQLite's busy timeout), and how long the
# schema's statements wait at start: another worker may be building an index an upgrade asks
# for over millions of rows (~5 s a million), and a worker that gave up after the ordinary
# wait did not start ("database is locked").
BUSY_TIMEOUT_S = 10.0
SCHEMA_TIMEOUT_S = 600.0


class SqliteBackend:
    dialect = "sqlite"
    rollup_levels = (rollup.PENDING,)  # a batch's minute rows; `spread` adds them into the levels later

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._conn = self._connect()
        self._conn.execute(f"PRAGMA busy_timeout = {int(SCHEMA_TIMEOUT_S * 1000)}")
        for stmt in schema("sqlite"):
            self._conn.execute(stmt)
        for table in ("spend", "spend_attempts"):
            if _missing_row_id([r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")]):
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN row_id TEXT")
        for stmt in _ROW_IDS:
            self._conn.execute(stmt)
        spend_once.migrate(self._conn.execute, self.dialect)
        for old in RETIRED_INDEXES:
            self._conn.execute(f"DROP INDEX IF EXISTS {old}")
        self._conn.execute(rollup.SPREAD_SCHEMA)
        self._conn.commit()
        self._conn.execute("BEGIN IMMEDIATE")  # no other worker's rows between the count and its triggers
        requestlog_store.count_holdings(self._conn.execute, "sqlite")
        self._conn.commit()
        self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        # SQLite before 3.32 binds at most 999 values a statement (a rollup row has 210)
        most = self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._sql = dataclasses.replace(_Statements.for_mark("?", self.dialect), many=most).with_nulls()
        self._spread = rollup.spread_sql("?", self.dialect)
        self._checkpoint_told = -1e9

    def _connect(self) -> sqlite3.Connection:
        # No checkpoint inside a commit: SQLite's automatic one (every 1,000 WAL pages) made
        # every few commits 5-7 ms of CPU in one piece. The writer checkpoints after each
        # batch instead, in a slice of its own (~1.3 ms at 1,000 req/s), see `checkpoint`.
        conn = sqlite_wal.connect(self.path, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def checkpoint(self) -> None:
        """Copies the WAL's committed pages into the database file, as far as readers allow,
        and has the WAL started over once it is long (`sqlite_wal.checkpoint`), so that it stays
        a few batches long however the workers' batches interleave."""
        try:  # another process's checkpoint running, or a reader, is not an error: its row says busy
            sqlite_wal.checkpoint(self._conn)
        except sqlite3.OperationalError as e:  # a full disk, I/O: the next batch tries again
            if time.monotonic() - self._checkpoint_told >= 60:
                self._checkpoint_told = time.monotonic()
                log.warning("ledger: checkpointing the WAL failed (%s); it grows until a checkpoint succeeds", e)

    def write(self, batch: Batch, rest: Callable[[], None] = never) -> None:
        with self._conn:
            self._sql.run(self._conn.cursor(), batch, rest=rest)

    def spread(self, before: int, limit: int) -> int:
        """Moves at most `limit` of the pending rollup rows of the minutes before `before` into
        every level, in one transaction taken at once (no other writer between its reads and its
        delete); how many it moved."""
        conn = self._conn
        clear, pick, *rest = self._spread
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(clear)
            moved = int(conn.execute(pick, (before, limit)).rowcount)
            if moved:
                for sql in rest:
                    conn.execute(sql)
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
        return moved

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> int:
        with self._conn:
            return int(self._conn.execute(sql, params).rowcount)

    def scalar(self, sql: str) -> int:
        return int(self._conn.execute(sql).fetchone()[0])

    def _reader(self, timeout: float = 10.0) -> sqlite3.Connection:
        # Autocommit: a snapshot's BEGIN is its own (no transaction the module opens or ends).
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout, isolation_level=None)

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with contextlib.closing(self._reader()) as conn:
            return list(conn.execute(sql, tuple(params)).fetchall())

    @contextlib.contextmanager
    def snapshot(self, within: float | None = None) -> Iterator[Reader]:
        # A deferred BEGIN: the first read takes the WAL's snapshot and the others read it too,
        # whatever the writer commits meanwhile. Closing the connection ends the transaction.
        with contextlib.closing(self._reader(10.0 if within is None else min(10.0, within))) as conn:
            if within is not None:  # a non-zero return interrupts the statement: its time is up
                end = time.monotonic() + within
                conn.set_progress_handler(lambda: int(time.monotonic() > end), sqlite_wal.PROGRESS_STEPS)
            conn.execute("BEGIN")
            yield _Snapshot(self.dialect, lambda sql, params: list(conn.execute(sql, tuple(params)).fetchall()))

    def close(self) -> None:
        self._conn.close()


_STAGE = rollup.stage_schema("postgres") or ""
# The writer's bounds beside `pg_dead_peer`'s: a connection attempt PostgreSQL does not answer,
# and a statement it does not finish (waiting for another session's lock, say), fail and are
# retried instead of holding the writer. PostgreSQL, too, ends a vanished writer's session within
# seconds: its open transaction held the batch's id, and the same batch's retry waited for it.
CONNECT_TIMEOUT_S = 5
_WRITER_SESSION = f"{pg_dead_peer.SERVER}; SET statement_timeout = '30s'"
_END_ORPHANS = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()"
)
_IDLE_READERS = 4  # PostgreSQL read connections kept between queries


class PostgresBackend:
    dialect = "postgres"
    rollup_levels = (rollup.PENDING,)  # as SQLite

    def __init__(self, dsn: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self._dsn = dsn
        self._readers: list[Any] = []  # idle read connections (list.append/pop: thread-safe)
        self._name = f"edgeroute-ledger-{os.getpid()}-{os.urandom(4).hex()}"  # the writer's sessions
        self._conn = self._connect(autocommit=False, name=self._name)
        with self._conn.transaction():
            pg_schema.serialise(self._conn.execute)
            for stmt in schema("postgres"):
                self._conn.execute(stmt)
            for table in ("spend", "spend_attempts"):
                # Only where it lacks the column: ALTER TABLE takes the table's strongest lock even
                # when IF NOT EXISTS makes it do nothing, so a start waited for every open reader
                # (a pg_dump, a report), and every instance's writes queued behind it.
                columns = self._conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = %s",
                    (table,),
                ).fetchall()
                if _missing_row_id([str(r[0]) for r in columns]):
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS row_id TEXT")
                if narrow := _narrow_counts({str(r[0]): str(r[1]) for r in columns}):
                    # Once, where an earlier release made them: rewrites the table.
                    widen = ", ".join(f"ALTER COLUMN {c} TYPE BIGINT" for c in narrow)
                    self._conn.execute(f"ALTER TABLE {table} {widen}")
            for stmt in _ROW_IDS:
                self._conn.execute(stmt)
            spend_once.migrate(self._conn.execute, self.dialect)
            requestlog_store.count_holdings(self._conn.execute, "postgres")
            self._conn.execute(_STAGE)
        self._retire_indexes()
        with self._conn.transaction():  # after the schema's statements, which may rewrite a table
            self._conn.execute(_WRITER_SESSION)
        self._sql = _Statements.for_mark("%s", self.dialect)
        self._spread = rollup.spread_sql("%s", self.dialect)

    def _retire_indexes(self) -> None:
        """Drops `RETIRED_INDEXES` where an earlier release made them: out of the schema's
        transaction (which holds its tables' share locks while DROP INDEX waits), waiting at
        most `RETIRE_LOCK_TIMEOUT` for a reader; an index left is harmless until the next start."""
        present = [
            old
            for old in RETIRED_INDEXES
            if self._conn.execute(
                "SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() AND indexname = %s", (old,)
            ).fetchone()
        ]
        self._conn.commit()
        for old in present:
            try:
                with self._conn.transaction():
                    self._conn.execute(f"SET LOCAL lock_timeout = '{RETIRE_LOCK_TIMEOUT}'")
                    self._conn.execute(f"DROP INDEX IF EXISTS {old}")
            except self._psycopg.errors.LockNotAvailable:
                log.warning("ledger: index %s not dropped (its table is in use); tried again at the next start", old)

    def _connect(self, autocommit: bool, name: str | None = None) -> Any:
        """A connection that fails rather than hangs when PostgreSQL stops answering (a partition
        drops packets): without the bounds a write waited for TCP to give up, about 15 minutes,
        and the ledger never counted as failing. The DSN's own settings of them win."""
        given = self._psycopg.conninfo.conninfo_to_dict(self._dsn)
        bounds = {"connect_timeout": CONNECT_TIMEOUT_S, **pg_dead_peer.CLIENT}
        bounds = {k: v for k, v in bounds.items() if k not in given}
        if name is not None:
            bounds["application_name"] = name
        return self._psycopg.connect(self._dsn, autocommit=autocommit, **bounds)

    def _live(self) -> Any:
        if self._conn.closed:
            self._conn = self._connect(autocommit=False, name=self._name)
            with self._conn.transaction():  # the stage is the connection's own
                self._conn.execute(_STAGE)
                self._conn.execute(_WRITER_SESSION)
                # A lost connection's session may live on at PostgreSQL (a partition drops packets:
                # its side stays open), in the transaction of the batch this one retries: the
                # retry waited for its lock on the batch's id until PostgreSQL gave up on it.
                self._conn.execute(_END_ORPHANS, (self._name,))
        return self._conn

    def write(self, batch: Batch, rest: Callable[[], None] = never) -> None:
        conn = self._live()
        with conn.transaction(), conn.cursor() as cur:
            self._sql.run(cur, batch, _copy_stage, rest)

    def spread(self, before: int, limit: int) -> int:
        """As SQLite's; rows a batch in flight holds, and everything while another instance
        spreads, are left for the next time."""
        conn = self._live()
        with conn.transaction(), conn.cursor() as cur:
            (sql,) = self._spread
            cur.execute(sql, (before, limit))
            row = cur.fetchone()
            return int(row[0]) if row else 0

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> int:
        conn = self._live()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)
            return int(cur.rowcount)

    def scalar(self, sql: str) -> int:
        conn = self._live()
        with conn.transaction():
            return int(conn.execute(sql).fetchone()[0])

    @contextlib.contextmanager
    def _reader(self) -> Iterator[Any]:
        # Read connections are kept for the next query (a new one costs 30-60 ms on a busy
        # host, more than most stats queries; and a kept one prepares repeated queries).
        try:
            conn = self._readers.pop()
        except IndexError:
            conn = self._connect(autocommit=True)
        try:
            yield conn
        except BaseException:
            conn.close()  # it may be broken: the next query opens a new one
            raise
        if len(self._readers) < _IDLE_READERS:
            self._readers.append(conn)
        else:
            conn.close()

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._reader() as conn:
            return _pg_rows(conn, sql, params)

    @contextlib.contextmanager
    def snapshot(self, within: float | None = None) -> Iterator[Reader]:
        # REPEATABLE READ: the transaction's first query takes the snapshot every later one reads.
        with self._reader() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            end = time.monotonic() + (within or 0.0)

            def rows(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
                if within is not None:  # what is left of it (SET LOCAL: the kept connection has none after)
                    left = int((end - time.monotonic()) * 1000)
                    conn.execute(f"SET LOCAL statement_timeout = {max(1, left)}")
                return _pg_rows(conn, sql, params)

            yield _Snapshot(self.dialect, rows)
            conn.execute("ROLLBACK")  # read only: nothing to keep (on an error the connection is closed)

    def close(self) -> None:
        self._conn.close()
        while self._readers:
            self._readers.pop().close()


def _pg_rows(conn: Any, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall()]


@dataclasses.dataclass(slots=True)
class _Snapshot:
    """`Backend.snapshot`'s reader: its queries run in the store's read transaction."""

    dialect: str
    query: Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


def _copy_stage(cur: Any, rows: list[Row]) -> None:
    """PostgreSQL: the rollup rows (~200 columns each) into the stage by COPY, one stream
    rather than a statement per row."""
    with cur.copy(f"COPY {rollup.STAGE} ({', '.join(rollup.COLUMNS)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def backend_for(cfg: LedgerConfig, base_dir: Path | None = None) -> Backend:
    """The ledger's store, opened; `StartError` when it cannot be (corrupt, read-only, disk full,
    unreachable): a server must not start without a ledger, and says why without a traceback."""
    if cfg.backend == "postgres":
        assert cfg.dsn is not None
        import psycopg

        try:
            return PostgresBackend(secrets.resolve(cfg.dsn, base_dir=base_dir).reveal())
        except psycopg.Error as e:
            raise StartError(f"cannot open the spend ledger (PostgreSQL): {redact.text(str(e)).strip()}") from None
    path = Path(cfg.path)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        backend = SqliteBackend(path)
    except sqlite3.Error as e:
        if path.is_dir():  # sqlite says only "unable to open database file"
            why = f"it is a directory (ledger.path names the database file, e.g. {path / 'edgeroute-ledger.db'})"
        elif not path.parent.is_dir():
            why = f"the directory {path.parent} does not exist (create it, or point ledger.path elsewhere)"
        else:
            why = f"{e}{_sqlite_hint(str(e))}"
        raise StartError(f"cannot open the spend ledger {path}: {why}") from None
    _warn_if_shared(path)
    return backend


def _warn_if_shared(path: Path) -> None:
    """A ledger other users of the host can read: one edgeroute creates is 0600, but one made
    before (or by hand) keeps its mode, and it holds the request log's prompts and answers
    where `log_content` keeps them."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "the spend ledger %s is readable by other users of this host (mode %s): it holds the request"
            " log (prompts and answers where log_content keeps them); `chmod 600 %s*` makes it private",
            path, oct(mode), path,
        )  # fmt: skip


def _sqlite_hint(error: str) -> str:
    if "not a database" in error or "malformed" in error:
        return (
            " (the file is damaged or not a ledger: restore it from a backup, or move it aside to start an"
            " empty ledger, which forgets the spend it held)"
        )
    if "full" in error:
        return " (free space on its disk: nothing can be recorded until then)"
    if "readonly" in error or "unable to open" in error or "read-only" in error:
        return (
            " (the file and its directory must be writable by this process: the ledger writes beside it;"
            " ledger.path in the config puts it elsewhere)"
        )
    return ""
