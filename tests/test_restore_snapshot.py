"""The read-back of spend from the ledger (`restore.read`: at start, into a Redis that lost its
budgets, for a budget a reload adds) sees the ledger at one moment. It reads the spend rows,
then the journal of reservations whose request has no spend row; another instance's (or
worker's) writer commits meanwhile. A request whose spend row committed between two of those
reads was counted in neither (at 0) or in both (spent in one counter, in flight in another).

Redis's refill gives back a held settlement of a reservation made before it only for a request
it counted in flight (`redis_scripts.SETTLE_STALE`), so a request read at 0 kept nothing (the
budget was under by its cost) and one read both ways was given back from the counter that held
its cost (under by its reservation's excess). Read in one snapshot, each request is either spent
at its cost or in flight at its reservation in every counter, and the counters end at the
ledger's spend once its settlement arrives. Here the snapshot is taken before the commit, so
the request is in flight; a read taken after it would find it spent, and be right too."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from edgeroute.accounting import RequestRecord, Usage
from edgeroute.config import Config, parse
from edgeroute.cost import budgets as B
from edgeroute.cost import restore
from edgeroute.cost.keys import key_counter
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import Backend, PostgresBackend, SqliteBackend

NOW = time.time() // 86400 * 86400 + 43200  # midday UTC: a day's and a month's budget period hold every row
EARLIER_USD = 0.5  # request "a": settled, its spend row written before the read-back
RESERVED_USD, COST_USD = 0.25, 0.10  # request "x": in flight when the read starts; then settled
RPM = 100


class _CommitsBetween:
    """The ledger's store, read through: right after the first read whose SQL holds `after`,
    `commit` runs (the ledger's writer commits on a connection of its own) before the next."""

    def __init__(self, db: Backend, after: str, commit: Callable[[], None]) -> None:
        self.db: Any = db
        self.dialect = db.dialect
        self.after = after
        self.commit: Callable[[], None] | None = commit

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self.db.query(sql, params)
        if self.commit is not None and self.after in sql:
            commit, self.commit = self.commit, None
            commit()
        return rows

    @contextlib.contextmanager
    def snapshot(self, within: float | None = None) -> Iterator[_CommitsBetween]:
        with self.db.snapshot(within) as reader:
            store, self.db = self.db, reader
            try:
                yield self
            finally:
                self.db = store


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "postgres":
        backend: Backend = PostgresBackend(request.getfixturevalue("pg_schema_dsn"))
    else:
        backend = SqliteBackend(tmp_path / "ledger.db")
    ledger = Ledger(backend, flush_interval=60)  # written by the test's flushes alone
    try:
        yield ledger
    finally:
        ledger.close()


def _config() -> Config:
    return parse(
        {
            "providers": {"a": {"base_url": "http://127.0.0.1:9"}},
            "deployments": {"d": {"provider": "a", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
            "budgets": {"limits": [{"name": "g", "scope": "global", "limit_usd": 100, "period": "day"}]},
            "rate_limits": {"models": {"m": {"rpm": RPM}}},
        },
        "t.yaml",
    )


def _spend(request_id: str, started: float, usd: float) -> RequestRecord:
    return RequestRecord(
        request_id, started, "m", route="m", key="k1", status=200, outcome="ok", usage=Usage(1, 1), cost_usd=usd
    )


# Where the other writer's commit lands: after the first spend read (the managed keys'), after
# the first journal read (the managed keys'; the config's budgets read the spend next), and
# after the rate-limit windows' spend read (their journal read next).
BETWEEN = {
    "spend-then-journal": "FROM spend WHERE",
    "journal-then-spend": "FROM reservations",
    "rate-limit-windows": "prompt_tokens + completion_tokens FROM spend",
}


@pytest.mark.parametrize("between", BETWEEN)
def test_a_spend_row_committed_during_the_read_back_counts_once(ledger: Ledger, between: str) -> None:
    cfg = _config()
    (budget,) = cfg.budgets.limits
    keyed = restore.KeyBudget(key_counter("k1"), ["k1"])
    counters = [
        B.charge(b, who, B.period_of(b, NOW), 0, -1).store_key for b, who in ((budget, "*"), (keyed.budget, "k1"))
    ]
    ledger.record(_spend("a", NOW - 10, EARLIER_USD))
    takes = [(k, B.to_nano(RESERVED_USD)) for k in counters] + [(restore.bucket_key("model:m", "requests", RPM), 1)]
    ledger.journal_all("x", NOW - 5, takes)  # admission's, as `Reservations` journals them
    ledger.flush()

    def x_settles() -> None:
        ledger.record(_spend("x", NOW - 5, COST_USD))
        ledger.flush()

    db = _CommitsBetween(ledger.backend, BETWEEN[between], x_settles)
    # What a refill of Redis reads (`_spent_now`); a start also reads the rate-limit windows.
    at_start = between == "rate-limit-windows"
    found = restore.read(db, cfg, None if at_start else cfg.budgets.limits, now=NOW, key_budgets=[keyed])
    assert db.commit is None, "x's spend row was committed during the read"
    # The snapshot ended with the read: the next query on its (kept) connection sees the commit.
    assert ledger.backend.query("SELECT COUNT(*) FROM spend", []) == [(2,)]

    # Each counter after x's held settlement (cost less reservation), which the refill applies
    # only for a request it counted in flight: what the ledger says was spent.
    give_back = B.to_nano(COST_USD) - B.to_nano(RESERVED_USD) if "x" in found.in_flight else 0
    for counter in counters:
        assert found.budgets.get((counter, -1), 0) + give_back == B.to_nano(EARLIER_USD + COST_USD), (counter, found)
    # Read before the commit: x in flight, at its reservation, in every counter.
    assert found.in_flight == {"x"}
    assert all(found.budgets[(c, -1)] == B.to_nano(EARLIER_USD) + B.to_nano(RESERVED_USD) for c in counters)
    if at_start:
        # Each request holds what a minute's window has not refilled of it: x its journaled take.
        (used,) = [u for name, kind, _, u in found.buckets if (name, kind) == ("model:m", "requests")]
        assert used == pytest.approx((1 - 10 / 60) + (1 - 5 / 60))
