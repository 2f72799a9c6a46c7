"""Reading the request log: filtered pages of requests, one request, and stats.

Every parameter is checked before any SQL is built, and a bad one raises `BadParam`
naming it. Filter values are bound parameters; column names come from fixed tables here,
never from the request. Used by the HTTP API and the CLI alike.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import re
import time
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

from edgeroute.governance.key_names import key_names
from edgeroute.requestlog import rollup
from edgeroute.requestlog.content import error_text

MAX_PAGE = 500
DEFAULT_PAGE = 50
MAX_STATS_POINTS = 10_000  # groups are few; buckets x groups stay a dashboard's worth
MAX_BUCKET_S = 3660 * 86400  # the longest retention; a longer bucket would overflow the answer's 64-bit `t`


class Readable(Protocol):
    dialect: str

    def query(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]: ...


class BadParam(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


_RELATIVE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")  # ASCII digits: `\d` takes "٣" too
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(name: str, value: str, now: float) -> float:
    """Epoch seconds, a duration before now (`15m`, `24h`, `7d`) or an ISO date/time (UTC by default)."""
    v = value.strip()
    if m := _RELATIVE.fullmatch(v):
        # Further back than 1970 (a thousand digits make -inf) means from the start.
        return max(0.0, now - float(m.group(1)) * _UNITS[m.group(2)])
    t = _absolute(name, value, v)
    if not math.isfinite(t) or not 0 <= t < 1e11:
        raise BadParam(name, f"{value!r} is out of range")
    return t


def _absolute(name: str, value: str, v: str) -> float:
    try:
        return float(v)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(v)
        except ValueError:
            raise BadParam(name, f"{value!r} is not a time: use epoch seconds, 15m, 24h, 7d or an ISO date") from None
        return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def time_range(q: Mapping[str, str], now: float, default_since: float | None) -> tuple[float | None, float]:
    since = parse_time("since", q["since"], now) if q.get("since") else default_since
    until = parse_time("until", q["until"], now) if q.get("until") else now
    if since is not None and since >= until:
        raise BadParam("since", "must be before until")
    return since, until


def _check_known(q: Mapping[str, str], known: frozenset[str]) -> None:
    for k, v in q.items():
        if k not in known:
            raise BadParam(k, f"unknown parameter; known: {', '.join(sorted(known))}")
        if "\x00" in v:  # PostgreSQL refuses NUL in text (a 500), SQLite would take it: one answer
            raise BadParam(k, "contains a NUL character")


def _whole(value: str) -> int | None:
    """The whole number `value` writes in ASCII digits, else None: `str.isdigit` also takes "²",
    which `int` then refuses (a 500), and so does `int` past 4,300 digits (a 500 too): a number
    that long is read as `_PAST_ANY_BOUND`."""
    if not (value.isascii() and value.isdigit()):
        return None
    digits = value.lstrip("0") or "0"
    return int(digits) if len(digits) <= 30 else _PAST_ANY_BOUND


_PAST_ANY_BOUND = 10**30


def _number(name: str, value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise BadParam(name, f"{value!r} is not a number") from None
    if not math.isfinite(n) or n < 0:
        raise BadParam(name, f"{value!r} must be a non-negative number")
    return n


# -- requests --------------------------------------------------------------------------

_EXACT = {  # parameter -> column, matched with =
    "model": "model",
    "deployment": "deployment",
    "key": "key_id",
    "team": "team",
    "error_class": "error_class",
    "rule": "rule",
}
REQUEST_PARAMS = frozenset({*_EXACT, "since", "until", "status", "min_latency_ms", "min_cost_usd", "limit", "cursor"})
_SUMMARY = (
    "id", "correlation_id", "ts", "key_id", "team", "user_id", "model", "route", "rule", "deployment", "provider",
    "status", "outcome", "error_class", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens",
    "tokens_estimated", "cost_usd", "cache", "attempts", "stream",
)  # fmt: skip
_DETAIL = (*_SUMMARY, "policy", "task", "difficulty", "variant", "queue_ms", "baseline_cost_usd", "detail", "content")
_RENAME = {"key_id": "key", "user_id": "user"}


def _status(value: str) -> tuple[str, list[Any]]:
    v = value.strip().lower()
    if v == "ok":
        return "status = 200", []
    if v == "error":
        return "status <> 200", []
    if re.fullmatch(r"[1-5]xx", v):
        lo = int(v[0]) * 100
        return "status >= ? AND status < ?", [lo, lo + 100]
    if re.fullmatch(r"[0-9]{1,3}", v):
        return "status = ?", [int(v)]
    raise BadParam("status", f"{value!r}: use a status code (429), a class (4xx, 5xx), ok or error")


def _encode_cursor(ts: float, rid: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([ts, rid])).decode().rstrip("=")


def _decode_cursor(value: str) -> tuple[float, str]:
    try:
        ts, rid = orjson.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        if isinstance(ts, (int, float)) and isinstance(rid, str) and "\x00" not in rid:
            return float(ts), rid
    except (ValueError, TypeError, orjson.JSONDecodeError):
        pass
    raise BadParam("cursor", "not a cursor this API returned")


def _summary(names: tuple[str, ...], r: tuple[Any, ...]) -> dict[str, Any]:
    out = {_RENAME.get(n, n): v for n, v in zip(names, r, strict=True)}
    out["stream"] = bool(out["stream"])
    out["tokens_estimated"] = bool(out["tokens_estimated"])
    return out


def list_requests(
    db: Readable, q: Mapping[str, str], now: float | None = None, tenant: str | None = None
) -> dict[str, Any]:
    """`{"data": [summary], "next_cursor": str | None}`, newest first. With `tenant`, only
    that team's requests: a condition of the query itself, so that pages, their cursors and
    `limit` see no other team's rows (a `team=` filter for another team finds nothing)."""
    _check_known(q, REQUEST_PARAMS)
    now = time.time() if now is None else now
    since, until = time_range(q, now, None)
    where: list[str] = ["ts < ?"]
    params: list[Any] = [until]
    if tenant is not None:
        where.append("team = ?")
        params.append(tenant)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    for name, col in _EXACT.items():
        if (v := q.get(name)) is not None:
            where.append(f"{col} = ?")
            params.append(v)
    if (v := q.get("status")) is not None:
        cond, extra = _status(v)
        where.append(cond)
        params += extra
    if (v := q.get("min_latency_ms")) is not None:
        where.append("latency_ms >= ?")
        params.append(_number("min_latency_ms", v))
    if (v := q.get("min_cost_usd")) is not None:
        where.append("cost_usd >= ?")
        params.append(_number("min_cost_usd", v))
    limit = DEFAULT_PAGE
    if (v := q.get("limit")) is not None:
        n = _whole(v)
        if n is None or not 1 <= n <= MAX_PAGE:
            raise BadParam("limit", f"{v[:40]!r}: must be an integer from 1 to {MAX_PAGE}")
        limit = n
    if (v := q.get("cursor")) is not None:
        ts, rid = _decode_cursor(v)
        where.append("(ts < ? OR (ts = ? AND id < ?))")
        params += [ts, ts, rid]
    sql = (
        f"SELECT {', '.join(_SUMMARY)} FROM requests WHERE {' AND '.join(where)} "
        f"ORDER BY ts DESC, id DESC LIMIT {limit + 1}"
    )
    found = db.query(sql, params)
    data = _named(db, [_summary(_SUMMARY, r) for r in found[:limit]], "key", "key_name")
    more = len(found) > limit
    return {"data": data, "next_cursor": _encode_cursor(data[-1]["ts"], data[-1]["id"]) if more else None}


