"""Spend survives restarts: budgets and rate-limit windows read back from the ledger.

At start (and for a budget a reload adds or changes) each budget's current period is
summed from the spend rows per subject, and the reservation journal adds what admission
had reserved for requests that have no spend row: requests in flight at a crash count as
spent, at their reserved (maximum) cost, since whether the provider billed them is unknown.
Rate-limit buckets are refilled from the last minute's requests and tokens, each weighted
by how much of it a bucket would not yet have refilled.

The journal holds each admitted request's rate-limit takes too (`bucket_key`): a request in
flight at a crash was sent to its provider, so it counts against the key's, model's and
deployment's requests and tokens per minute after the restart as it did before (it was
forgotten, and a key held to 10 requests a minute got 10 more at once).

What a crash can lose is what the ledger had not written: the last flush interval.
Everything here runs in a thread, in one read transaction (a snapshot of the ledger, which
other instances and workers write meanwhile), before the proxy serves (or in the background
after a reload, or when Redis lost its budgets).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgeroute.config import Budget, Config, Limit
from edgeroute.cost import budgets as B
from edgeroute.cost.ledger_store import Backend, Reader

_SUBJECT = {"key": "key_id", "team": "team", "user": "user_id", "model": "route", "global": "'*'"}
# Shadow mirrors (`edgeroute.shadow`) bypass admission: no budget or rate limit counts them
# while the proxy runs, so none may count them when read back (a restart made a key's budget
# jump by its mirrors' cost and refused what it had admitted a moment before).
_NOT_SHADOW = "outcome <> 'shadow'"
WINDOW_S = 60.0  # token buckets refill over a minute
# A rate-limit take's row in the reservation journal: `rl|<bucket>|<kind>|<limit>`. No budget's
# store key (`<name>:<subject>:<period>`) ends with `|<digits>`, so the two never mix.
_BUCKET = "rl|"


def bucket_key(name: str, kind: str, limit: int) -> str:
    """The journal's store key of a take from bucket `name` (`kind`: requests or tokens)."""
    return f"{_BUCKET}{name}|{kind}|{limit}"


def _bucket_of(store_key: str) -> tuple[str, str, int] | None:
    """(bucket, kind, limit) of a journal row written by `bucket_key`; None for a budget's."""
    name, _, rest = store_key[len(_BUCKET) :].rpartition("|")
    name, _, kind = name.rpartition("|")
    if not store_key.startswith(_BUCKET) or kind not in ("requests", "tokens") or not rest.isdigit() or not name:
        return None
    return name, kind, int(rest)


@dataclass(slots=True, frozen=True)
class Restored:
    budgets: dict[tuple[str, int], int]  # (store key, rolling slot or -1) -> nano-USD
    buckets: list[tuple[str, str, int, float]]  # (name, kind, limit, used)
    read_at: float
    # The requests `budgets` counts at their reservation (no spend row: in flight), by id.
    in_flight: frozenset[str] = frozenset()


def _slot_sql(dialect: str, size: float) -> str:
    # `size` is a float from the config, formatted by Python: never request text.
    if dialect == "postgres":
        return f"CAST(FLOOR(ts / {size!r}) AS BIGINT)"
    return f"CAST(ts / {size!r} AS INTEGER)"


def budget_spend(
    db: Reader,
    budgets: Sequence[Budget],
    now: float,
    until: float | None = None,
    in_flight: set[str] | None = None,
    most: int | None = None,
) -> dict[tuple[str, int], int]:
    """Each budget's spend in its current period, per subject (and rolling slot), by requests
    that started before `until` (all when None), in-flight reservations included (their
    requests' ids added to `in_flight`); with `most`, only the subjects that spent the most of
    a budget per subject (they share its limit: those nearest to it)."""
    end = until if until is not None else now + B.READ_AHEAD_S  # a clock that moved back: still counted
    out: dict[tuple[str, int], int] = defaultdict(int)
    periods = {b.name: B.period_of(b, now) for b in budgets}
    for b in budgets:
        p = periods[b.name]
        col = _SUBJECT[b.scope]
        slot = _slot_sql(db.dialect, p.slot_s) if p.rolling else "-1"
        where: list[str] = ["ts >= ?", "ts < ?", _NOT_SHADOW]
        params: list[object] = [p.starts_at, end]
        if b.scope != "global":
            where.append(f"{col} IS NOT NULL")
            if b.match is not None:
                where.append(f"{col} = ?")
                params.append(b.match)
        sql = f"SELECT {col}, {slot}, SUM(cost_usd) FROM spend WHERE {' AND '.join(where)} GROUP BY 1, 2"
        if most is not None and b.scope != "global" and b.match is None:
            sql += f" ORDER BY 3 DESC LIMIT {int(most)}"
        for subject, s, usd in db.query(sql, params):
            if p.rolling and int(s) < p.first_slot:
                continue
            out[(f"{b.name}:{subject}:{p.id}", int(s))] += B.to_nano(float(usd or 0))
    _unsettled(db, budgets, periods, end, out, in_flight)
    return {k: min(v, B.MAX_CHARGE_NANO) for k, v in out.items()}


