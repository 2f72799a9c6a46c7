"""Stats read from the multi-resolution rollups equal the same numbers computed from the raw
records, for any window, bucket and group, on SQLite and PostgreSQL; a database written
before the coarser levels existed gets them built once, with the same answers."""

from __future__ import annotations

import collections
import itertools
import math
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgeroute.accounting import AttemptRecord, RequestRecord, Usage
from edgeroute.cost.ledger import Ledger, _Held
from edgeroute.cost.ledger_store import PostgresBackend, SqliteBackend
from edgeroute.requestlog import query, rollup
from edgeroute.requestlog.settings import RequestLog

HOURS = 14  # long enough for 6-hour rows inside a window and ragged ends at every level


def _records(n: int, t0: float, rng: random.Random) -> list[RequestRecord]:
    out = []
    for i in range(n):
        model = rng.choice(("alpha", "beta", "gamma"))
        lat = rng.lognormvariate(5, 1.2)
        ok = rng.random() > 0.15
        usage = Usage(rng.randint(1, 900), rng.randint(1, 400))
        deps = [f"dep-{model}-{j}" for j in range(2)]
        cost = usage.completion_tokens * 1e-6 if ok else 0.0
        outcome = "success" if ok else "server_error"
        served = AttemptRecord(deps[0], "p0", outcome, 200 if ok else 503, lat, usage=usage if ok else None)
        served.cost_usd = cost
        attempts = [served]
        if rng.random() < 0.2:  # a failed first attempt, failed over
            attempts.insert(0, AttemptRecord(deps[1], "p1", "timeout", 504, rng.uniform(10, 900)))
        rec = RequestRecord(
            request_id=f"r-{i}", started=t0 + rng.random() * HOURS * 3600, model=model, route=model,
            team=rng.choice(("red", "blue", "red:x", None)), key=f"k{rng.randint(0, 6)}", status=200 if ok else 503,
            rule=rng.choice(("r1", "r2", None)),
            outcome="ok" if ok else "error", latency_ms=lat + 0.2, deployment=deps[0] if ok else None,
            usage=usage if ok else None, cost_usd=usage.completion_tokens * 1e-6 if ok else 0.0, attempts=attempts,
        )  # fmt: skip
        rec.ttft_ms = lat / 3 if rng.random() < 0.5 else None
        out.append(rec)
    return out