def _named(db: Readable, rows: list[dict[str, Any]], field: str, name: str) -> list[dict[str, Any]]:
    """Each row with `name`, the name its key (`field`) was given, beside its id (None: a config
    key, whose id is its name, or a managed key given none), as spend by key shows it."""
    names = key_names(db, [k for r in rows if isinstance(k := r.get(field), str)])
    for r in rows:
        r[name] = names.get(r[field]) if isinstance(r.get(field), str) else None
    return rows


def get_request(db: Readable, rid: str, with_content: bool, tenant: str | None = None) -> dict[str, Any] | None:
    """The full record: summary, explanation, attempts timeline, and content (when stored and
    allowed). With `tenant`, another team's request is not found, as an unknown id is not."""
    where, params = ("id = ? AND team = ?", [rid, tenant]) if tenant is not None else ("id = ?", [rid])
    found = db.query(f"SELECT {', '.join(_DETAIL)} FROM requests WHERE {where}", params)
    if not found:
        return None
    out = _named(db, [_summary(_DETAIL, found[0])], "key", "key_name")[0]
    detail = orjson.loads(out.pop("detail"))
    raw_content = out.pop("content")
    out["attempt_count"] = out["attempts"]
    out.update(
        tags=detail.get("tags", []),
        reasons=detail.get("reasons", []),
        admission=detail.get("admission"),
        attempts=detail.get("attempts", []) if with_content else _without_quotes(detail.get("attempts", [])),
        priority=detail.get("priority"),
        cache_writer=_writer_in_view(db, detail.get("cache_writer"), tenant),
    )
    skipped = detail.get("skipped", [])  # deployments that could not read it, and why (a refusal, quoted as errors are)
    out["skipped"] = skipped if with_content else [{**k, "why": error_text(k["why"], "none")} for k in skipped]
    if raw_content is None:
        out["content"] = None
    elif with_content:
        c = orjson.loads(raw_content)
        out["content"] = {"request": c.get("request"), "response": c.get("response"), "mode": c.get("mode"),
                          "truncated": c.get("truncated", False)}  # fmt: skip
    else:
        out["content"] = None
        out["content_withheld"] = True  # stored, but only an admin key may read it
    return out


