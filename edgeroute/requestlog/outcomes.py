"""What became of a logged request afterwards: the client's feedback score, and the choice
a candidate router would have made for it (shadow evaluation).

Two tables keyed by the request's id, beside `requests` in the ledger's database and
written by the ledger's writer in its batches (`Ledger.outcome`), so both join the request
log: `router train --from-log` trains on (prompt, route, score, cost), and the shadow
report compares the candidate's choices with the running router's on the same requests.
A later score for the same request replaces the earlier one (a user may change their mind).
Retention follows the request log's.

A third table is the spend control's, written the same way: the budget `notify` thresholds
already told (`cost.control.notify`), read back at start so that a restart does not tell
them again; kept for as long as a budget's period may last, whatever the request log keeps.
"""

from __future__ import annotations

from typing import Any, Protocol

FEEDBACK = "feedback"
ROUTER_SHADOW = "router_shadow"
BUDGET_NOTICES = "budget_notices"

FEEDBACK_COLUMNS = ("request_id", "ts", "score", "key_id")
ROUTER_SHADOW_COLUMNS = (
    "request_id", "candidate", "ts", "model", "running_route", "candidate_route",
    "running_cost_usd", "candidate_cost_usd", "cost_usd",
)  # fmt: skip


def schema(dialect: str) -> list[str]:
    real = "DOUBLE PRECISION"
    return [
        f"""CREATE TABLE IF NOT EXISTS {FEEDBACK} (
    request_id TEXT NOT NULL PRIMARY KEY,
    ts {real} NOT NULL,
    score {real} NOT NULL,
    key_id TEXT
)""",
        f"CREATE INDEX IF NOT EXISTS feedback_ts ON {FEEDBACK} (ts)",
        # One row per (request, candidate): the estimated costs use the same token counts
        # (the answer's usage) at each route's first deployment's price.
        f"""CREATE TABLE IF NOT EXISTS {ROUTER_SHADOW} (
    request_id TEXT NOT NULL,
    candidate TEXT NOT NULL,
    ts {real} NOT NULL,
    model TEXT NOT NULL,
    running_route TEXT NOT NULL,
    candidate_route TEXT NOT NULL,
    running_cost_usd {real} NOT NULL,
    candidate_cost_usd {real} NOT NULL,
    cost_usd {real} NOT NULL,
    PRIMARY KEY (request_id, candidate)
)""",
        f"CREATE INDEX IF NOT EXISTS router_shadow_ts ON {ROUTER_SHADOW} (candidate, ts)",
        # The report's candidates in a time window (`router_shadow.report`); made at start on older stores.
        f"CREATE INDEX IF NOT EXISTS router_shadow_time ON {ROUTER_SHADOW} (ts, candidate)",
        # A threshold told: "{budget}:{subject}:{period}:{percent}" (`Notifications._notify`).
        f"CREATE TABLE IF NOT EXISTS {BUDGET_NOTICES} (mark TEXT NOT NULL PRIMARY KEY, ts {real} NOT NULL)",
    ]


def insert_sql(mark: str) -> dict[str, str]:
    """The insert of each table, by table name (`mark`: the driver's placeholder)."""

    def values(cols: tuple[str, ...]) -> str:
        return f"({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))})"

    return {
        FEEDBACK: f"INSERT INTO {FEEDBACK} {values(FEEDBACK_COLUMNS)} ON CONFLICT (request_id) DO UPDATE SET "
        "ts = excluded.ts, score = excluded.score, key_id = excluded.key_id",
        ROUTER_SHADOW: f"INSERT INTO {ROUTER_SHADOW} {values(ROUTER_SHADOW_COLUMNS)} "
        "ON CONFLICT (request_id, candidate) DO NOTHING",
        # the last telling's time: a rolling window's mark is told again a window later
        BUDGET_NOTICES: f"INSERT INTO {BUDGET_NOTICES} (mark, ts) VALUES ({mark}, {mark}) "
        "ON CONFLICT (mark) DO UPDATE SET ts = excluded.ts",
    }


class _Db(Protocol):
    def execute(self, sql: str, params: tuple[object, ...] = ()) -> int: ...


def prune(db: _Db, cutoff: float) -> None:
    """Drops rows older than the request log keeps (`cutoff`: unix seconds)."""
    for table in (FEEDBACK, ROUTER_SHADOW):
        db.execute(f"DELETE FROM {table} WHERE ts < ?", (cutoff,))


def group(rows: list[tuple[str, tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """Rows by table, in their order (a later feedback score must land after an earlier one)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, row in rows:
        out.setdefault(table, []).append(row)
    return out