def _expected(
    recs: list[RequestRecord], group: str, first: int, last: int, step: int, team: str | None = None
) -> dict[Any, dict[str, Any]]:
    """The stats rows computed straight from the records (attempts for deployments and
    providers), of one team's records alone with `team`."""

    def zero() -> dict[str, Any]:
        counts = {"requests": 0, "errors": 0, "prompt_tokens": 0, "cost": 0.0}
        return {**counts, "lat": [0] * rollup.BUCKETS, "ttft": [0] * rollup.BUCKETS}

    sums: dict[Any, dict[str, Any]] = collections.defaultdict(zero)
    for r in recs:
        minute = int(r.started // 60)
        if not first <= minute < last or (team is not None and r.team != team):
            continue
        t = minute // step * step * 60 if step else None
        items: list[tuple[Any, bool, float, float | None, Usage | None, float]]
        if group in rollup.ATTEMPT_DIMS:
            items = [(getattr(a, group), a.outcome != "success", a.latency_ms, a.ttft_ms, a.usage, a.cost_usd)
                     for a in r.attempts]  # fmt: skip
        else:
            value = None if group == "none" else getattr(r, group)
            items = [(value, r.status != 200, r.latency_ms, r.ttft_ms, r.usage, r.cost_usd)]
        for value, error, lat, ttft, usage, cost in items:
            s = sums[(value or None, t)]
            s["requests"] += 1
            s["errors"] += error
            s["prompt_tokens"] += usage.prompt_tokens if usage else 0
            s["cost"] += cost
            s["lat"][rollup.bucket(lat)] += 1
            if ttft is not None:
                s["ttft"][rollup.bucket(ttft)] += 1
    return sums


def _check(db: Any, recs: list[RequestRecord], t0: float, rng: random.Random, cases: int) -> None:
    now = t0 + HOURS * 3600 + 60
    for _ in range(cases):
        # One team's stats (its key's, or a team= of a key bound to none) by what they offer.
        team = rng.choice((None, None, "red", "blue", "red:x"))
        groups = ("none", "model", "key", "team", "deployment", "provider", "rule")
        group = rng.choice(groups if team is None else query.TEAM_GROUPS)
        step = rng.choice((0, 0, 1, 5, 10, 15, 30, 60, 120, 360, 720))
        a = t0 + rng.uniform(-1800, HOURS * 3600)
        b = a + rng.uniform(60, HOURS * 3600 - (a - t0) + 1800)
        q = {"since": f"{a:.3f}", "until": f"{b:.3f}", "group_by": group}
        if step:
            q["bucket"] = str(step * 60)
        tenant = None
        if team is not None and rng.random() < 0.5:
            q["team"] = team
        else:
            tenant = team
        got = query.stats(db, q, now=now, tenant=tenant)
        first, last = got["since"] // 60, got["until"] // 60
        want = _expected(recs, group, first, last, step, team)
        rows = {(r.get("group") if group != "none" else None, r.get("t")): r for r in got["rows"]}
        assert rows.keys() == want.keys(), q
        for k, w in want.items():
            r = rows[k]
            counts = ("requests", "errors", "prompt_tokens")
            assert [r[c] for c in counts] == [w[c] for c in counts], q
            assert r["cost_usd"] == pytest.approx(w["cost"], abs=1e-7)
            for name, hist, p in (("p50_ms", "lat", 0.5), ("p99_ms", "lat", 0.99), ("ttft_p95_ms", "ttft", 0.95)):
                assert r[name] == rollup.percentile(w[hist], p), (q, k, name)
        assert got["totals"]["requests"] == sum(w["requests"] for w in want.values())


def _write(ledger: Ledger, recs: list[RequestRecord], rng: random.Random) -> None:
    for r in recs:  # in uneven batches, out of time order (late records): the upserts add up
        ledger.record(r)
        if rng.random() < 0.003:
            ledger.flush()
    ledger.close()


def _rows_by_hand(pairs: list[tuple[RequestRecord, float]]) -> dict[tuple[Any, ...], list[Any]]:
    """Every rollup row at every level, one record and one dimension at a time (the slow,
    obvious way), as {(dim, res, value, minute): [counters..., latency buckets..., TTFT buckets...]}."""
    rows: dict[tuple[Any, ...], list[Any]] = {}

    def add(dim: str, value: str | None, minute: int, error: bool, lat: float, ttft: float | None,
            usage: Usage | None, cost: float, base: float) -> None:  # fmt: skip
        for res in rollup.LEVELS:
            r = rows.setdefault((dim, res, value or "", minute - minute % res), [0] * 206)
            r[0] += 1
            r[1] += int(error)
            r[2] += usage.prompt_tokens if usage else 0
            r[3] += usage.completion_tokens if usage else 0
            r[4] += cost
            r[5] += base
            r[6 + rollup.bucket(lat)] += 1
            if ttft is not None:
                r[106 + rollup.bucket(ttft)] += 1

    def in_team(rec: RequestRecord, dim: str, value: str | None) -> list[tuple[str, str | None]]:
        """The row of `dim`, and that of its team's own dimension when the request has a team."""
        out = [(dim, value)]
        if rec.team and dim in rollup.TEAM_DIMS:  # e.g. ("team.model", "3:red:alpha")
            out.append((f"team.{dim}", f"{len(rec.team)}:{rec.team}:{value or ''}"))
        return out

    for rec, baseline in pairs:
        minute = int(rec.started // 60)
        add("none", "*", minute, rec.status != 200, rec.latency_ms, rec.ttft_ms, rec.usage, rec.cost_usd, baseline)
        for dim in rollup.REQUEST_DIMS:
            for d, value in in_team(rec, dim, getattr(rec, dim)):
                add(d, value, minute, rec.status != 200, rec.latency_ms, rec.ttft_ms, rec.usage, rec.cost_usd, baseline)
        for a in rec.attempts:
            # the serving attempt carries the request's savings (baseline over cost)
            serving = a.outcome == "success" and a.deployment == rec.deployment
            base = a.cost_usd + (baseline - rec.cost_usd) if serving else a.cost_usd
            for dim in rollup.ATTEMPT_DIMS:
                for d, value in in_team(rec, dim, getattr(a, dim)):
                    add(d, value, minute, a.outcome != "success", a.latency_ms, a.ttft_ms, a.usage, a.cost_usd, base)
    return rows


def test_a_batch_rollup_rows_hold_what_its_records_add_up_to_for_every_dimension_and_level() -> None:
    """The writer's aggregation, against the same sums done by hand: every dimension (a
    missing value is its own "" row), every level, every counter and histogram bucket."""
    rng = random.Random(16)
    t0 = (time.time() // 86400 - 1) * 86400 + 355 * 60  # across 5-, 15-, 60- and 360-minute boundaries
    recs = _records(600, t0, rng)
    for i, r in enumerate(recs):
        r.started = t0 + rng.uniform(0, 20 * 60)
        r.rule = None if i % 3 else f"rule-{i % 4}"
        r.policy, r.task, r.variant = (None, None, None) if i % 2 else ("cost", f"task-{i % 3}", "b")
        if i % 7 == 0 and r.attempts[-1].outcome == "success":  # a late first byte on the serving attempt
            r.attempts[-1].ttft_ms = r.latency_ms / 2
    pairs = [(r, r.cost_usd + (i % 5) * 1e-4) for i, r in enumerate(recs)]  # savings on some
    want = _rows_by_hand(pairs)
    for levels in (rollup.LEVELS, (rollup.MINUTE,)):
        got = {r[:4]: r[4:] for r in rollup.aggregate(pairs, levels)}
        assert len(got) == len(rollup.aggregate(pairs, levels)), "one row per key"
        assert got.keys() == {k for k in want if k[1] in levels}
        for key, values in got.items():
            w = want[key]
            assert len(values) == len(w)
            assert list(values[:4]) + list(values[6:]) == w[:4] + w[6:], key
            assert values[4:6] == pytest.approx(w[4:6], rel=1e-12, abs=1e-15), key
    assert {k[0] for k in want} == set(rollup.DIMS)
    assert ("rule", 1, "", int(recs[1].started // 60)) in want  # the record without a rule counted under ""


def test_cover_uses_the_coarsest_whole_rows() -> None:
    assert rollup.cover(0, 1440) == [(360, 0, 1440)]
    spans = rollup.cover(7, 1000)
    assert sum(b - a for _, a, b in spans) == 993 and all(a % res == 0 and b % res == 0 for res, a, b in spans)
    covered = sorted((a, b) for _, a, b in spans)
    assert covered[0][0] == 7 and covered[-1][1] == 1000
    assert all(x[1] == y[0] for x, y in itertools.pairwise(covered)), "no gap, no overlap"
    assert len(spans) <= 2 * len(rollup.LEVELS)
    assert {res for res, _, _ in rollup.cover(7, 1000, step=5)} <= {1, 5}  # no row straddles a bucket
    assert rollup.cover(3, 3) == []


def test_sqlite_stats_equal_the_raw_aggregation_for_any_window(tmp_path: Path) -> None:
    rng = random.Random(11)
    t0 = (time.time() // 86400 - 2) * 86400 + 137 * 60  # not aligned to any level
    recs = _records(3000, t0, rng)
    _write(Ledger(SqliteBackend(tmp_path / "s.db"), flush_interval=60, request_log=RequestLog()), recs, rng)
    db = SqliteBackend(tmp_path / "s.db")
    _check(db, recs, t0, rng, cases=60)
    db.close()


def _stored_rollups(backend: str, path: Path, dsn: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    sql = f"SELECT {', '.join(rollup.COLUMNS)} FROM request_rollups"
    if backend == "sqlite":
        conn = sqlite3.connect(path)
        found = list(conn.execute(sql))
        conn.close()
    else:
        import psycopg

        with psycopg.connect(dsn) as c:
            found = [tuple(r) for r in c.execute(sql)]
    return {tuple(r[:4]): tuple(r[4:]) for r in found}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_database_spreads_the_minute_rows_over_the_levels_as_python_does(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Each batch hands the database its minute rows only, and the database adds up the
    coarser levels itself (SQLite off the GIL; PostgreSQL summing a block's rows first): the
    table holds exactly the rows that every level built in Python gives."""
    rng = random.Random(12)
    recs = _records(2000, (time.time() // 86400 - 2) * 86400 + 37 * 60, rng)
    db, dsn = _open(backend, tmp_path, request)
    _write(Ledger(db, flush_interval=60, request_log=RequestLog()), recs, rng)
    stored = _stored_rollups(backend, tmp_path / "s.db", dsn)
    built = {r[:4]: r[4:] for r in rollup.aggregate((r, r.cost_usd) for r in recs)}
    assert {k[1] for k in stored} == set(rollup.LEVELS)
    assert stored.keys() == built.keys()
    costs = slice(4, 6)  # cost_usd, baseline_cost_usd: sums of floats, added in another order
    for key, values in built.items():
        got = stored[key]
        assert got[:4] + got[6:] == values[:4] + values[6:], key
        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got[costs], values[costs], strict=True)), key


def _open(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Any, str]:
    if backend == "sqlite":
        return SqliteBackend(tmp_path / "s.db"), ""
    dsn: str = request.getfixturevalue("pg_schema_dsn")
    return PostgresBackend(dsn), dsn


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_batch_adds_one_pending_row_per_minute_and_the_stats_count_it_before_and_after_the_spread(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A batch adds each (dimension, value, minute) once, as a pending row (one ~200-column
    upsert, not one per level); a batch that holds a newer minute spreads the rows before it
    over every level. The stats count every request exactly all along: pending, spread, and
    late records added to minutes spread already."""
    rng = random.Random(21)
    t0 = (time.time() // 86400 - 2) * 86400 + 355 * 60
    recs = sorted(_records(1200, t0, rng), key=lambda r: r.started)
    first_minute = int(recs[0].started // 60)
    in_first = [r for r in recs if int(r.started // 60) == first_minute]
    for i, r in enumerate(_records(40, t0, rng)):  # more in that first minute
        r.request_id, r.started = f"m-{i}", first_minute * 60 + rng.uniform(0, 59.9)
        in_first.append(r)
    rest = [r for r in recs if int(r.started // 60) != first_minute]
    late, rest = rest[::7], [r for i, r in enumerate(rest) if i % 7]
    db, dsn = _open(backend, tmp_path, request)
    ledger = Ledger(db, flush_interval=3600, request_log=RequestLog())
    stored = lambda: _stored_rollups(backend, tmp_path / "s.db", dsn)  # noqa: E731

    for r in in_first:
        ledger.record(r)
    assert ledger.flush() == len(in_first)
    pairs = [(r, r.cost_usd) for r in in_first]
    once = {r[:4] for r in rollup.aggregate(pairs, (rollup.PENDING,))}
    assert stored().keys() == once, "one pending row per dimension, value and minute; no level written yet"
    assert {k[3] for k in once} == {first_minute}
    _check(db, in_first, t0, rng, cases=15)

    for r in rest:
        ledger.record(r)
    ledger.flush()
    newest = int(rest[-1].started // 60)
    assert {k[3] for k in stored() if k[1] == rollup.PENDING} == {newest}, "the minutes before it were spread"
    _check(db, in_first + rest, t0, rng, cases=15)

    for r in late:  # late records, to minutes spread already: pending again, until a newer minute comes
        ledger.record(r)
    ledger.flush()
    assert {k[3] for k in stored() if k[1] == rollup.PENDING} == {newest} | {int(r.started // 60) for r in late}
    _check(db, recs + in_first[-40:], t0, rng, cases=25)

    ledger.close()  # a graceful stop leaves nothing pending: an older release reads the levels alone
    everything = stored()
    assert {k[1] for k in everything} == set(rollup.LEVELS)
    built = {r[:4]: r[4:] for r in rollup.aggregate((r, r.cost_usd) for r in recs + in_first[-40:])}
    assert everything.keys() == built.keys()
    for key, values in built.items():
        assert everything[key][:4] + everything[key][6:] == values[:4] + values[6:], key
    db = SqliteBackend(tmp_path / "s.db") if backend == "sqlite" else PostgresBackend(dsn)
    _check(db, recs + in_first[-40:], t0, rng, cases=15)
    db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_minute_of_many_keys_is_spread_over_several_flushes_and_counted_all_along(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A spread moves at most twice the rows its flush wrote (at least 1,000): a minute of
    thousands of keys goes over the next flushes, not in one transaction that would hold up
    the writer; the stats count every request meanwhile."""
    rng = random.Random(23)
    t0 = (time.time() // 86400 - 2) * 86400 + 600 * 60
    crowd = _records(1500, t0, rng)
    for i, r in enumerate(crowd):  # one minute, 1,500 keys
        r.key, r.started = f"key-{i}", t0 + rng.uniform(0, 59.9)
    (later,) = _records(1, t0, rng)
    later.request_id, later.started = "later", t0 + 90
    db, dsn = _open(backend, tmp_path, request)
    ledger = Ledger(db, flush_interval=3600, request_log=RequestLog())

    def pending() -> collections.Counter[int]:
        return collections.Counter(k[3] for k in _stored_rollups(backend, tmp_path / "s.db", dsn) if k[1] == 0)

    for r in crowd:
        ledger.record(r)
    ledger.flush()
    minute = int(t0 // 60)
    in_minute = pending()[minute]
    assert in_minute > 1500
    ledger.record(later)
    ledger.flush()
    assert pending()[minute] == in_minute - 1000, "a thousand moved; the rest wait for the next flush"
    _check(db, [*crowd, later], t0, rng, cases=10)
    ledger.flush()  # nothing new: it goes on spreading
    assert pending() == collections.Counter({minute + 1: pending()[minute + 1]})
    _check(db, [*crowd, later], t0, rng, cases=10)
    ledger.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_database_an_older_release_wrote_counts_its_rows_and_the_new_ones(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An older release added every batch at the five levels itself (no pending rows); this one
    adds pending rows beside them and spreads them into the same rows: the stats count both."""
    rng = random.Random(24)
    t0 = (time.time() // 86400 - 2) * 86400 + 113 * 60
    recs = _records(1600, t0, rng)
    old, new = recs[:800], recs[800:]
    db, dsn = _open(backend, tmp_path, request)
    ledger = Ledger(db, flush_interval=3600, request_log=RequestLog())
    for i in range(0, len(old), 200):  # as the older release wrote them: every level, from Python
        held = [ledger._rows(r, f"old-{r.request_id}") for r in old[i : i + 200]]
        db.write(_Held(f"old-{i}", held, []).batch(True, rollup.LEVELS))
    assert {k[1] for k in _stored_rollups(backend, tmp_path / "s.db", dsn)} == set(rollup.LEVELS)
    _check(db, old, t0, rng, cases=10)
    for i, r in enumerate(new):
        ledger.record(r)
        if i % 150 == 0:
            ledger.flush()
    ledger.flush()
    assert any(k[1] == rollup.PENDING for k in _stored_rollups(backend, tmp_path / "s.db", dsn))
    _check(db, recs, t0, rng, cases=20)
    ledger.close()
    db = SqliteBackend(tmp_path / "s.db") if backend == "sqlite" else PostgresBackend(dsn)
    _check(db, recs, t0, rng, cases=10)
    db.close()


def test_postgres_instances_writing_and_spreading_at_once_add_up_exactly(pg_schema_dsn: str) -> None:
    """Several instances on one database, each spreading its batches' pending rows as its
    minutes advance (their spreads and batches meeting on the same rows): every request is
    counted once, at every level."""
    dsn = pg_schema_dsn
    rng = random.Random(22)
    t0 = (time.time() // 86400 - 2) * 86400 + 77 * 60
    recs = sorted(_records(3000, t0, rng), key=lambda r: r.started)
    ledgers = [Ledger(PostgresBackend(dsn), flush_interval=3600, request_log=RequestLog()) for _ in range(3)]
    errors: list[BaseException] = []

    def feed(ledger: Ledger, part: list[RequestRecord], seed: int) -> None:
        try:
            local = random.Random(seed)
            for r in part:
                ledger.record(r)
                if local.random() < 0.05:
                    ledger.flush()
            ledger.close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=feed, args=(ledger, recs[i::3], i)) for i, ledger in enumerate(ledgers)
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and all(ledger.written == 1000 for ledger in ledgers)
    stored = _stored_rollups("postgres", Path(), dsn)
    built = {r[:4]: r[4:] for r in rollup.aggregate((r, r.cost_usd) for r in recs)}
    assert stored.keys() == built.keys(), "nothing left pending after the graceful stops; nothing twice"
    for key, values in built.items():
        assert stored[key][:4] + stored[key][6:] == values[:4] + values[6:], key
    db = PostgresBackend(dsn)
    _check(db, recs, t0, rng, cases=20)
    db.close()


def test_levels_added_later_are_built_from_the_existing_rows(tmp_path: Path) -> None:
    """A database from before the 5-, 15- and 360-minute rows: they are built once at start."""
    rng = random.Random(12)
    t0 = (time.time() // 86400 - 2) * 86400 + 31 * 60
    recs = _records(1500, t0, rng)
    path = tmp_path / "old.db"
    _write(Ledger(SqliteBackend(path), flush_interval=60, request_log=RequestLog()), recs, rng)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM request_rollups WHERE res NOT IN (1, 60)")
        conn.execute("DROP TABLE request_rollup_levels")
    conn.close()
    db = SqliteBackend(path)  # the start-up builds the missing levels...
    _check(db, recs, t0, rng, cases=25)
    db.close()
    db = SqliteBackend(path)  # ...once: a second start adds nothing
    _check(db, recs, t0, rng, cases=5)
    db.close()


def test_postgres_stats_equal_the_raw_aggregation_and_levels_are_built_once(pg_schema_dsn: str) -> None:
    dsn = pg_schema_dsn
    rng = random.Random(13)
    t0 = (time.time() // 86400 - 2) * 86400 + 77 * 60
    recs = _records(1500, t0, rng)
    _write(Ledger(PostgresBackend(dsn), flush_interval=60, request_log=RequestLog()), recs, rng)
    db = PostgresBackend(dsn)
    _check(db, recs, t0, rng, cases=25)
    db.close()
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DELETE FROM request_rollups WHERE res NOT IN (1, 60)")
        c.execute("DROP TABLE request_rollup_levels")
    for _ in range(2):
        db = PostgresBackend(dsn)
        _check(db, recs, t0, rng, cases=10)
        db.close()


def test_over_the_backlog_bound_the_oldest_lose_their_log_row_not_their_spend_or_stats(tmp_path: Path) -> None:
    rng = random.Random(14)
    t0 = (time.time() // 3600 - 3) * 3600
    recs = _records(700, t0, rng)
    path = tmp_path / "b.db"
    ledger = Ledger(SqliteBackend(path), flush_interval=3600, request_log=RequestLog(max_backlog=500))
    for r in recs:
        ledger.record(r)
    assert ledger.flush() == 700
    assert ledger.log_dropped == 200
    for r in recs[:50]:  # under the bound: nothing dropped
        r.request_id += "-again"
        ledger.record(r)
    ledger.flush()
    assert ledger.log_dropped == 200
    ledger.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM spend").fetchone()[0] == 750
    logged = {row[0] for row in conn.execute("SELECT id FROM requests")}
    assert len(logged) == 550 and {r.request_id for r in recs[200:]} <= logged, "the newest kept their rows"
    conn.close()
    db = SqliteBackend(path)
    got = query.stats(db, {"since": str(t0 - 60), "until": str(t0 + HOURS * 3600 + 60)}, now=t0 + HOURS * 3600)
    assert got["totals"]["requests"] == 750, "the stats still count every request"
    db.close()


def test_retention_drops_the_rollup_rows_wholly_before_the_cutoff_at_every_level(tmp_path: Path) -> None:
    rng = random.Random(15)
    now = time.time()
    old = _records(400, now - 5 * 86400, rng)  # 14 hours of traffic, five days ago
    recent = _records(400, now - HOURS * 3600 - 600, rng)
    for i, r in enumerate(recent):
        r.request_id = f"new-{i}"
    path = tmp_path / "p.db"
    ledger = Ledger(SqliteBackend(path), flush_interval=3600, request_log=RequestLog(retention_days=2))
    for r in old + recent:
        ledger.record(r)
    ledger.flush()
    ledger.maintain(now)
    ledger.close()
    first_kept = int((now - 2 * 86400) // 60)
    conn = sqlite3.connect(path)
    gone = conn.execute("SELECT COUNT(*) FROM request_rollups WHERE minute + res <= ?", (first_kept,))
    assert gone.fetchone()[0] == 0
    for res in rollup.LEVELS:  # what is recent is kept, at every level
        total = conn.execute("SELECT SUM(requests) FROM request_rollups WHERE dim = 'none' AND res = ?", (res,))
        assert total.fetchone()[0] == len(recent), res
    conn.close()
    db = SqliteBackend(path)
    _check(db, recent, now - HOURS * 3600 - 600, rng, cases=10)
    db.close()


def test_postgres_reads_keep_their_connection_and_drop_a_failed_one(pg_schema_dsn: str) -> None:
    """A new PostgreSQL connection costs more than most stats queries: reads reuse one."""
    import psycopg

    dsn = pg_schema_dsn
    db = PostgresBackend(dsn)
    assert db.query("SELECT pg_backend_pid()", []) == db.query("SELECT pg_backend_pid()", [])
    with pytest.raises(psycopg.errors.UndefinedTable):
        db.query("SELECT 1 FROM no_such_table", [])
    # The connection that failed is closed, not reused; the next read gets a working one.
    assert db.query("SELECT 2", []) == [(2,)]
    db.close()
