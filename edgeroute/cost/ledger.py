"""The spend ledger: one row per request (and per attempt), in SQLite or PostgreSQL.

`record()` only appends to a deque (thread-safe, no I/O, no conversion): a writer
thread wakes every `flush_interval` seconds, turns the records into rows and writes
them in one transaction. So a crash (SIGKILL) loses at most the records of the last
interval; a graceful shutdown (`close()`, hooked into the app's cleanup) loses none.
SQLite runs in WAL mode with `synchronous=NORMAL`: a committed batch survives the
process dying (not the OS crashing, which needs `FULL`).

When a batch fails, the ledger tells the store being unavailable (down, locked, full,
the connection lost: the batch is kept and retried at the next flush) from the store
rejecting data (`rejects_row`: a value out of range, a constraint): then it writes the
batch row by row, so the good rows land and the rows that still fail are *set aside*:
logged at ERROR with every column (enough to re-enter the spend by hand) and counted in
`Ledger.set_aside`. An error it cannot classify counts as the store being unavailable,
so nothing is set aside on a guess. `close()` keeps retrying for `close_timeout` seconds;
what it still cannot write is logged the same way and counted in `lost_at_close`.

Writes are not idempotent: if PostgreSQL commits a batch but the acknowledgement is lost,
the retry writes it again. `request_id` cannot be the key (a client may send its own
`x-request-id`, and reuse it); that needs a ledger-generated row id and a migration.

Rows hold ids and numbers only: the key's id, never its token. `baseline_cost_usd` is
what the same usage would have cost on the route's most expensive deployment (for the
savings report), computed in the writer thread, off the request path.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
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


def rejects_row(exc: BaseException) -> bool:
    """True when `exc` says the store rejected the data (a value out of range, a NOT NULL or
    other constraint), so the same rows would fail again; False for anything else (the store
    is down, locked, full, the connection lost, or an error we cannot tell): retry later."""
    if isinstance(exc, (OverflowError, ValueError, TypeError, sqlite3.IntegrityError, sqlite3.DataError)):
        return True
    psycopg = sys.modules.get("psycopg")  # imported by PostgresBackend, if one is in use
    return psycopg is not None and isinstance(exc, (psycopg.DataError, psycopg.IntegrityError))


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


Row = tuple[Any, ...]


@dataclasses.dataclass(slots=True)
class _Pending:
    """A record and its rows, ready for the store."""

    rec: RequestRecord
    row: Row
    attempts: list[Row]


class Ledger:
    """A `Recorder` that writes to a backend from a thread, in batches.

    Counters: `written` (requests in the store), `failed_batches` (writes that failed and
    were kept for later), `set_aside` (records the store rejected, logged instead) and
    `lost_at_close` (records `close()` could not write: the store stayed unavailable).
    """

    def __init__(
        self,
        backend: Backend,
        flush_interval: float = 0.5,
        record_attempts: bool = True,
        baseline: dict[str, Price] | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        self.backend = backend
        self.flush_interval = flush_interval
        self.record_attempts = record_attempts
        self.baseline = baseline or {}
        self.close_timeout = close_timeout
        self._queue: collections.deque[RequestRecord] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # one flush at a time (thread vs. an explicit flush)
        self.written = 0
        self.failed_batches = 0
        self.set_aside = 0
        self.lost_at_close = 0
        self._thread = threading.Thread(target=self._run, name="edgeroute-ledger", daemon=True)
        self._thread.start()

    # the hot path: an append
    def record(self, rec: RequestRecord) -> None:
        self._queue.append(rec)

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # a bug must not stop the writer: the next flush tries again
                log.exception("ledger flush failed")

    def flush(self) -> int:
        """Writes everything queued so far; returns the number of requests written.

        If the store is unavailable, the records stay queued for the next flush. If it
        rejects the batch, the batch is written row by row and the rows it still rejects
        are set aside (logged and counted), so one bad record cannot block the others."""
        with self._lock:
            batch: list[RequestRecord] = []
            while self._queue:
                batch.append(self._queue.popleft())
            if not batch:
                return 0
            pending = [p for p in map(self._pending, batch) if p is not None]
            if not pending:
                return 0
            try:
                self.backend.write([p.row for p in pending], [a for p in pending for a in p.attempts])
            except Exception as e:
                if not rejects_row(e):
                    self._keep(pending, e)
                    return 0
                log.warning("ledger: the store rejected a batch of %d (%s); writing it row by row", len(pending), e)
                return self._write_one_by_one(pending)
            self.written += len(pending)
            return len(pending)

    def _write_one_by_one(self, pending: list[_Pending]) -> int:
        done = 0
        for i, p in enumerate(pending):
            try:
                self.backend.write([p.row], p.attempts)
            except Exception as e:
                if rejects_row(e):
                    self._set_aside(p.rec, p.row, p.attempts, e)
                    continue
                self._keep(pending[i:], e)
                break
            done += 1
        self.written += done
        return done

    def _keep(self, pending: list[_Pending], exc: Exception) -> None:
        """The store is unavailable: keep the records for the next flush rather than lose spend."""
        self.failed_batches += 1
        log.error("ledger write failed; %d records kept for the next flush", len(pending), exc_info=exc)
        self._queue.extendleft(reversed([p.rec for p in pending]))

    def _set_aside(self, rec: RequestRecord, row: Row | None, attempts: list[Row], exc: BaseException) -> None:
        """Logs a record the store will not take, with every column (ids and numbers only,
        never a key's token), so its spend can be re-entered; counts it in `set_aside`."""
        self.set_aside += 1
        log.error(
            "ledger: set aside request %s, which cannot be written (%s: %s): %s",
            rec.request_id,
            type(exc).__name__,
            exc,
            _describe(rec, row, attempts),
        )

    def _pending(self, rec: RequestRecord) -> _Pending | None:
        try:
            row, attempts = self._rows(rec)
        except Exception as e:  # a record that cannot even be turned into a row
            self._set_aside(rec, None, [], e)
            return None
        return _Pending(rec, row, attempts)

    def _rows(self, r: RequestRecord) -> tuple[Row, list[Row]]:
        p, c, cached, est = _tokens(r.usage)
        base = self.baseline.get(r.route)
        baseline = cost_of(base, r.usage, r.started) if base is not None and r.usage is not None else r.cost_usd
        row = (
            r.request_id, r.started, time.strftime("%Y-%m-%d", time.gmtime(r.started)), r.key, r.team,
            r.user, r.model, r.route, r.rule, r.deployment, int(r.stream), r.status, r.outcome,
            r.admission, p, c, cached, est, r.cost_usd, max(baseline, r.cost_usd), r.latency_ms,
            len(r.attempts),
        )  # fmt: skip
        attempts: list[Row] = []
        if self.record_attempts:
            for n, a in enumerate(r.attempts):
                ap, ac, _, _ = _tokens(a.usage)
                attempts.append(
                    (
                        r.request_id, n, a.deployment, a.provider, a.outcome, a.status, a.latency_ms,
                        int(a.hedge), ap, ac, a.cost_usd,
                    )
                )  # fmt: skip
        return row, attempts

    def close(self) -> None:
        """Stops the writer and writes whatever is left (graceful shutdown loses nothing the
        store will take): retries for up to `close_timeout` seconds while it is unavailable;
        then logs each record it could not write and counts it in `lost_at_close`."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        deadline = time.monotonic() + self.close_timeout
        pause = 0.05
        self.flush()
        while self._queue and time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)
            self.flush()
        with self._lock:
            while self._queue:
                rec = self._queue.popleft()
                self.lost_at_close += 1
                log.error("ledger: not written at shutdown, the store is unavailable: %s", _describe(rec, None, []))
        self.backend.close()


def _describe(rec: RequestRecord, row: Row | None, attempts: list[Row]) -> dict[str, Any]:
    """A record for the log: its rows by column name when they were built, else its fields
    (without attempt error texts, which may quote an upstream's answer)."""
    if row is not None:
        return {
            **dict(zip(COLUMNS, row, strict=True)),
            "attempt_rows": [dict(zip(ATTEMPT_COLUMNS, a, strict=True)) for a in attempts],
        }
    fields = dataclasses.asdict(rec)
    for a in fields["attempts"]:
        a.pop("error", None)
    return fields


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
