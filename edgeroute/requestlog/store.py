"""The request log's tables, indexes and retention, in the spend ledger's database.

The ledger's writer (`cost.ledger`) writes them in the same transactions as the spend
rows, so one place owns batching and a crash loses the same last interval of both.
Retention runs in that writer thread too: rows older than `retention_days` go, and past
`max_db_mb` (SQLite: the database's size; PostgreSQL, where it is written in the config: the
request log's own, as `request_holdings` counts it) the oldest rows of the tenant holding the
most go first: a team, else a key without one, else the keyless clients. One key's flood takes
its own history, not every team's (the spend rows, which are money, are never pruned).

`request_holdings` keeps each tenant's rows and bytes (content and detail text in UTF-8, plus
`ROW_BYTES` a row), counted in the transaction that inserts or deletes them (the writer's batch; a trigger), so
that choosing whose rows go reads a table of tenants, never the requests. On PostgreSQL each
writer session counts into rows of its own (`writer`: its application_name), so instances
sharing the database never wait on each other's counts; rows of writers gone are folded into a
live writer's once a minute.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

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


# What a request row holds beside its text columns, in its table and six indexes (SQLite: 1,000
# small rows took ~420 KB): a flood of small rows weighs too, not only one of large content.
ROW_BYTES = 400
HOLDINGS = "request_holdings"
_TENANT = (
    "CASE WHEN {r}.team IS NOT NULL THEN 't:' || {r}.team"
    " WHEN {r}.key_id IS NOT NULL THEN 'k:' || {r}.key_id ELSE '' END"
)
# Text is weighed in bytes on both sides, the writer's (`octets`) and the database's: length()
# counts characters on SQLite and UTF8 PostgreSQL but bytes on a SQL_ASCII one, where a tenant of
# non-ASCII text was let go of more than it was counted for.
_SQLITE_OCTETS, _PG_OCTETS = "length(CAST({x} AS BLOB))", "octet_length({x})"


def _weight(r: str, dialect: str) -> str:
    """A row's weight in SQL (`r`: the row's name), as `held` weighs it."""
    octets = _SQLITE_OCTETS if dialect == "sqlite" else _PG_OCTETS
    content, detail = octets.format(x=f"{r}.content"), octets.format(x=f"{r}.detail")
    return f"COALESCE({content}, 0) + {detail} + {ROW_BYTES}"


def octets(text: str) -> int:
    """`text`'s bytes in UTF-8, as the database weighs it (`_weight`)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


_ADD = f"n = {HOLDINGS}.n + excluded.n, bytes = {HOLDINGS}.bytes + excluded.bytes"
# Who counts: SQLite has one writer at a time (its lock); each PostgreSQL writer session its own.
_SQLITE_WRITER = "''"
_PG_WRITER = "current_setting('application_name')"
_TEAM, _KEY, _DETAIL, _CONTENT = (rows.COLUMNS.index(c) for c in ("team", "key_id", "detail", "content"))


def holdings_sql(mark: str, dialect: str) -> str:
    """The upsert of a batch's counts (`held`'s rows) into the writer's holdings."""
    writer = _SQLITE_WRITER if dialect == "sqlite" else _PG_WRITER
    return (
        f"INSERT INTO {HOLDINGS} (tenant, writer, n, bytes) VALUES ({mark}, {writer}, {mark}, {mark})"
        f" ON CONFLICT (tenant, writer) DO UPDATE SET {_ADD}"
    )


def held(batch: Sequence[tuple[Any, ...]]) -> list[tuple[str, int, int]]:
    """A batch's request rows counted by tenant, as `_TENANT` and `_weight` count them: the
    writer adds them in the transaction that inserts the rows (one upsert a tenant; a trigger
    a row cost SQLite's writer 3-5 µs a record, PostgreSQL 24), in the tenants' order."""
    out: dict[str, list[int]] = {}
    for r in batch:
        team, key = r[_TEAM], r[_KEY]
        tenant = f"t:{team}" if team is not None else f"k:{key}" if key is not None else ""
        c = out.get(tenant)
        if c is None:
            c = out[tenant] = [0, 0]
        c[0] += 1
        c[1] += octets(r[_CONTENT] or "") + octets(r[_DETAIL]) + ROW_BYTES
    return [(t, n, b) for t, (n, b) in sorted(out.items())]


