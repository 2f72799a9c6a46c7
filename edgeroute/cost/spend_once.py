"""One spend row per request, whichever instance writes it: the database decides.

With shared state, two instances may each write a row for the same request: an instance
paused (SIGSTOP, a stalled VM) or cut off from Redis while its row waited to be written (in a
batch under way, or kept from a failed one) was taken over meanwhile by another, which wrote
the request's `crashed` row; the paused one's row then counted the request twice in the
reports and in a budget rebuilt from the ledger. A unique index on `spend.request_id` makes the
first row committed win, in one place both instances write: the batch that brings a second row
is rolled back (`AlreadyRecorded`, naming its rows) and written again without them, and the
writer logs and counts each (`Ledger.already_recorded`): its attempts, request-log row and
rollups are dropped with it, so every table counts the request once.

Ledgers of earlier releases may hold such pairs already: the index is made once, at start,
after moving each request's extra rows (its `crashed` row where it has another, else the later
ones) into `spend_duplicates`, which keeps them for an operator to look at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("edgeroute.ledger")

INDEX = "spend_request_once"  # it serves the lookups of a reservation's request too
_CHUNK = 500  # request ids a lookup names


class AlreadyRecorded(Exception):
    """A batch brought rows for requests another row already records; `row_ids`: the batch's
    rows to leave out (its transaction was rolled back)."""

    def __init__(self, row_ids: set[str]) -> None:
        super().__init__(f"{len(row_ids)} requests recorded already")
        self.row_ids = row_ids


def check(cur: Any, mark: str, spend: Sequence[tuple[Any, ...]], inserted: int) -> None:
    """After a batch's spend rows went in with ON CONFLICT DO NOTHING (`inserted` of them):
    raises `AlreadyRecorded` when some were not its own (a row of its id is there already: a
    retry of a batch committed before is no conflict). Costs nothing while every row went in."""
    if inserted >= len(spend):
        return
    stored: dict[str, str] = {}
    for i in range(0, len(spend), _CHUNK):
        ids = list({row[0] for row in spend[i : i + _CHUNK]})
        cur.execute(f"SELECT request_id, row_id FROM spend WHERE request_id IN ({', '.join([mark] * len(ids))})", ids)
        stored.update((str(r), str(w)) for r, w in cur.fetchall())
    # The row id is a spend row's last column; a request twice in the batch keeps its first row.
    taken = {row[-1] for row in spend if stored.get(row[0]) != row[-1]}
    if taken:
        raise AlreadyRecorded(taken)


def migrate(execute: Callable[[str], Any], dialect: str) -> None:
    """Makes the unique index where the database has none, inside the caller's transaction
    (which keeps other writers out), moving the rows that would break it aside first."""
    catalog = "sqlite_master" if dialect == "sqlite" else "pg_indexes"
    where = "type = 'index' AND name" if dialect == "sqlite" else "schemaname = current_schema() AND indexname"
    if execute(f"SELECT count(*) FROM {catalog} WHERE {where} = '{INDEX}'").fetchone()[0]:
        return
    extra = (
        "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY request_id"
        " ORDER BY CASE WHEN outcome = 'crashed' THEN 1 ELSE 0 END, id) AS n FROM spend"
        " WHERE request_id IN (SELECT request_id FROM spend GROUP BY request_id HAVING count(*) > 1)) d WHERE n > 1"
    )
    moved = 0
    if execute(f"SELECT count(*) FROM ({extra}) e").fetchone()[0]:
        execute("CREATE TABLE IF NOT EXISTS spend_duplicates AS SELECT * FROM spend WHERE 1 = 0")
        execute(f"INSERT INTO spend_duplicates SELECT * FROM spend WHERE id IN ({extra})")
        moved = execute(f"DELETE FROM spend WHERE id IN ({extra})").rowcount
    execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {INDEX} ON spend (request_id)")  # SQLite: a worker beside
    if moved:
        log.warning(
            "ledger: %d spend rows recorded a request a second time (a `crashed` row beside the request's own,"
            " written by two instances); moved into the table spend_duplicates, so each request counts once",
            moved,
        )
