"""The spend ledger: one row per request (and per attempt), in SQLite or PostgreSQL.

`record()` only appends to a deque (thread-safe, no I/O, no conversion): a writer
thread wakes every `flush_interval` seconds, turns the records into rows and writes
them in one transaction. So a crash (SIGKILL) loses at most the records of the last
interval; a graceful shutdown (`close()`, hooked into the app's cleanup) loses none.
SQLite runs in WAL mode with `synchronous=NORMAL`: a committed batch survives the
process dying (not the OS crashing, which needs `FULL`).

Rows hold ids and numbers only: the key's id, never its token. `baseline_cost_usd` is
what the same usage would have cost on the route's most expensive deployment (for the
savings report), computed in the writer thread, off the request path.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from edgeroute import secrets
from edgeroute.accounting import RequestRecord, Usage, cost_of
from edgeroute.config import Config, Price
from edgeroute.config import Ledger as LedgerConfig
from edgeroute.cost.prices import most_expensive

log = logging.getLogger("edgeroute.ledger")

COLUMNS = (
    "request_id", "ts", "day", "key_id", "team", "user_id", "model", "route", "rule", "deployment", "stream",
    "status", "outcome", "admission", "prompt_tokens", "completion_tokens", "cached_tokens", "usage_estimated",
    "cost_usd", "baseline_cost_usd", "latency_ms", "attempts",
)  # fmt: skip
ATTEMPT_COLUMNS = (
    "request_id", "n", "deployment", "provider", "outcome", "status", "latency_ms", "hedge",
    "prompt_tokens", "completion_tokens", "cost_usd",
)  # fmt: skip

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
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    usage_estimated INTEGER NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    baseline_cost_usd DOUBLE PRECISION NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL
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
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL
)"""
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS spend_ts ON spend (ts)",
    "CREATE INDEX IF NOT EXISTS spend_request ON spend (request_id)",
    "CREATE INDEX IF NOT EXISTS spend_attempts_request ON spend_attempts (request_id)",
)


def schema(dialect: str) -> list[str]:
    """The same tables on both backends; only the surrogate key's syntax differs."""
    ident = "id INTEGER PRIMARY KEY" if dialect == "sqlite" else "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    return [f"CREATE TABLE IF NOT EXISTS spend (\n    {ident},{_BODY})", _ATTEMPTS, *_INDEXES]