def holdings_schema(dialect: str) -> list[str]:
    """The holdings table, its delete trigger and its fill from the rows already kept
    (`count_holdings`). Rows deleted are counted by the trigger, whichever statement deletes
    them (PostgreSQL: once a statement, from its transition table)."""
    table = (
        f"CREATE TABLE IF NOT EXISTS {HOLDINGS} (tenant TEXT NOT NULL, writer TEXT NOT NULL,"
        " n BIGINT NOT NULL, bytes BIGINT NOT NULL, PRIMARY KEY (tenant, writer))"
    )
    # PostgreSQL: the fill's counts as a writer gone, folded into a live one's at the next prune.
    filler = _SQLITE_WRITER if dialect == "sqlite" else "'edgeroute-holdings-fill'"
    fill = (
        f"INSERT INTO {HOLDINGS} (tenant, writer, n, bytes) SELECT {_TENANT.format(r='r')}, {filler}, count(*),"
        f" sum({_weight('r', dialect)}) FROM requests r GROUP BY 1"
    )
    if dialect == "sqlite":
        tenant, weight = _TENANT.format(r="OLD"), _weight("OLD", dialect)
        let_go = (
            f"CREATE TRIGGER IF NOT EXISTS requests_let_go AFTER DELETE ON requests BEGIN"
            f" INSERT INTO {HOLDINGS} (tenant, writer, n, bytes) VALUES ({tenant}, {filler}, -1, -({weight}))"
            f" ON CONFLICT (tenant, writer) DO UPDATE SET {_ADD}; END"
        )
        return [table, let_go, fill]
    return [
        table,
        f"""CREATE OR REPLACE FUNCTION request_holdings_let_go() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {HOLDINGS} (tenant, writer, n, bytes)
    SELECT {_TENANT.format(r="g")}, {_PG_WRITER}, -count(*), -sum({_weight("g", dialect)})
    FROM gone g GROUP BY 1 ORDER BY 1
    ON CONFLICT (tenant, writer) DO UPDATE SET {_ADD};
    RETURN NULL;
END $$""",
        "CREATE TRIGGER requests_let_go AFTER DELETE ON requests REFERENCING OLD TABLE AS gone"
        " FOR EACH STATEMENT EXECUTE FUNCTION request_holdings_let_go()",
        fill,
    ]


def count_holdings(execute: Callable[[str], Any], dialect: str) -> None:
    """Makes `request_holdings` where the database has none (a new one, or an earlier release's,
    whose rows it counts once: a scan of the request log, ~1 s a million rows), inside the
    caller's transaction, which must keep other writers out until it ends (SQLite: BEGIN
    IMMEDIATE; PostgreSQL: CREATE TRIGGER locks `requests` against writes), so that no row is
    counted twice or never."""
    probe = (
        f"SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{HOLDINGS}'"
        if dialect == "sqlite"
        else f"SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = '{HOLDINGS}'"
    )
    if execute(probe).fetchone()[0]:
        return
    for stmt in holdings_schema(dialect):
        execute(stmt)


# PostgreSQL: the counts of writer sessions no longer connected, folded into this session's.
_FOLD = f"""WITH gone AS (
    DELETE FROM {HOLDINGS} WHERE writer <> {_PG_WRITER}
        AND writer NOT IN (SELECT application_name FROM pg_stat_activity WHERE application_name IS NOT NULL)
    RETURNING tenant, n, bytes)
INSERT INTO {HOLDINGS} (tenant, writer, n, bytes)
SELECT tenant, {_PG_WRITER}, sum(n), sum(bytes) FROM gone GROUP BY tenant ORDER BY tenant
ON CONFLICT (tenant, writer) DO UPDATE SET {_ADD}"""


def insert_sql(mark: str) -> str:
    cols = ", ".join(rows.COLUMNS)
    return f"INSERT INTO requests ({cols}) VALUES ({', '.join([mark] * len(rows.COLUMNS))}) ON CONFLICT (id) DO NOTHING"


class Maintained(Protocol):
    dialect: str

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> int:
        """Runs one statement on the writer's connection, committed; returns the row count."""
        ...

    def scalar(self, sql: str) -> int: ...

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]: ...


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
    if left > 0 and (cap := capped(db.dialect, cfg)) is not None:
        deleted += _cap(db, cap, left, rest)
    return deleted