@dataclass(slots=True, frozen=True)
class KeyBudget:
    """A managed key's counter (`cost.keys.key_counter`, its budget's if it has one) and the keys
    whose spend counts in it (the key and those it created, at any depth)."""

    budget: Budget
    spenders: Sequence[str]


def key_budget_spend(
    db: Reader,
    budgets: Sequence[KeyBudget],
    now: float,
    until: float | None = None,
    in_flight: set[str] | None = None,
) -> dict[tuple[str, int], int]:
    """Managed keys' counters in their current period (a calendar month), as `budget_spend`
    counts: one grouped read per period start, not one per key; counters with nothing spent
    are left out (an absent counter is zero)."""
    end = until if until is not None else now + B.READ_AHEAD_S
    out: dict[tuple[str, int], int] = defaultdict(int)
    periods = {k.budget.name: B.period_of(k.budget, now) for k in budgets}
    by_start: dict[float, dict[str, float]] = {}
    sql = (
        "SELECT key_id, SUM(cost_usd) FROM spend "
        f"WHERE ts >= ? AND ts < ? AND key_id IS NOT NULL AND {_NOT_SHADOW} GROUP BY 1"
    )
    for k in budgets:
        p = periods[k.budget.name]
        if p.starts_at not in by_start:
            by_start[p.starts_at] = {key: float(usd or 0) for key, usd in db.query(sql, [p.starts_at, end])}
        spent = by_start[p.starts_at]
        if amount := sum(B.to_nano(spent.get(s, 0.0)) for s in k.spenders):
            out[(f"{k.budget.name}:{k.budget.match}:{p.id}", -1)] += amount
    _unsettled(db, [k.budget for k in budgets], periods, end, out, in_flight)
    return {k: min(v, B.MAX_CHARGE_NANO) for k, v in out.items()}


