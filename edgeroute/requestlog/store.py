"""The request log's tables, indexes and retention, in the spend ledger's database.

The ledger's writer (`cost.ledger`) writes them in the same transactions as the spend
rows, so one place owns batching and a crash loses the same last interval of both.
Retention runs in that writer thread too: rows older than `retention_days` go, and with
SQLite the oldest request rows go first once the database passes `max_db_mb` (the spend
rows, which are money, are never pruned).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Protocol

from edgeroute.requestlog import outcomes, rollup, rows
from edgeroute.requestlog.settings import RequestLog

log = logging.getLogger("edgeroute.requestlog")

# Rows per delete, with a `rest` of the writer's after each (`cost.writer_breath`): 450 rows
# in one statement took 2.3 ms of CPU, a stretch long enough to show in the proxy's p99.
_PRUNE_CHUNK = 128


# Indexes of earlier releases, replaced by partial ones (`requests_by_key`, `requests_by_team`):
# dropped at start by the ledger's store, after the schema (`ledger_store.RETIRED_INDEXES`).
RETIRED_INDEXES = ("requests_key", "requests_team")


def schema(dialect: str) -> list[str]:
    real = "DOUBLE PRECISION"
    return [
        f"""CREATE TABLE IF NOT EXISTS requests (
    id TEXT NOT NULL PRIMARY KEY,
    correlation_id TEXT,
    ts {real} NOT NULL,
    key_id TEXT,
    team TEXT,
    user_id TEXT,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    rule TEXT,
    policy TEXT,
    task TEXT,
    difficulty {real},
    variant TEXT,
    deployment TEXT,
    provider TEXT,
    stream INTEGER NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error_class TEXT,
    latency_ms {real} NOT NULL,
    ttft_ms {real},
    queue_ms {real} NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    tokens_estimated INTEGER NOT NULL,
    cost_usd {real} NOT NULL,
    baseline_cost_usd {real} NOT NULL,
    cache TEXT,
    attempts INTEGER NOT NULL,
    detail TEXT NOT NULL,
    content TEXT
)""",
        # Pages are newest first by (ts, id); each filter column leads an index with ts.
        "CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts, id)",
        "CREATE INDEX IF NOT EXISTS requests_model ON requests (model, ts)",
        # Key and team are filtered by equality only, which no NULL matches: a request without
        # a key (or a team) is left out of their indexes, two B-tree inserts fewer for each such
        # record (~9,000 instructions of the writer's, ~1.3 % of a keyless cache hit's CPU).
        "CREATE INDEX IF NOT EXISTS requests_by_key ON requests (key_id, ts) WHERE key_id IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS requests_by_team ON requests (team, ts) WHERE team IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS requests_deployment ON requests (deployment, ts)",
        *rollup.schema(dialect),
    ]


def insert_sql(mark: str) -> str:
    cols = ", ".join(rows.COLUMNS)
    return f"INSERT INTO requests ({cols}) VALUES ({', '.join([mark] * len(rows.COLUMNS))}) ON CONFLICT (id) DO NOTHING"


class Maintained(Protocol):
    dialect: str

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> int:
        """Runs one statement on the writer's connection, committed; returns the row count."""
        ...

    def scalar(self, sql: str) -> int: ...


def _no_rest() -> None:
    pass


def prune_some(
    db: Maintained, cfg: RequestLog, budget: int | None, now: float | None = None, rest: Callable[[], None] = _no_rest
) -> int:
    """Drops request rows that retention says to (past `retention_days`, then the oldest while
    SQLite is over `max_db_mb`), at most `budget` of them (None: all); the number deleted.

    The writer calls this after every batch with a budget of about twice the batch: retention
    keeps pace with the traffic a little at a time, never as one long delete that would hold
    up the writer (and let its queue grow past one flush interval)."""
    now = time.time() if now is None else now
    cutoff = now - cfg.retention_days * 86400
    left = sys.maxsize if budget is None else budget
    deleted = 0
    old = "SELECT id FROM requests WHERE ts < ? ORDER BY ts LIMIT ?"
    while left > 0:
        chunk = min(_PRUNE_CHUNK, left)
        n = db.execute(f"DELETE FROM requests WHERE id IN ({old})", (cutoff, chunk))
        deleted += n
        left -= n
        rest()
        if n < chunk:
            break
    if db.dialect == "sqlite" and cfg.max_db_mb is not None and left > 0:
        deleted += _cap(db, cfg.max_db_mb * 1024 * 1024, left, rest)
    return deleted


def prune(
    db: Maintained,
    cfg: RequestLog,
    now: float | None = None,
    budget: int | None = None,
    rest: Callable[[], None] = _no_rest,
) -> int:
    """Drops what retention says to (request rows: at most `budget`); the request rows deleted."""
    now = time.time() if now is None else now
    deleted = prune_some(db, cfg, budget, now, rest)
    outcomes.prune(db, now - cfg.retention_days * 86400)  # feedback and shadow rows: few, once a minute
    # Rows wholly before the cutoff (a coarse row that straddles it stays until it does not),
    # one range of the primary key (dim, res, minute) at a time: a condition on `minute` alone
    # would scan the whole table every minute, holding up the writer.
    first_kept = int((now - cfg.retention_days * 86400) // 60)
    old_rollups = "DELETE FROM request_rollups WHERE dim = ? AND res = ? AND minute <= ?"
    for dim in rollup.DIMS:
        for res in rollup.LEVELS:
            db.execute(old_rollups, (dim, res, first_kept - res))
    return deleted


def used_bytes(db: Maintained) -> int:
    """Bytes the SQLite database holds (free pages, which new rows reuse, not counted)."""
    return (db.scalar("PRAGMA page_count") - db.scalar("PRAGMA freelist_count")) * db.scalar("PRAGMA page_size")


def _cap(db: Maintained, max_bytes: float, budget: int, rest: Callable[[], None]) -> int:
    deleted = 0
    while deleted < budget and used_bytes(db) > max_bytes:
        # A chunk of the oldest at a time, measured again after each: the size falls by less
        # than the rows dropped (freed pages are kept for reuse), so it cannot be computed.
        chunk = min(_PRUNE_CHUNK, budget - deleted)
        n = db.execute("DELETE FROM requests WHERE id IN (SELECT id FROM requests ORDER BY ts LIMIT ?)", (chunk,))
        if n == 0:
            log.warning("request log: the database is over max_db_mb with no request rows left to drop")
            break
        deleted += n
        rest()
    return deleted