def capped(dialect: str, cfg: RequestLog) -> float | None:
    """The size bound in bytes, if any: on PostgreSQL only where the config writes `max_db_mb`
    (the default bounds SQLite's file; a PostgreSQL request log of earlier releases had none,
    and an upgrade must not start deleting it)."""
    if cfg.max_db_mb is None or (dialect != "sqlite" and "max_db_mb" not in cfg.model_fields_set):
        return None
    return cfg.max_db_mb * 1024 * 1024


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
    if db.dialect != "sqlite":
        db.execute(_FOLD)
    writer = _SQLITE_WRITER if db.dialect == "sqlite" else _PG_WRITER  # its own: no other writer's lock
    db.execute(f"DELETE FROM {HOLDINGS} WHERE n = 0 AND bytes = 0 AND writer = {writer}")  # nothing left
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


def held_bytes(db: Maintained) -> int:
    """The request log's bytes as `request_holdings` counts them (every writer's)."""
    return db.scalar(f"SELECT COALESCE(sum(bytes), 0) FROM {HOLDINGS}")


def _over(db: Maintained, max_bytes: float) -> bool:
    return (used_bytes(db) if db.dialect == "sqlite" else held_bytes(db)) > max_bytes


def biggest(db: Maintained) -> str | None:
    """The tenant holding the most bytes of the request log (`_TENANT`'s form), if any."""
    rows = db.query(
        f"SELECT tenant FROM {HOLDINGS} GROUP BY tenant HAVING sum(n) > 0 ORDER BY sum(bytes) DESC, tenant LIMIT 1", ()
    )
    return str(rows[0][0]) if rows else None


# The keyless clients' rows have no index of their own (a keyless gateway's every record would
# pay for one): they are found by time, from where the last chunk of theirs ended (per database),
# not from the oldest row each time past every keyed row older than theirs.
_keyless_from: dict[int, float] = {}


def _oldest_of(db: Maintained, tenant: str, chunk: int) -> tuple[str, tuple[object, ...]]:
    """The query of a tenant's `chunk` oldest rows (ids), each served by an index: the team's,
    the key's, or (the keyless clients) the rows by time."""
    if tenant.startswith("t:"):
        return "SELECT id FROM requests WHERE team = ? ORDER BY ts LIMIT ?", (tenant[2:], chunk)
    if tenant.startswith("k:"):
        return "SELECT id FROM requests WHERE key_id = ? AND team IS NULL ORDER BY ts LIMIT ?", (tenant[2:], chunk)
    keyless = "key_id IS NULL AND team IS NULL AND ts >= ?"
    oldest = f"SELECT id FROM requests WHERE {keyless} ORDER BY ts LIMIT ?"
    for start in dict.fromkeys((_keyless_from.get(id(db), 0.0), 0.0)):  # from 0 again: late rows
        last = db.query(
            f"SELECT max(ts) FROM (SELECT ts FROM requests WHERE {keyless} ORDER BY ts LIMIT ?) t", (start, chunk)
        )
        if last and last[0][0] is not None:
            _keyless_from[id(db)] = float(last[0][0])
            return oldest, (start, chunk)
    _keyless_from.pop(id(db), None)
    return oldest, (0.0, chunk)


def _cap(db: Maintained, max_bytes: float, budget: int, rest: Callable[[], None]) -> int:
    deleted = idle = 0
    while deleted < budget and idle < 3 and _over(db, max_bytes):
        # A chunk of the biggest tenant's oldest at a time, measured again after each: SQLite's
        # size falls by less than the rows dropped (freed pages are kept for reuse), and the
        # biggest tenant changes as its rows go (down to the next one's share).
        tenant = biggest(db)
        if tenant is None:
            log.warning("request log: the database is over max_db_mb with no request rows left to drop")
            break
        chunk = min(_PRUNE_CHUNK, budget - deleted)
        oldest, params = _oldest_of(db, tenant, chunk)
        n = db.execute(f"DELETE FROM requests WHERE id IN ({oldest})", params)
        idle = 0 if n else idle + 1
        if n == 0 and not db.query(oldest, (*params[:-1], 1)):
            # Its counts name rows it no longer has (a database edited by hand): forget them. With
            # rows left, another instance deleted the same chunk first: the next round goes on.
            log.warning("request log: the holdings of %s named rows it no longer has; recounted", tenant)
            db.execute(f"DELETE FROM {HOLDINGS} WHERE tenant = ?", (tenant,))
        deleted += n
        rest()
    return deleted