def _unsettled(
    db: Reader,
    budgets: Sequence[Budget],
    periods: dict[str, B.Period],
    end: float,
    out: dict[tuple[str, int], int],
    in_flight: set[str] | None,
) -> None:
    """Adds the reservations of requests with no spend row: in flight at a crash, they count
    as spent at their reserved (maximum) cost (and their ids go to `in_flight`: a seed of
    Redis lets their settlements apply, `redis_scripts.SETTLE_STALE`)."""
    if not budgets:
        return
    earliest = min(p.starts_at for p in periods.values())
    # A budget with `match` has one counter in its period (every managed key's: thousands).
    exact = {f"{b.name}:{b.match}:{periods[b.name].id}": b for b in budgets if b.match is not None}
    unsettled = (
        "SELECT store_key, ts, amount_nano, request_id FROM reservations r WHERE ts >= ? AND ts < ? "
        "AND NOT EXISTS (SELECT 1 FROM spend s WHERE s.request_id = r.request_id)"
    )
    counted = in_flight if in_flight is not None else set()
    for store_key, ts, amount, request_id in db.query(unsettled, [earliest, end]):
        if (hit := exact.get(store_key)) is not None:
            p = periods[hit.name]
            if ts >= p.starts_at:
                out[(store_key, int(ts // p.slot_s) if p.rolling else -1)] += int(amount)
                counted.add(str(request_id))
                continue
        for b in budgets:
            p = periods[b.name]
            if store_key.startswith(f"{b.name}:") and store_key.endswith(f":{p.id}") and ts >= p.starts_at:
                s = int(ts // p.slot_s) if p.rolling else -1
                out[(store_key, s)] += int(amount)
                counted.add(str(request_id))
                break


@dataclass(slots=True, frozen=True)
class Unwritten:
    """A record the ledger holds in memory, not in the store yet: what a budget counts of it."""

    request_id: str
    ts: float
    subjects: Mapping[str, str | None]  # a budget's scope -> its subject (key, team, user, model, global)
    key: str | None
    cost_usd: float


def add_unwritten(
    found: Restored,
    budgets: Sequence[Budget],
    key_budgets: Sequence[KeyBudget],
    records: Sequence[Unwritten],
    journal: Sequence[tuple[str, float, str, int]],
) -> Restored:
    """`found` with what this process spent that the ledger could not write yet: its records
    (those whose reservation `found` counts in flight are counted so already, at their
    maximum) and the reservations of its requests still running (journal rows: request id,
    ts, store key, nano-USD)."""
    out: dict[tuple[str, int], int] = defaultdict(int, found.budgets)
    in_flight = set(found.in_flight)
    periods = {b.name: B.period_of(b, found.read_at) for b in [*budgets, *(k.budget for k in key_budgets)]}

    def add(b: Budget, subject: str, ts: float, amount: int) -> None:
        p = periods[b.name]
        slot = int(ts // p.slot_s) if p.rolling else -1
        if ts >= p.starts_at and (not p.rolling or slot >= p.first_slot):
            out[(f"{b.name}:{subject}:{p.id}", slot)] += amount

    done = set()
    for r in records:
        done.add(r.request_id)
        if r.request_id in in_flight:
            continue
        for b in budgets:
            subject = r.subjects.get(b.scope)
            if subject is not None and (b.match is None or subject == b.match):
                add(b, subject, r.ts, B.to_nano(r.cost_usd))
        for k in key_budgets:
            if r.key is not None and r.key in k.spenders:
                add(k.budget, str(k.budget.match), r.ts, B.to_nano(r.cost_usd))
    every = [*budgets, *(k.budget for k in key_budgets)]
    # A budget with `match` has one counter in its period (every managed key's: thousands).
    exact = {f"{b.name}:{b.match}:{periods[b.name].id}": b for b in every if b.match is not None}
    per_subject = [b for b in every if b.match is None]
    for request_id, ts, store_key, amount in journal:
        if request_id in done:
            continue
        hit = exact.get(store_key)
        for b in [hit] if hit is not None else per_subject:
            suffix = f":{periods[b.name].id}"
            if store_key.startswith(f"{b.name}:") and store_key.endswith(suffix):
                add(b, store_key[len(b.name) + 1 : -len(suffix)], ts, int(amount))
                in_flight.add(request_id)
                break
    budgets_out = {k: min(v, B.MAX_CHARGE_NANO) for k, v in out.items()}
    return Restored(budgets_out, found.buckets, found.read_at, frozenset(in_flight))


def _limit_names(
    cfg: Config, key: str | None, route: str, deployment: str | None, key_limits: Mapping[str, Limit]
) -> list[tuple[str, Limit]]:
    out = []
    if key is not None:
        vk = cfg.keys.get(key)
        lim = (vk.limits if vk is not None else key_limits.get(key)) or cfg.rate_limits.per_key
        if lim is not None:
            out.append((f"key:{key}", lim))
    if (lim := cfg.rate_limits.models.get(route)) is not None:
        out.append((f"model:{route}", lim))
    if deployment is not None and (lim := cfg.rate_limits.deployments.get(deployment)) is not None:
        out.append((f"deployment:{deployment}", lim))
    return out


def bucket_usage(
    db: Reader, cfg: Config, now: float, key_limits: Mapping[str, Limit] | None = None
) -> list[tuple[str, str, int, float]]:
    """(name, kind, limit, used) for every rate-limit bucket the last minute's requests touched
    (`key_limits`: managed keys' own limits)."""
    used: dict[tuple[str, str], float] = defaultdict(float)
    limits: dict[tuple[str, str], int] = {}
    # A request refused before it was routed (an unknown model, a body that is not JSON) took
    # nothing from a bucket: it has no route, though its key is recorded. Nor did one its rate
    # limit (or its key's parallel cap) refused: counted, a client retrying its 429s was locked
    # out a minute past its limit after a Redis flush.
    sql = (
        "SELECT key_id, route, deployment, ts, prompt_tokens + completion_tokens FROM spend "
        f"WHERE ts >= ? AND {_NOT_SHADOW} AND route <> '' AND NOT (outcome = 'rate_limited' AND attempts = 0)"
    )
    for key, route, deployment, ts, tokens in db.query(sql, [now - WINDOW_S]):
        weight = max(0.0, 1.0 - (now - float(ts)) / WINDOW_S)  # what the bucket has not refilled yet
        for name, lim in _limit_names(cfg, key, route, deployment, key_limits or {}):
            if lim.rpm:
                used[(name, "requests")] += weight
                limits[(name, "requests")] = lim.rpm
            if lim.tpm:
                used[(name, "tokens")] += weight * int(tokens or 0)
                limits[(name, "tokens")] = lim.tpm
    # Requests in flight at a crash: their takes as admission journaled them.
    unsettled = (
        "SELECT store_key, ts, amount_nano FROM reservations r WHERE ts >= ? AND substr(store_key, 1, 3) = ? "
        "AND NOT EXISTS (SELECT 1 FROM spend s WHERE s.request_id = r.request_id)"
    )
    for store_key, ts, amount in db.query(unsettled, [now - WINDOW_S, _BUCKET]):
        if (bucket := _bucket_of(str(store_key))) is None:
            continue
        name, kind, limit = bucket
        used[(name, kind)] += max(0.0, 1.0 - (now - float(ts)) / WINDOW_S) * int(amount)
        limits.setdefault((name, kind), limit)
    return [(name, kind, limits[(name, kind)], u) for (name, kind), u in used.items()]


def read(
    db: Backend,
    cfg: Config,
    budgets: Sequence[Budget] | None = None,
    now: float | None = None,
    until: float | None = None,
    key_budgets: Sequence[KeyBudget] = (),
    key_limits: Mapping[str, Limit] | None = None,
) -> Restored:
    """What the ledger says was spent: every budget of `cfg`, the managed keys' `key_budgets`
    and the rate-limit windows (at start), or just `budgets` and `key_budgets` by requests that
    started before `until` (a budget added by a reload, or a key's budget first seen)."""
    now = time.time() if now is None else now
    if budgets is None:
        return _read(db, cfg, now, key_budgets, key_limits)
    return spent(db, budgets, now, until, key_budgets)


def spent(
    db: Backend,
    budgets: Sequence[Budget],
    now: float,
    until: float | None = None,
    key_budgets: Sequence[KeyBudget] = (),
    within: float | None = None,
    most: int | None = None,
) -> Restored:
    """`budgets`' and `key_budgets`' spend (no rate-limit windows), in one snapshot whose
    queries fail after `within` seconds; `most`: see `budget_spend`."""
    in_flight: set[str] = set()
    with db.snapshot(within) as at:
        keyed = key_budget_spend(at, key_budgets, now, until, in_flight) if key_budgets else {}
        found = budget_spend(at, budgets, now, until, in_flight, most) | keyed
        return Restored(found, [], now, frozenset(in_flight))


def _read(
    db: Backend,
    cfg: Config,
    now: float,
    key_budgets: Sequence[KeyBudget],
    key_limits: Mapping[str, Limit] | None,
) -> Restored:
    in_flight: set[str] = set()
    # Every read at one moment: a request whose spend row another writer committed between
    # two of them was counted in neither (its spend row read before it was there, its
    # reservation after it was settled) or both ways (spent in one counter, in flight in
    # another): Redis's refill then kept no give-back for it, or gave one back from its cost.
    with db.snapshot() as at:
        keyed = key_budget_spend(at, key_budgets, now, None, in_flight) if key_budgets else {}
        found = budget_spend(at, cfg.budgets.limits, now, None, in_flight) | keyed
        return Restored(found, bucket_usage(at, cfg, now, key_limits), now, frozenset(in_flight))
