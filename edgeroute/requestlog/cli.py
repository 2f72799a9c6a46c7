"""`edgeroute logs` and `edgeroute stats`: the request log from the command line.

They read the database the config names (as `edgeroute spend` does), with the same
filters and the same numbers as `GET /admin/requests` and `GET /admin/stats`. Whoever can
read the database can read everything in it, so `--content` shows stored prompts and answers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import orjson

from edgeroute import config as config_mod
from edgeroute import redact
from edgeroute.cost.reports import open_backend
from edgeroute.requestlog import query

_FILTERS = ("since", "until", "model", "deployment", "key", "team", "status", "error_class", "rule",
            "min_latency_ms", "min_cost_usd")  # fmt: skip
# Least widths: a request id (28) and a managed key id (13, `k` and 12 hex digits) fit. A page's
# longer cells (a deployment named `claude-sonnet-anthropic`) widen their column (`_widths`).
_COLUMNS = (("ts", 19), ("id", 28), ("model", 14), ("deployment", 14), ("key", 13), ("status", 6),
            ("latency_ms", 10), ("ttft_ms", 8), ("tokens", 11), ("cost_usd", 10), ("attempts", 8), ("cache", 6),
            ("error_class", 14))  # fmt: skip

_FILTER_HELP = {
    "since": "from this time: epoch seconds, relative (15m, 24h, 7d) or an ISO date (2026-12-01)",
    "until": "up to this time: epoch seconds, relative or an ISO date",
    "status": "a status code (429), a class (4xx, 5xx), ok or error",
    "error_class": "only failed requests of this class",
    "min_latency_ms": "only requests at least this slow",
    "min_cost_usd": "only requests costing at least this much",
}


def _config_option(p: argparse.ArgumentParser) -> None:
    """`--config/-c`, required unless EDGEROUTE_CONFIG names the file (as for `serve`)."""
    default = os.environ.get("EDGEROUTE_CONFIG") or None
    p.add_argument(
        "--config", "-c", default=default, required=default is None,
        help="the YAML config file, its ledger holds the log (default: $EDGEROUTE_CONFIG)",
    )  # fmt: skip


def add_logs_parser(sub: Any) -> None:
    p = sub.add_parser("logs", help="the request log: filtered, paged or followed (table or JSON lines)")
    _config_option(p)
    for f in _FILTERS:
        p.add_argument(f"--{f.replace('_', '-')}", dest=f, help=_FILTER_HELP.get(f, f"only records with this {f}"))
    p.add_argument("--limit", default="50", help="records to show (up to 500); with --follow, the backlog")
    p.add_argument("--format", choices=("table", "jsonl"), default="table", help="output format")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new records (Ctrl-C stops)")
    p.add_argument("--id", help="one request in full: explanation and attempts timeline")
    p.add_argument("--content", action="store_true", help="with --id: the stored prompt and answer, if any")
    p.set_defaults(fn=logs)


def add_stats_parser(sub: Any) -> None:
    p = sub.add_parser("stats", help="requests, success rate, latency percentiles, tokens, cost per group")
    _config_option(p)
    p.add_argument("--since", default="24h", help=_FILTER_HELP["since"] + " (default 24h)")
    p.add_argument("--until", help=_FILTER_HELP["until"])
    p.add_argument("--group-by", dest="group_by", default="none", help=", ".join(query.GROUPS))
    p.add_argument("--bucket", help="seconds per time bucket (a multiple of 60)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(fn=stats)


def _json(obj: Any, option: int = 0) -> str:
    """`obj` as JSON that cannot drive the terminal it is printed to (client text is in it)."""
    return redact.json_printable(orjson.dumps(obj, option=option).decode())


def _params(a: argparse.Namespace, names: tuple[str, ...]) -> dict[str, str]:
    return {n: str(getattr(a, n)) for n in names if getattr(a, n, None) is not None}


def _cell(r: dict[str, Any], col: str) -> str:
    v = r.get(col)
    if col == "ts":
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(v or 0)))
    if col == "tokens":
        return f"{r['prompt_tokens']}/{r['completion_tokens']}{'~' if r['tokens_estimated'] else ''}"
    if col == "key" and v is not None and r.get("key_name"):  # a managed key's id says nothing
        v = f"{v} ({r['key_name']})"
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6f}" if col == "cost_usd" else f"{v:.1f}"
    return redact.printable(str(v))  # a client-chosen model name must not drive the terminal


_WIDEST = 48  # a longer cell (a client's made-up model name) pushes its own row only


def _widths(rows: list[dict[str, Any]], names: dict[str, list[str]]) -> list[int]:
    """Each column as wide as its longest cell on the page or name the config gives it (its
    models, its deployments: a record followed later fits too), up to `_WIDEST`, and at least
    its least width."""
    cells = [[_cell(r, c) for r in rows] + names.get(c, []) for c, _ in _COLUMNS]
    return [max([w] + [min(_WIDEST, len(v)) for v in col]) for (_, w), col in zip(_COLUMNS, cells, strict=True)]


def _config_names(path: str) -> dict[str, list[str]]:
    """The model and deployment names of the config (already read once by `open_backend`)."""
    cfg = config_mod.load(path, check_secrets=False)
    return {"model": list(cfg.models), "deployment": list(cfg.deployments)}


def _line(r: dict[str, Any], fmt: str, widths: list[int]) -> str:
    if fmt == "jsonl":
        return _json(r)
    return "  ".join(_cell(r, c).ljust(w) for (c, _), w in zip(_COLUMNS, widths, strict=True)).rstrip()


def _header(widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for (c, _), w in zip(_COLUMNS, widths, strict=True)).rstrip()


def logs(a: argparse.Namespace) -> int:
    if a.id is None and a.content:
        print("error: --content shows one request's stored prompt and answer: give it with --id ID", file=sys.stderr)
        return 2
    if a.id is not None and a.follow:
        print(
            "error: --follow prints new requests as they come; --id shows one: give one or the other", file=sys.stderr
        )
        return 2
    backend = open_backend(a.config)
    if backend is None:
        return 1
    try:
        if a.id is not None:
            found = query.get_request(backend, a.id, with_content=a.content)
            if found is None:
                print(f"error: no request {a.id!r} in the request log", file=sys.stderr)
                return 1
            print(_json(found, orjson.OPT_INDENT_2))
            return 0
        q = {**_params(a, _FILTERS), "limit": a.limit}
        page = query.list_requests(backend, q)
        widths = _widths(page["data"], _config_names(a.config))  # and followed records to them
        if a.format == "table":
            print(_header(widths))
        for r in reversed(page["data"]):  # oldest first, as a log reads
            print(_line(r, a.format, widths), flush=True)
        if a.follow:
            _follow(backend, q, page["data"], a.format, widths)
    except query.BadParam as e:
        print(f"error: --{e.param.replace('_', '-')}: {str(e).split(': ', 1)[1]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        backend.close()
    return 0


_LOOK_BACK_S = 120.0  # a request lands in the log when it ends (and is flushed); it is ordered by start


def _window(backend: Any, q: dict[str, str], since: float) -> list[dict[str, Any]]:
    """Every record matching `q` that started after `since`, newest first (page by page)."""
    out: list[dict[str, Any]] = []
    page_q = {**q, "since": str(since), "until": str(time.time() + 1), "limit": "500"}
    while True:
        page = query.list_requests(backend, page_q)
        out += page["data"]
        if page["next_cursor"] is None or len(out) > 50_000:
            return out
        page_q["cursor"] = page["next_cursor"]


def _follow(backend: Any, q: dict[str, str], shown: list[dict[str, Any]], fmt: str, widths: list[int]) -> None:
    """Polls for records that were not in the log when following began (looking back a little,
    since a long request lands after shorter ones that started later)."""
    seen = {r["id"] for r in shown} | {r["id"] for r in _window(backend, q, time.time() - _LOOK_BACK_S)}
    while True:
        time.sleep(1.0)
        recent = _window(backend, q, time.time() - _LOOK_BACK_S)
        for r in reversed(recent):
            if r["id"] not in seen:
                print(_line(r, fmt, widths), flush=True)
        seen = {r["id"] for r in recent}  # bounded by the look-back window


def stats(a: argparse.Namespace) -> int:
    backend = open_backend(a.config)
    if backend is None:
        return 1
    try:
        out = query.stats(backend, _params(a, ("since", "until", "group_by", "bucket")))
    except query.BadParam as e:
        print(f"error: --{e.param.replace('_', '-')}: {str(e).split(': ', 1)[1]}", file=sys.stderr)
        return 2
    finally:
        backend.close()
    if a.format == "json":
        print(_json(out, orjson.OPT_INDENT_2))
        return 0
    cols = ["requests", "success_rate", "p50_ms", "p95_ms", "p99_ms", "ttft_p50_ms", "prompt_tokens",
            "completion_tokens", "cost_usd", "savings_usd"]  # fmt: skip
    lead = (["t"] if out["bucket"] else []) + (["group"] if out["group_by"] != "none" else [])
    lead += ["name"] if out["group_by"] == "key" else []  # the key's, as `spend --by key` shows it
    table = [[*lead, *cols]]
    # Without a group or a bucket the one row is the total: print it once.
    rows = [*out["rows"], {**out["totals"], "total": True}] if lead else [out["totals"]]
    for r in rows:
        cells = [_stat(r.get(c), c) for c in [*lead, *cols]]
        if r.get("total"):  # labelled in the first column, whichever it is
            cells[: len(lead)] = ["TOTAL"] + [""] * (len(lead) - 1)
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print(
            "  ".join(
                v.ljust(w) if i < len(lead) else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    bound = math.ceil(out["percentile_error"] * 1000) / 10  # a bound: rounded up, never down
    print(f"\npercentiles within ±{bound:.1f} % (histograms); one-minute resolution")
    return 0


def _stat(v: Any, col: str) -> str:
    if v is None:
        return "-" if col != "t" else ""
    if col == "t":
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(v))
    if isinstance(v, float):
        return f"{v:.6f}" if col.endswith("usd") or col == "success_rate" else f"{v:.1f}"
    return redact.printable(str(v))  # a group may be a client-chosen model name
