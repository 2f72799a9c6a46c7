"""Requests a crash left in flight, recorded: a spend row each, so that reports agree with budgets.

A restart counts the reservations of requests with no spend row as spent (`restore`: whether
the provider billed them is unknown). The reports (`edgeroute spend`, `/admin/spend`,
`/admin/requests`) showed nothing for them: after a `kill -9` mid-stream the budget said $1.32
spent and the reports $0, with no word of which requests were lost. So a server that is the
ledger's only writer (it counts budgets alone, not a worker: `ledger_lock`) records each of
them at start as a request of outcome `crashed`, at its reservation's cost, estimated, with
what its reservation journal tells of it (its key, team, user, route and deployment, from the
counters it reserved in). The next restart reads that row as its spend, and its reservation is
no longer counted apart: once, either way. With shared state (other instances or workers may
be running such requests still) nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from edgeroute.accounting import RequestRecord, Usage
from edgeroute.config import Budget
from edgeroute.cost import budgets as B
from edgeroute.cost.keys import key_budget_name
from edgeroute.cost.ledger_store import Reader

OUTCOME = "crashed"
_CHUNK = 500  # request ids a query names
# A rate-limit take's bucket names the request's key, route or deployment (`restore._limit_names`).
_BUCKETS = {"key:": "key", "model:": "route", "deployment:": "deployment"}


def records(db: Reader, budgets: Sequence[Budget], request_ids: Iterable[str]) -> list[RequestRecord]:
    """The `crashed` record of each request in `request_ids` (those a restart counted at their
    reservation), from its reservation journal's rows."""
    ids = sorted(request_ids)
    rows: list[tuple[str, float, str, int]] = []
    for i in range(0, len(ids), _CHUNK):
        part = ids[i : i + _CHUNK]
        named = ", ".join("?" * len(part))
        sql = f"SELECT request_id, ts, store_key, amount_nano FROM reservations WHERE request_id IN ({named})"
        rows += [(str(r), float(ts), str(k), int(a)) for r, ts, k, a in db.query(sql, part)]
    out: dict[str, RequestRecord] = {}
    amounts: dict[str, int] = {}
    for request_id, ts, store_key, amount in rows:
        rec = out.get(request_id)
        if rec is None:
            rec = out[request_id] = _record(request_id, ts)
        rec.started = min(rec.started, ts)
        if store_key.startswith("rl|"):  # a rate-limit take: tokens or a request, not money
            _from_bucket(rec, store_key)
        elif _from_budget(rec, store_key, budgets):  # every charge of a request is its whole reservation
            amounts[request_id] = max(amounts.get(request_id, 0), amount)
    for request_id, rec in out.items():
        rec.cost_usd = amounts.get(request_id, 0) / B.NANO
        rec.started_at, rec.model = rec.started, rec.model or rec.route
    return [rec for rec in out.values() if rec.request_id in amounts]


def _record(request_id: str, ts: float) -> RequestRecord:
    rec = RequestRecord(request_id=request_id, started=ts, model="", outcome=OUTCOME, status=0)
    rec.usage = Usage(estimated=True)  # no count: its cost is its reservation, the most it could cost
    rec.error_class = OUTCOME
    return rec


def _from_budget(rec: RequestRecord, store_key: str, budgets: Sequence[Budget]) -> bool:
    """Fills what a budget counter (`<budget>:<subject>:<period>`) says of the request; False
    for a key that is none of them."""
    head, _, _period = store_key.rpartition(":")
    if head.startswith(key_budget_name("")):  # a managed key's counter: key:<id>
        rec.key = rec.key or head[len(key_budget_name("")) :]
        return True
    for b in sorted(budgets, key=lambda b: -len(b.name)):  # "team:a" before "team"
        if head.startswith(f"{b.name}:"):
            _set_subject(rec, b.scope, head[len(b.name) + 1 :])
            return True
    return bool(head)  # a budget since removed: still its reservation


def _set_subject(rec: RequestRecord, scope: str, subject: str) -> None:
    if scope == "key":
        rec.key = rec.key or subject
    elif scope == "team":
        rec.team = rec.team or subject
    elif scope == "user":
        rec.user = rec.user or subject
    elif scope == "model":
        rec.route = rec.route or subject


def _from_bucket(rec: RequestRecord, store_key: str) -> None:
    """Fills the key, route or deployment a rate-limit take (`rl|<bucket>|<kind>|<limit>`) names."""
    bucket = store_key[3:].rsplit("|", 2)[0]
    for prefix, attr in _BUCKETS.items():
        if bucket.startswith(prefix) and not getattr(rec, attr):
            setattr(rec, attr, bucket[len(prefix) :])
