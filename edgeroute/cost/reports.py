"""Spend reports from the ledger: by key, team, user, model, route, deployment or day, with
savings against the route's most expensive model. Used by `edgeroute spend` and
`GET /admin/spend` (same data, same shape)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import time
from typing import Any

import orjson
from aiohttp import web

from edgeroute import redact
from edgeroute.accounting import UNROUTED
from edgeroute.cost.keys import tenant_of
from edgeroute.cost.ledger_store import Backend
from edgeroute.errors import ProxyError
from edgeroute.governance.key_names import key_names
from edgeroute.requestlog import gate
from edgeroute.requestlog.query import Readable

# The only SQL that a request's parameters choose: a whitelist, never interpolated input.
GROUPS = {
    "key": "key_id",
    "team": "team",
    "user": "user_id",
    "model": "model",
    "route": "route",
    "deployment": "deployment",
    "day": "day",
    "outcome": "outcome",
}
# A request that no route served keeps the model its client sent, any text at all: by model,
# those are one row, as in the stats, or one client's made-up names would be a row each.
_MODEL = f"CASE WHEN COALESCE(route, '') = '' THEN '{UNROUTED}' ELSE model END"
# Past this many groups (users are the client's text too), the smallest spenders are one row.
MAX_ROWS = 1000
OTHER_GROUP = "(other)"
# Groups that say who asked: a shadow mirror carries its primary's key, team and user, but the
# operator pays it (no budget counts it), so it is its own group there, and out of a team's view.
_WHO = ("key", "team", "user")
SHADOW_GROUP = "(shadow)"
# Outcomes of requests that got their answer (from an upstream, a hedge, or the cache).
_ANSWERED = "'ok', 'hedge_won', 'cache_hit', 'cache_stale'"
FIELDS = ("requests", "ok", "prompt_tokens", "completion_tokens", "cost_usd", "baseline_cost_usd", "savings_usd")


def parse_since(value: str | None, now: float | None = None) -> float | None:
    """`24h`, `7d`, `30m`, an ISO date or datetime (UTC unless it says otherwise)."""
    if not value:
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", value.strip())
    if m:  # further back than 1970 (a span past any calendar) means from the start
        return max(0.0, now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"--since {value!r}: use e.g. 24h, 7d or 2026-11-01") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def spend(backend: Readable, by: str = "key", since: float | None = None, tenant: str | None = None) -> dict[str, Any]:
    """Rows grouped `by`, biggest spend first, and totals with savings. With `tenant`, that
    team's spend alone (a condition of the query: no other team's row or total)."""
    if by not in GROUPS:
        raise ValueError(f"by must be one of {', '.join(GROUPS)}")
    col = _MODEL if by == "model" else GROUPS[by]
    if by in _WHO:
        col = f"CASE WHEN outcome = 'shadow' THEN '{SHADOW_GROUP}' ELSE {col} END"
    conds: list[str] = []
    params: list[Any] = []
    if since is not None:
        conds.append("ts >= ?")
        params.append(since)
    if tenant is not None:
        conds.append("team = ? AND outcome <> 'shadow'")
        params.append(tenant)
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    sql = (
        f"SELECT {col}, COUNT(*), SUM(CASE WHEN outcome IN ({_ANSWERED}) THEN 1 ELSE 0 END), "
        "SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd), SUM(baseline_cost_usd) "
        f"FROM spend {where} GROUP BY 1 ORDER BY SUM(cost_usd) DESC, 1"
    )
    rows: list[dict[str, Any]] = []
    for r in backend.query(sql, params):
        cost, base = float(r[5] or 0), float(r[6] or 0)
        rows.append(
            {
                # A request no route served has an empty route: its row was blank.
                by: UNROUTED if by == "route" and not r[0] else r[0],
                "requests": int(r[1]),
                "ok": int(r[2] or 0),
                "prompt_tokens": int(r[3] or 0),
                "completion_tokens": int(r[4] or 0),
                "cost_usd": round(cost, 8),
                "baseline_cost_usd": round(base, 8),
                "savings_usd": round(base - cost, 8),
            }
        )
    rows, folded = _capped(by, rows)
    if by == "key" and rows:
        named = key_names(backend, [row["key"] for row in rows if row["key"]])
        for row in rows:
            row["name"] = named.get(row["key"])
    total: dict[str, Any] = {f: sum(r[f] for r in rows) for f in FIELDS}
    for f in ("cost_usd", "baseline_cost_usd", "savings_usd"):
        total[f] = round(total[f], 8)
    base = total["baseline_cost_usd"]
    total["savings_percent"] = round(100 * total["savings_usd"] / base, 2) if base else 0.0
    return {
        "by": by,
        "since": None if since is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
        "rows": rows,
        "folded_groups": folded,
        "total": total,
        "savings_note": "baseline: the same tokens on the most expensive deployment of each request's route",
    }


def _capped(by: str, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The MAX_ROWS biggest spenders' rows and one `(other)` row summing the rest, and how many
    groups that row holds (0: none folded)."""
    if len(rows) <= MAX_ROWS:
        return rows, 0
    kept, rest = rows[: MAX_ROWS - 1], rows[MAX_ROWS - 1 :]
    other: dict[str, Any] = {by: OTHER_GROUP, **{f: sum(r[f] for r in rest) for f in FIELDS}}
    for f in ("cost_usd", "baseline_cost_usd", "savings_usd"):
        other[f] = round(other[f], 8)
    return [*kept, other], len(rest)


