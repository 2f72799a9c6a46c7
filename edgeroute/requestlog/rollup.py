"""Per-minute and per-hour aggregates of the request log, with latency and TTFT histograms.

`/admin/stats` must answer over a day of a million requests in well under a second, so it
never reads the raw rows: every request is added into one row per (dimension,
resolution, value, minute) — e.g. ("model", 1, "gpt-4o", 29_000_123) for a minute and
("model", 60, "gpt-4o", 29_000_100) for its hour — whose counters and histogram buckets are
plain integer columns, added by an upsert. Adding is exact and commutes, so several
instances writing one PostgreSQL database, late records (a long stream lands minutes
after it started) and retried batches all add up correctly without any in-memory state.
Rows are kept at five resolutions (`LEVELS`: 1, 5, 15, 60 and 360 minutes, each aligned
to its own length), and a query covers its window with the coarsest blocks that fit
(`cover`): a day reads three or four 6-hour rows per value and a handful of finer ones at
its ragged ends (at most 32, about 17 on average, where minutes and hours alone took up
to 142), and 5-minute buckets read 5-minute rows. The cost of a query is the number of
rows it sums, each ~200 columns wide, so this is what keeps `/admin/stats` fast.

A batch does not add itself into the levels: it adds one row per (dimension, value, minute)
at `PENDING` (res 0), an upsert each rather than five (each upsert of a ~200-column row
costs ~10 µs of the writer's CPU; with 200 keys in 20 teams a batch of 500 has ~430 such
rows, and the five upserts of each were half of the writer's CPU). Once a minute (when a
batch holds a newer minute) the writer *spreads* the pending rows of the minutes before it
over every level and deletes them, in one transaction (`spread_sql`; with PostgreSQL one
instance at a time, and rows a batch in flight holds are left for the next time). A request
is thus in a pending row or in the levels, never both nor neither, so a query reads its
window's pending rows beside the levels' (the last minute or two, and late records not
spread yet) and stays exact at every moment. A graceful stop spreads every pending row, so
an older release, which reads the levels alone, finds everything after a downgrade; during
a rolling upgrade an older instance's stats miss the newer ones' last minute or two.

Percentiles come from the histograms: buckets grow by a factor of 1.15 from 0.5 ms
(100 buckets reach ~8 minutes), and a percentile is reported as the geometric middle of
the bucket that holds its rank, so it is within ±7.3 % (sqrt(1.15) - 1) of the exact
nearest-rank percentile of the stored latencies. Counts, tokens and costs are exact.

Dimensions: the request's model, rule, policy, task, variant, team and key (one row per
request each) and its deployment and provider (one row per *attempt*: a deployment's
requests, errors and latencies are those of the calls it received, so a failed attempt that
failed over still counts against it). "none" aggregates every request.

A request with a team is counted once more per `TEAM_DIMS` dimension under that dimension
within its team: dimension "team.model", value `team_value(team, model)`, so that a team's
stats by model, rule, deployment ... read that team's rows alone (`team_prefix` selects them;
the length in front makes it unambiguous whatever characters a team name holds). Requests
without a team add no such rows.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import Any

from edgeroute.accounting import UNROUTED, RequestRecord

REQUEST_DIMS = ("model", "rule", "policy", "task", "variant", "team", "key", "cache")  # cache: hit, miss, ...
ATTEMPT_DIMS = ("deployment", "provider")
# The groupings a team's own stats offer (beside its totals, the "team" row itself).
TEAM_REQUEST_DIMS = ("model", "rule", "policy", "task", "variant")
TEAM_DIMS = (*TEAM_REQUEST_DIMS, *ATTEMPT_DIMS)
DIMS = ("none", *REQUEST_DIMS, *ATTEMPT_DIMS, *(f"team.{d}" for d in TEAM_DIMS))

BUCKETS = 100
LOWEST_MS = 0.5
RATIO = 1.15
MAX_RELATIVE_ERROR = math.sqrt(RATIO) - 1  # 0.0724
_LOG_RATIO = math.log(RATIO)

LAT = tuple(f"l{i}" for i in range(BUCKETS))
TTFT = tuple(f"t{i}" for i in range(BUCKETS))
COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd", "baseline_cost_usd")
KEY = ("dim", "res", "value", "minute")  # res: the row's length in minutes, one of LEVELS
MINUTE, HOUR = 1, 60
PENDING = 0  # a minute's rows not spread over the levels yet (see the module's docstring)
LEVELS = (1, 5, 15, 60, 360)  # each divides the next: a coarser row is a sum of finer ones
_BACKFILL_FROM = {5: 1, 15: 5, 360: 60}  # levels added after the first release: built from a finer one
COLUMNS = (*KEY, *COUNTERS, *LAT, *TTFT)


def bucket_by_log(ms: float) -> int:
    """The histogram bucket of a duration in milliseconds: its definition (`bucket` finds it faster)."""
    if not ms >= LOWEST_MS:  # also NaN
        return 0
    return min(BUCKETS - 1, 1 + int(math.log(ms / LOWEST_MS) / _LOG_RATIO))


def _first_of(i: int) -> float:
    """The least duration `bucket_by_log` puts in bucket `i` or above (1 <= i < BUCKETS)."""
    x = LOWEST_MS * RATIO ** (i - 1)
    while bucket_by_log(x) >= i and x > LOWEST_MS:
        x = math.nextafter(x, 0.0)
    while bucket_by_log(x) < i:
        x = math.nextafter(x, math.inf)
    return x


# Where each bucket after the first starts, to the float: found once from the definition, so
# that a bisection gives its bucket exactly (a C call, where the logarithm took a Python frame,
# a division and a `min`: the writer does this two or three times a record).
_STARTS = [_first_of(i) for i in range(1, BUCKETS)]


def bucket(ms: float) -> int:
    """The histogram bucket of a duration in milliseconds (`bucket_by_log`'s, found by bisection)."""
    return bisect.bisect_right(_STARTS, ms) if ms >= LOWEST_MS else 0  # NaN: 0


def bucket_value(i: int) -> float:
    """The value reported for bucket `i`: its geometric middle (the first bucket: half its top)."""
    if i == 0:
        return LOWEST_MS / 2
    return LOWEST_MS * RATIO ** (i - 1) * math.sqrt(RATIO)


def percentile(hist: Sequence[int], q: float) -> float | None:
    """The nearest-rank `q` quantile (0 < q ≤ 1) of a histogram; None when it is empty."""
    n = sum(hist)
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for i, c in enumerate(hist):
        seen += c
        if seen >= rank:
            return round(bucket_value(i), 3)
    return round(bucket_value(len(hist) - 1), 3)  # pragma: no cover - the loop always reaches rank


# A row's values after its key, as one flat list added to in place: the counters, then the
# latency and TTFT buckets (what `COLUMNS` lists after `KEY`).
_LAT0 = len(COUNTERS)
_TTFT0 = _LAT0 + BUCKETS
_ZERO: list[Any] = [0, 0, 0, 0, 0.0, 0.0, *([0] * (2 * BUCKETS))]
_SIG_DIMS = ("none", *REQUEST_DIMS)
_TEAM_SIG_DIMS = tuple(f"team.{d}" for d in TEAM_REQUEST_DIMS)  # team_dim(d)
_TEAM_ATTEMPT_DIMS = tuple(f"team.{d}" for d in ATTEMPT_DIMS)


def team_dim(dim: str) -> str:
    """The dimension of `dim` within a team ("model" -> "team.model")."""
    return f"team.{dim}"


def team_prefix(team: str) -> str:
    """What every value of a team's rows starts with, and no other team's does."""
    return f"{len(team)}:{team}:"


def team_value(team: str, value: str) -> str:
    return team_prefix(team) + value


def aggregate(records: Iterable[tuple[RequestRecord, float]], levels: Sequence[int] = LEVELS) -> list[tuple[Any, ...]]:
    """Rollup rows for a batch of (record, baseline cost) pairs: one per (dim, value, minute)
    at each of `levels` (`LEVELS`), or the minute rows alone labelled with the one level
    given (`(PENDING,)`: what a batch writes, spread over the levels later by `spread_sql`).

    The writer thread runs this for every record while it holds the GIL, so a record is
    added once, into the sum of its signature (its minute and every dimension's value; an
    attempt's: its minute, deployment, provider and team), histograms kept sparse; then
    each signature's sum goes into its rows (13 of them for a request with a team). A batch
    of one tenant's traffic has a few dozen signatures; even with 200 keys in 20 teams
    about two records share one, and this halves the per-record work."""
    sigs: dict[tuple[Any, ...], list[Any]] = {}
    attempt_sigs: dict[tuple[Any, ...], list[Any]] = {}
    sig_get, attempt_get = sigs.get, attempt_sigs.get
    starts, find = _STARTS, bisect.bisect_right  # `bucket`, inline
    for rec, baseline in records:
        minute = int(rec.started // 60)
        u = rec.usage
        cost = rec.cost_usd
        team = rec.team
        # A model no route serves is a client's free text: one value for all, or a client
        # naming a new model with each refused request grows the rollups without bound.
        model = rec.model if rec.route else UNROUTED
        sig = (minute, model, rec.rule, rec.policy, rec.task, rec.variant, team, rec.key, rec.cache)
        acc = sig_get(sig)
        if acc is None:
            acc = sigs[sig] = [0, 0, 0, 0, 0.0, 0.0, {}]
        acc[0] += 1
        if rec.status != 200:
            acc[1] += 1
        if u is not None:
            acc[2] += int(u.prompt_tokens)
            acc[3] += int(u.completion_tokens)
        acc[4] += cost
        acc[5] += baseline
        hist = acc[6]
        ms = rec.latency_ms
        i = _LAT0 + (find(starts, ms) if ms >= LOWEST_MS else 0)
        hist[i] = hist.get(i, 0) + 1
        if rec.ttft_ms is not None:
            ms = rec.ttft_ms
            i = _TTFT0 + (find(starts, ms) if ms >= LOWEST_MS else 0)
            hist[i] = hist.get(i, 0) + 1
        # The serving attempt carries the request's savings, so that they add up per deployment.
        extra = baseline - cost
        for a in rec.attempts:
            ok = a.outcome == "success"
            attempt_sig = (minute, a.deployment, a.provider, team)
            acc = attempt_get(attempt_sig)
            if acc is None:
                acc = attempt_sigs[attempt_sig] = [0, 0, 0, 0, 0.0, 0.0, {}]
            acc[0] += 1
            if not ok:
                acc[1] += 1
            if (au := a.usage) is not None:
                acc[2] += int(au.prompt_tokens)
                acc[3] += int(au.completion_tokens)
            acc[4] += a.cost_usd
            acc[5] += a.cost_usd + extra if ok and a.deployment == rec.deployment else a.cost_usd
            hist = acc[6]
            ms = a.latency_ms
            i = _LAT0 + (find(starts, ms) if ms >= LOWEST_MS else 0)
            hist[i] = hist.get(i, 0) + 1
            if a.ttft_ms is not None:
                ms = a.ttft_ms
                i = _TTFT0 + (find(starts, ms) if ms >= LOWEST_MS else 0)
                hist[i] = hist.get(i, 0) + 1
    out: dict[tuple[str, str, int], list[Any]] = {}
    get = out.get

    def add(keys: list[tuple[str, str, int]], acc: list[Any]) -> None:
        n, errors, p, c, cost, base, hist = acc
        buckets = hist.items()
        for key in keys:
            r = get(key)
            if r is None:
                r = out[key] = _ZERO.copy()
            r[0] += n
            r[1] += errors
            r[2] += p
            r[3] += c
            r[4] += cost
            r[5] += base
            for i, k in buckets:
                r[i] += k

    for (minute, *values), acc in sigs.items():
        keys = [(dim, value or "", minute) for dim, value in zip(_SIG_DIMS, ("*", *values), strict=True)]
        if team := values[5]:
            tp = team_prefix(team)
            keys += [(dim, tp + (value or ""), minute) for dim, value in zip(_TEAM_SIG_DIMS, values[:5], strict=True)]
        add(keys, acc)
    for (minute, dep, provider, team), acc in attempt_sigs.items():
        keys = [("deployment", dep or "", minute), ("provider", provider or "", minute)]
        if team:
            tp = team_prefix(team)
            keys += [(_TEAM_ATTEMPT_DIMS[0], tp + (dep or ""), minute),
                     (_TEAM_ATTEMPT_DIMS[1], tp + (provider or ""), minute)]  # fmt: skip
        add(keys, acc)
    rows = [(d, levels[0], v, m, *r) for (d, v, m), r in out.items()]
    finer = out
    for res in LEVELS[1:] if len(levels) > 1 else ():  # each level from the one below it: fewer rows to merge each time
        coarser: dict[tuple[str, str, int], list[Any]] = {}
        for (dim, value, minute), r in finer.items():
            block = (dim, value, minute - minute % res)
            into = coarser.get(block)
            # A new list when two rows meet: a finer level's lists are never changed.
            coarser[block] = r if into is None else [x + y for x, y in zip(into, r, strict=True)]
        rows += [(d, res, v, m, *r) for (d, v, m), r in coarser.items()]
        finer = coarser
    return rows


def cover(first: int, last: int, step: int = 0) -> list[tuple[int, int, int]]:
    """[first, last) in minutes as (res, start, end) spans of whole rows, coarsest first.

    Only levels that divide `step` (a bucket's length in minutes; 0: no buckets) are used,
    so that no row straddles two buckets."""
    levels = [r for r in reversed(LEVELS) if step == 0 or step % r == 0]
    out: list[tuple[int, int, int]] = []

    def fill(a: int, b: int, i: int) -> None:
        while a < b:
            res = levels[i]
            lo, hi = -(-a // res) * res, b // res * res
            if lo < hi:
                out.append((res, lo, hi))
                fill(a, lo, i + 1)  # the ragged ends, with finer rows
                fill(hi, b, i + 1)
                return
            i += 1

    fill(first, last, 0)
    return out


def schema(dialect: str) -> list[str]:
    real = "DOUBLE PRECISION"
    retired = "DROP TABLE IF EXISTS request_rollup"  # the first layout (minutes only), briefly released
    hist = ",\n    ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in (*LAT, *TTFT))
    tail = " WITHOUT ROWID" if dialect == "sqlite" else ""
    return [
        retired,
        f"""CREATE TABLE IF NOT EXISTS request_rollups (
    dim TEXT NOT NULL,
    res INTEGER NOT NULL,
    value TEXT NOT NULL,
    minute BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost_usd {real} NOT NULL,
    baseline_cost_usd {real} NOT NULL,
    {hist},
    PRIMARY KEY (dim, res, minute, value)
){tail}""",
        # The levels this database's rows are kept at. A level added by a later release is
        # built once from a finer one, in the schema's transaction (under PostgreSQL's start-up
        # lock), before this instance writes anything; its mark says it is done.
        "CREATE TABLE IF NOT EXISTS request_rollup_levels (res INTEGER NOT NULL PRIMARY KEY)",
        *(backfill_sql(res) for res in LEVELS),
        *(f"INSERT INTO request_rollup_levels (res) VALUES ({res}) ON CONFLICT (res) DO NOTHING" for res in LEVELS),
    ]


def backfill_sql(res: int) -> str:
    """Builds level `res` from the level below it, unless it is marked as kept already."""
    source = _BACKFILL_FROM.get(res)
    if source is None:  # kept from the first release on: nothing to build
        return "SELECT 1"
    cols = ", ".join(COLUMNS)
    block = f"(minute / {res}) * {res}"
    sums = ", ".join(f"SUM({c})" for c in (*COUNTERS, *LAT, *TTFT))
    done = f"EXISTS (SELECT 1 FROM request_rollup_levels WHERE res = {res})"
    return (
        f"INSERT INTO request_rollups ({cols}) SELECT dim, {res}, value, {block}, {sums} FROM request_rollups "
        f"WHERE res = {source} AND NOT {done} GROUP BY dim, value, {block}"
    )


STAGE = "rollup_batch"


def stage_schema(dialect: str) -> str | None:
    """PostgreSQL: a temporary table (the writer's connection's own, typed as the rollups,
    emptied by each commit) that a batch's rows are copied into. SQLite needs none."""
    if dialect == "postgres":
        return f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} (LIKE request_rollups) ON COMMIT DELETE ROWS"
    return None


def _adds() -> str:
    return ", ".join(f"{c} = request_rollups.{c} + excluded.{c}" for c in (*COUNTERS, *LAT, *TTFT))


def batch_sql(mark: str, dialect: str = "sqlite") -> list[str]:
    """A batch's rollup rows (each added into its own row: the batch's `PENDING` rows, or rows
    at every level where the writer built them all), in the batch's transaction, in order.
    The first statement takes the rows one by one. SQLite: that is the upsert itself. PostgreSQL:
    they go into the stage (copied in, in fact), then one upsert adds them up; in key order, so
    that two instances' batches lock their common rows in the same order (no deadlock)."""
    cols = ", ".join(COLUMNS)
    upsert = f"ON CONFLICT (dim, res, minute, value) DO UPDATE SET {_adds()}"
    if dialect != "postgres":
        return [f"INSERT INTO request_rollups ({cols}) VALUES ({', '.join([mark] * len(COLUMNS))}) {upsert}"]
    return [
        f"INSERT INTO {STAGE} ({cols}) VALUES ({', '.join([mark] * len(COLUMNS))})",
        f"INSERT INTO request_rollups ({cols}) SELECT {cols} FROM {STAGE} ORDER BY dim, res, minute, value {upsert}",
        f"DELETE FROM {STAGE}",
    ]


_SPREAD_LOCK = 0x65646765_726F7574  # PostgreSQL advisory lock: one instance spreads at a time
SPREAD = "rollup_spread"  # SQLite: a temporary table, the keys of the pending rows one spread moves
SPREAD_SCHEMA = f"CREATE TEMP TABLE IF NOT EXISTS {SPREAD} (dim TEXT, minute INTEGER, value TEXT)"


def spread_sql(mark: str, dialect: str = "sqlite") -> list[str]:
    """Statements that move at most `limit` of the `PENDING` rows of the minutes before
    `before` into every level and delete them, in one transaction.

    PostgreSQL: one statement, bound (before, limit), that answers how many it moved. Rows a
    batch in flight holds are skipped (left for the next time), so a spread never waits for a
    batch; an advisory lock keeps two instances' spreads from meeting on the levels' rows in
    different orders (the second moves nothing); a block's minutes are summed first, as
    PostgreSQL refuses to update a row twice in a statement.

    SQLite: the transaction must start IMMEDIATE (no other writer between the reads and the
    delete). The second statement, bound (before, limit), picks the rows into `SPREAD` (its
    row count: how many); the others take no parameters. An upsert there applies row by row,
    so the minutes of one block add up without a GROUP BY.

    Pending rows are found `dim` by `dim` (the primary key's first column), never by a scan
    of the whole table."""
    cols = ", ".join(COLUMNS)
    names = (*COUNTERS, *LAT, *TTFT)
    dims = ", ".join(f"'{d}'" for d in DIMS)
    pending = f"dim IN ({dims}) AND res = {PENDING} AND minute < {mark}"
    upsert = f"ON CONFLICT (dim, res, minute, value) DO UPDATE SET {_adds()}"
    if dialect == "postgres":
        levels = ", ".join(f"({r})" for r in LEVELS)
        block = "p.minute - mod(p.minute, lv.level)"  # `%`: a placeholder to psycopg
        sums = ", ".join(f"SUM(p.{c})" for c in names)
        return [
            f"WITH p AS (DELETE FROM request_rollups WHERE (dim, res, minute, value) IN ("
            f"SELECT dim, res, minute, value FROM request_rollups WHERE {pending} "
            f"AND (SELECT pg_try_advisory_xact_lock({_SPREAD_LOCK})) LIMIT {mark} FOR UPDATE SKIP LOCKED) "
            f"RETURNING *), "
            f"added AS (INSERT INTO request_rollups ({cols}) SELECT p.dim, lv.level, p.value, {block}, {sums} "
            f"FROM p CROSS JOIN (VALUES {levels}) AS lv(level) GROUP BY p.dim, lv.level, p.value, {block} "
            f"ORDER BY p.dim, lv.level, {block}, p.value {upsert}) "
            f"SELECT COUNT(*) FROM p"
        ]
    picked = f"SELECT dim, {PENDING} AS res, minute, value FROM temp.{SPREAD}"
    return [
        f"DELETE FROM temp.{SPREAD}",
        f"INSERT INTO temp.{SPREAD} (dim, minute, value) SELECT dim, minute, value FROM request_rollups "
        f"WHERE {pending} LIMIT {mark}",
        *(
            f"INSERT INTO request_rollups ({cols}) SELECT r.dim, {res}, r.value, r.minute - r.minute % {res}, "
            f"{', '.join(f'r.{c}' for c in names)} FROM temp.{SPREAD} AS s JOIN request_rollups AS r "
            f"ON r.dim = s.dim AND r.res = {PENDING} AND r.minute = s.minute AND r.value = s.value "
            f"WHERE true {upsert}"
            for res in LEVELS
        ),
        f"DELETE FROM request_rollups WHERE (dim, res, minute, value) IN ({picked})",
    ]