def _writer_in_view(db: Readable, writer: str | None, tenant: str | None) -> str | None:
    """A cache hit's writer (the request whose answer it served), for a caller who may read
    that request: under `scope: global` it may be another team's, whose id a team-bound caller
    is not shown."""
    if writer is None or tenant is None:
        return writer
    return writer if db.query("SELECT 1 FROM requests WHERE id = ? AND team = ?", [writer, tenant]) else None


def _without_quotes(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attempts as a caller who may not read the content sees them: each upstream error as it is
    stored with content off (an error kept with the content may quote the prompt)."""
    return [{**a, "error": error_text(a["error"], "none")} if isinstance(a.get("error"), str) else a for a in attempts]


# -- stats -----------------------------------------------------------------------------

GROUPS = ("none", "model", "deployment", "provider", "rule", "policy", "task", "variant", "team", "key", "cache")
STATS_PARAMS = frozenset({"since", "until", "group_by", "bucket", "team"})


class TeamScope(ValueError):
    """A stats grouping that a team-bound caller cannot be given (it spans every team)."""


class OtherTeam(ValueError):
    """A team-bound caller named another team: answered as a team that does not exist."""


# What one team's stats can be grouped by: its totals ("none", or its own "team" row) and
# the dimensions the rollups also keep within each team (`rollup.TEAM_DIMS`). Keys are not
# among them: a team's keys are listed by `/admin/requests?key=` and `/admin/spend?by=key`.
TEAM_GROUPS = ("none", "team", *rollup.TEAM_DIMS)


def stats_team(q: Mapping[str, str], tenant: str | None) -> str | None:
    """The team the stats are confined to: the caller's own (a `team=` naming another raises
    `OtherTeam`), or the `team` parameter of a caller bound to none, or None (every team)."""
    asked = q.get("team")
    if tenant is not None:
        if asked is not None and asked != tenant:
            raise OtherTeam(asked)
        return tenant
    if asked is not None and not asked:
        raise BadParam("team", "must name a team")
    return asked


def _selection(group: str, team: str | None) -> tuple[str, list[Any], int]:
    """The rollup rows a query reads: (condition, its parameters, how many characters of
    each row's value to drop to get its group)."""
    if team is None:
        return "dim = ?", [group], 0
    if group in ("none", "team"):
        return "dim = ? AND value = ?", ["team", team], 0
    prefix = rollup.team_prefix(team)
    # substr, not a range or LIKE: exact under any collation and for any character a name holds.
    return "dim = ? AND substr(value, 1, ?) = ?", [rollup.team_dim(group), len(prefix), prefix], len(prefix)


def stats(db: Readable, q: Mapping[str, str], now: float | None = None, tenant: str | None = None) -> dict[str, Any]:
    """Requests, success rate, latency and TTFT percentiles, tokens, cost and savings per group
    (and per time bucket), from the rollups: minute resolution (`since` rounds down, `until` up
    to the minute); percentiles within `rollup.MAX_RELATIVE_ERROR`. The window is read from
    the coarsest rows that fit in it and in its buckets (`rollup.cover`), and its pending rows.

    With `tenant` (a team-bound caller) or `team=` (any other), one team's rows alone, grouped
    by one of `TEAM_GROUPS`; a grouping by key raises `TeamScope` for a team-bound caller (its
    rows add up every team's requests), `BadParam` for another."""
    _check_known(q, STATS_PARAMS)
    now = time.time() if now is None else now
    since, until = time_range(q, now, now - 86400)
    assert since is not None
    group = q.get("group_by", "none")
    if group not in GROUPS:
        raise BadParam("group_by", f"{group!r}: use one of {', '.join(GROUPS)}")
    team = stats_team(q, tenant)
    if team is not None and group not in TEAM_GROUPS:
        why = f"group_by={group} is not kept per team: one team's stats group by {', '.join(TEAM_GROUPS)}"
        if tenant is None:
            raise BadParam("group_by", why)
        raise TeamScope(
            f"group_by={group} adds up every team's requests; a key bound to a team gets its team's "
            f"stats grouped by {', '.join(TEAM_GROUPS)} (and bucket), or its requests from /admin/requests"
        )
    first, last = int(since // 60), math.ceil(until / 60)
    step = 0
    if (b := q.get("bucket")) is not None:
        n = _whole(b)
        if n is not None and n > MAX_BUCKET_S:
            raise BadParam("bucket", f"{b[:40]}: at most {MAX_BUCKET_S} seconds")
        if n is None or n < 60 or n % 60:
            raise BadParam("bucket", f"{b[:40]!r}: seconds, a whole number of minutes (60, 300, 3600, ...)")
        step = n // 60
        if (last - first) / step > MAX_STATS_POINTS:
            raise BadParam("bucket", f"{b}s over this range makes more than {MAX_STATS_POINTS} buckets")
    cols = (*rollup.COUNTERS, *rollup.LAT, *rollup.TTFT)
    sums = ", ".join(f"SUM({c}) AS {c}" for c in cols)
    # `step` is an integer parsed above, never text from the request.
    t = f"(minute / {step}) * {step}" if step else "0"
    # Each span of whole rows is summed by its own range scan of the primary key; the
    # outer query adds up the few partial sums per group and bucket. One team's stats read
    # its own rows alone (a condition of the scan), whatever they are grouped by.
    sel_sql, sel, strip = _selection(group, team)
    part = (
        f"SELECT value, {t} AS t, {sums} FROM request_rollups "
        f"WHERE {sel_sql} AND res = ? AND minute >= ? AND minute < ? GROUP BY value, t"
    )
    spans = rollup.cover(first, last, step)
    if spans:  # and the window's minute rows not spread over the levels yet (a minute or two of them)
        spans.append((rollup.PENDING, first, last))
    outer = ", ".join(f"SUM({c})" for c in cols)
    if db.dialect == "postgres":
        # PostgreSQL would plan each part's ~200 sums anew (~40 ms for a day's dozen parts,
        # four times the execution): one scan of the spans (a bitmap OR of primary-key
        # ranges) with one set of sums instead.
        ranges = " OR ".join(["(res = ? AND minute >= ? AND minute < ?)"] * len(spans))
        sql = f"SELECT value, {t} AS t, {outer} FROM request_rollups WHERE {sel_sql} AND ({ranges}) GROUP BY value, t"
        params = [*sel, *(x for span in spans for x in span)]
    else:
        sql = f"SELECT value, t, {outer} FROM ({' UNION ALL '.join([part] * len(spans))}) AS r GROUP BY value, t"
        params = [x for res, a, b in spans for x in (*sel, res, a, b)]
    found = db.query(sql, params) if spans else []
    n_c, n_h = len(rollup.COUNTERS), rollup.BUCKETS
    rows = []
    total_c = [0.0] * n_c
    total_lat, total_ttft = [0] * n_h, [0] * n_h
    for r in found:
        counters = [float(x or 0) for x in r[2 : 2 + n_c]]
        lat = [int(x or 0) for x in r[2 + n_c : 2 + n_c + n_h]]
        ttft = [int(x or 0) for x in r[2 + n_c + n_h :]]
        row = _stats_row(counters, lat, ttft)
        if step:
            row = {"t": int(r[1]) * 60, **row}
        if group != "none":
            row = {"group": r[0][strip:] or None, **row}
        rows.append(row)
        total_c = [a + b for a, b in zip(total_c, counters, strict=True)]
        total_lat = [a + b for a, b in zip(total_lat, lat, strict=True)]
        total_ttft = [a + b for a, b in zip(total_ttft, ttft, strict=True)]
    rows.sort(key=lambda x: (x.get("t", 0), -x["requests"], str(x.get("group"))))
    if group == "key":
        rows = _named(db, rows, "group", "name")
    return {
        "since": first * 60,
        "until": last * 60,
        "group_by": group,
        **({"team": team} if team is not None else {}),
        "bucket": step * 60 or None,
        "rows": rows,
        "totals": _stats_row(total_c, total_lat, total_ttft),
        "percentile_error": round(rollup.MAX_RELATIVE_ERROR, 4),
    }


def _stats_row(c: list[float], lat: list[int], ttft: list[int]) -> dict[str, Any]:
    requests, errors, p_tok, c_tok, cost, base = c
    return {
        "requests": int(requests),
        "errors": int(errors),
        "success_rate": round((requests - errors) / requests, 6) if requests else None,
        "p50_ms": rollup.percentile(lat, 0.50),
        "p95_ms": rollup.percentile(lat, 0.95),
        "p99_ms": rollup.percentile(lat, 0.99),
        "ttft_p50_ms": rollup.percentile(ttft, 0.50),
        "ttft_p95_ms": rollup.percentile(ttft, 0.95),
        "ttft_p99_ms": rollup.percentile(ttft, 0.99),
        "prompt_tokens": int(p_tok),
        "completion_tokens": int(c_tok),
        "cost_usd": round(cost, 8),
        "baseline_cost_usd": round(base, 8),
        "savings_usd": round(base - cost, 8),
    }