def render(report: dict[str, Any], fmt: str) -> str:
    by = report["by"]
    lead = [by, "name"] if by == "key" else [by]  # text, left-aligned
    cols = [*lead, *FIELDS]
    # A group's name may be a client's text (the model a refused request asked for): it must
    # not drive the operator's terminal, nor be a formula in a spreadsheet.
    if fmt == "json":
        return redact.json_printable(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    if fmt == "csv":
        buf = io.StringIO()
        # Every text cell quoted (numbers bare): a spreadsheet reads it as one text cell. The
        # header too: a reader parsing numbers by the quotes (`QUOTE_NONNUMERIC`) reads it whole.
        w = csv.writer(buf, quoting=csv.QUOTE_NONNUMERIC)
        w.writerow(cols)
        for r in report["rows"]:
            w.writerow([_csv_cell(r[c]) for c in cols])
        return buf.getvalue()
    cells = [[str(c) for c in cols]]
    for r in [*report["rows"], {by: "TOTAL", "name": "", **report["total"]}]:
        cells.append([_fmt(r.get(c)) for c in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [
        "  ".join(
            v.ljust(w) if i < len(lead) else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
    t = report["total"]
    lines.append(f"\nsavings vs. most expensive model per route: ${t['savings_usd']:.6f} ({t['savings_percent']}%)")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6f}"
    return redact.printable(str(v))


# A formula's first character after a separator other than the comma that a spreadsheet may
# split on (`;` in most of Europe's locales, `|`, tab), past spaces and quotes. The quotes are
# placed for commas: a reader splitting on `;` meets a cell's opening quote mid-field, so it
# honours none and splits inside the cell (`"k1","ops;=2+5*cmd|' /C calc'!A0"` gives a cell
# `=2+5…`, a formula: OWASP CSV injection). A reader splitting on commas honours the quotes:
# a comma inside a quoted cell splits nothing, so text after one is kept as written.
_FORMULA_AFTER_SEP = re.compile(r"""([;|\t])([\s"']*)(?=[=+\-@])""")


def _csv_cell(v: Any) -> Any:
    """Text as a spreadsheet shows it, never runs it: a = + - @ (or tab, CR) that starts the cell,
    or a part of it after a `;`, `|` or tab, gets a `'` before it."""
    if not isinstance(v, str):
        return v
    v = _FORMULA_AFTER_SEP.sub(r"\1\2'", redact.printable(v))
    return "'" + v if v.startswith(("=", "+", "-", "@", "\t", "\r")) else v


LEDGER = web.AppKey("ledger_backend", Backend)


async def admin_spend(request: web.Request) -> web.Response:
    """`GET /admin/spend?by=team&since=7d`: the `edgeroute spend` report as JSON (a team-bound
    key's: its team's spend alone)."""
    backend = request.app.get(LEDGER)
    if backend is None:
        raise ProxyError(404, "No ledger is configured (add a `ledger:` section).", code="no_ledger")
    q = request.query
    # A parameter it does not take is refused, not ignored: `?team=a` answered every team's spend.
    if unknown := sorted(set(q) - {"by", "since"}):
        raise _bad(unknown[0], f"Unknown parameter '{unknown[0]}'; /admin/spend takes by and since.")
    by, tenant = q.get("by", "key"), tenant_of(request)
    if by not in GROUPS:
        raise _bad("by", f"'by' must be one of {', '.join(GROUPS)}.")
    try:
        since = parse_since(q.get("since"))
    except ValueError:
        raise _bad("since", f"'since' {q['since'][:40]!r}: use e.g. 24h, 7d or 2026-11-01.") from None
    # On the query pool, serialised there too: a large answer is built off the loop.
    body = await gate.run(request, lambda bounded: orjson.dumps(spend(bounded, by, since, tenant)), backend)
    return web.Response(body=body, content_type="application/json")


def _bad(param: str, message: str) -> ProxyError:
    return ProxyError(400, message, code="invalid_parameter", param=param)


def open_backend(config_path: str) -> Backend | None:
    """The ledger database a config names (as `serve` would open it), or None after printing
    why not (an invalid config, no ledger, a database not created yet or unreachable)."""
    import sys
    from pathlib import Path

    from edgeroute import config as config_mod
    from edgeroute.cost.ledger_store import backend_for

    try:
        cfg = config_mod.load(config_path, check_secrets=False)
    except config_mod.ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return None
    lc = cfg.ledger or config_mod.Ledger()  # `serve` writes the default one beside the config
    if lc.backend == "memory":
        print(f"{config_path}: the ledger is in memory only (backend: memory); nothing to report", file=sys.stderr)
        return None
    base = Path(config_path).parent
    if lc.backend == "sqlite":
        path = Path(lc.path) if Path(lc.path).is_absolute() else base / lc.path
        if not path.exists():
            print(
                f"{config_path}: the ledger {path.absolute()} does not exist yet (`edgeroute serve` with this"
                " config creates it)",
                file=sys.stderr,
            )
            return None
    try:
        return backend_for(lc, base)
    except Exception as e:  # the database is unreachable: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return None


def cli(config_path: str, by: str, fmt: str, since: str | None) -> int:
    """`edgeroute spend`: prints the report for the ledger named in the config."""
    import sys

    try:
        start = parse_since(since)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    backend = open_backend(config_path)
    if backend is None:
        return 1
    try:
        sys.stdout.write(render(spend(backend, by, start), fmt))
    finally:
        backend.close()
    return 0