class Backend(Protocol):
    dialect: str

    def write(self, rows: Sequence[tuple[Any, ...]], attempts: Sequence[tuple[Any, ...]]) -> None: ...

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Runs a read query written with `?` placeholders, on its own connection."""
        ...

    def close(self) -> None: ...


def _insert(table: str, cols: Sequence[str], mark: str) -> str:
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))})"


class SqliteBackend:
    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._conn = self._connect()
        for stmt in schema("sqlite"):
            self._conn.execute(stmt)
        self._conn.commit()
        self._rows_sql = _insert("spend", COLUMNS, "?")
        self._att_sql = _insert("spend_attempts", ATTEMPT_COLUMNS, "?")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def write(self, rows: Sequence[tuple[Any, ...]], attempts: Sequence[tuple[Any, ...]]) -> None:
        with self._conn:
            self._conn.executemany(self._rows_sql, rows)
            if attempts:
                self._conn.executemany(self._att_sql, attempts)

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            return list(conn.execute(sql, tuple(params)).fetchall())
        finally:
            conn.close()

    def close(self) -> None:
        self._conn.close()


class PostgresBackend:
    dialect = "postgres"

    def __init__(self, dsn: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self._dsn = dsn
        self._conn = psycopg.connect(dsn, autocommit=False)
        with self._conn.transaction():
            for stmt in schema("postgres"):
                self._conn.execute(stmt)
        self._rows_sql = _insert("spend", COLUMNS, "%s")
        self._att_sql = _insert("spend_attempts", ATTEMPT_COLUMNS, "%s")

    def write(self, rows: Sequence[tuple[Any, ...]], attempts: Sequence[tuple[Any, ...]]) -> None:
        if self._conn.closed:
            self._conn = self._psycopg.connect(self._dsn, autocommit=False)
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.executemany(self._rows_sql, rows)
            if attempts:
                cur.executemany(self._att_sql, attempts)

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._psycopg.connect(self._dsn) as conn:
            return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall()]

    def close(self) -> None:
        self._conn.close()


def _tokens(u: Usage | None) -> tuple[int, int, int, int]:
    if u is None:
        return 0, 0, 0, 0
    return u.prompt_tokens, u.completion_tokens, u.cached_tokens, int(u.estimated)


class Ledger:
    """A `Recorder` that writes to a backend from a thread, in batches."""

    def __init__(
        self,
        backend: Backend,
        flush_interval: float = 0.5,
        record_attempts: bool = True,
        baseline: dict[str, Price] | None = None,
    ) -> None:
        self.backend = backend
        self.flush_interval = flush_interval
        self.record_attempts = record_attempts
        self.baseline = baseline or {}
        self._queue: collections.deque[RequestRecord] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # one flush at a time (thread vs. an explicit flush)
        self.written = 0
        self.failed_batches = 0
        self._thread = threading.Thread(target=self._run, name="edgeroute-ledger", daemon=True)
        self._thread.start()

    # the hot path: an append
    def record(self, rec: RequestRecord) -> None:
        self._queue.append(rec)

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Writes everything queued so far; returns the number of requests written."""
        with self._lock:
            batch: list[RequestRecord] = []
            while self._queue:
                batch.append(self._queue.popleft())
            if not batch:
                return 0
            rows, attempts = self._rows(batch)
            try:
                self.backend.write(rows, attempts)
            except Exception:
                # Keep the batch for the next flush rather than lose spend.
                self.failed_batches += 1
                log.exception("ledger write failed; %d records kept for the next flush", len(batch))
                self._queue.extendleft(reversed(batch))
                return 0
            self.written += len(batch)
            return len(batch)

    def _rows(self, batch: Iterable[RequestRecord]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        rows: list[tuple[Any, ...]] = []
        attempts: list[tuple[Any, ...]] = []
        for r in batch:
            p, c, cached, est = _tokens(r.usage)
            base = self.baseline.get(r.route)
            baseline = cost_of(base, r.usage, r.started) if base is not None and r.usage is not None else r.cost_usd
            rows.append(
                (
                    r.request_id, r.started, time.strftime("%Y-%m-%d", time.gmtime(r.started)), r.key, r.team,
                    r.user, r.model, r.route, r.rule, r.deployment, int(r.stream), r.status, r.outcome,
                    r.admission, p, c, cached, est, r.cost_usd, max(baseline, r.cost_usd), r.latency_ms,
                    len(r.attempts),
                )
            )  # fmt: skip
            if self.record_attempts:
                for n, a in enumerate(r.attempts):
                    ap, ac, _, _ = _tokens(a.usage)
                    attempts.append(
                        (
                            r.request_id, n, a.deployment, a.provider, a.outcome, a.status, a.latency_ms,
                            int(a.hedge), ap, ac, a.cost_usd,
                        )
                    )  # fmt: skip
        return rows, attempts

    def close(self) -> None:
        """Stops the writer and writes whatever is left (graceful shutdown loses nothing)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()
        self.backend.close()


def backend_for(cfg: LedgerConfig, base_dir: Path | None = None) -> Backend:
    if cfg.backend == "postgres":
        assert cfg.dsn is not None
        return PostgresBackend(secrets.resolve(cfg.dsn, base_dir=base_dir).reveal())
    path = Path(cfg.path)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return SqliteBackend(path)


def ledger_from_config(cfg: Config, base_dir: Path | None = None) -> Ledger | None:
    """The configured ledger; without a `ledger:` section, the embedded default (SQLite
    beside the config file) when serving from a file; None for `backend: memory`."""
    lc = cfg.ledger
    if lc is None:
        if base_dir is None:  # an in-process config (tests, embedding): nowhere obvious to write
            return None
        lc = LedgerConfig()
    if lc.backend == "memory":
        return None
    return Ledger(backend_for(lc, base_dir), lc.flush_interval, lc.record_attempts, most_expensive(cfg))
