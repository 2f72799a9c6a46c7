"""The shadow report: a candidate router's choices against the running router's, on the same
live requests (the `router_shadow` rows), with the clients' feedback where they gave it.

- cost: both routers' choices priced the same way (each route's first deployment, the
  answer's own token counts), so the ratio compares the choices, not the price lists; the
  cost actually paid is beside them;
- agreement: the share of requests where both chose the same route;
- quality, where feedback exists: the running router's is the mean score of the rated
  requests. The candidate's is an estimate: where the two agree, the same scores; where
  they differ, the mean score of rated requests the running router sent to the candidate's
  route in the same window (it assumes that route does as well on these prompts, and says
  how many disagreements it could estimate). A policy is switched on when the candidate is
  cheaper at no loss of (estimated) quality, or better at an acceptable price.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from edgeroute.requestlog.query import BadParam, Readable, time_range

KNOWN = frozenset({"since", "until", "candidate"})
DAY = 86400.0

_PAIRS = """SELECT s.running_route, s.candidate_route, COUNT(*), SUM(s.running_cost_usd),
    SUM(s.candidate_cost_usd), SUM(s.cost_usd), COUNT(f.score), SUM(f.score)
FROM router_shadow s LEFT JOIN feedback f ON f.request_id = s.request_id
WHERE s.candidate = ? AND s.ts >= ? AND s.ts < ?
GROUP BY s.running_route, s.candidate_route"""
# Served by `router_shadow_time (ts, candidate)`: the window's rows only, from the index alone.
_CANDIDATES = """SELECT candidate, COUNT(*), MAX(ts) FROM router_shadow WHERE ts >= ? AND ts < ?
GROUP BY candidate ORDER BY MAX(ts) DESC"""


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


def build(db: Readable, q: Mapping[str, str], current: str | None, now: float | None = None) -> dict[str, Any]:
    """The report over `since` (default 24h) to `until` for `candidate` (default: the configured one)."""
    now = time.time() if now is None else now
    for k in q:
        if k not in KNOWN:
            raise BadParam(k, f"unknown parameter; known: {', '.join(sorted(KNOWN))}")
    since, until = time_range(q, now, now - DAY)
    assert since is not None
    candidates = [
        {"candidate": c, "requests": int(n), "last_ts": float(t)} for c, n, t in db.query(_CANDIDATES, [since, until])
    ]
    name = q.get("candidate") or current or (candidates[0]["candidate"] if candidates else None)
    out: dict[str, Any] = {"since": since, "until": until, "candidate": name, "candidates": candidates}
    if name is None:
        raise BadParam(
            "candidate",
            "no candidate router is configured (learning.candidate_router: {router_model: FILE}) "
            "or logged in this time range",
        )
    pairs = []
    for run, cand, n, rc, cc, paid, rated, total in db.query(_PAIRS, [name, since, until]):
        pairs.append({
            "running_route": run, "candidate_route": cand, "requests": int(n),
            "running_cost_usd": float(rc or 0), "candidate_cost_usd": float(cc or 0), "cost_usd": float(paid or 0),
            "rated": int(rated), "score_sum": float(total or 0),
        })  # fmt: skip
    requests = sum(p["requests"] for p in pairs)
    agree = sum(p["requests"] for p in pairs if p["running_route"] == p["candidate_route"])
    rc = sum(p["running_cost_usd"] for p in pairs)
    cc = sum(p["candidate_cost_usd"] for p in pairs)
    out.update(
        requests=requests,
        agreement=_ratio(agree, requests),
        cost={
            "running_usd": round(rc, 8),
            "candidate_usd": round(cc, 8),
            "candidate_vs_running": _ratio(cc, rc),
            "paid_usd": round(sum(p["cost_usd"] for p in pairs), 8),
        },
        quality=_quality(pairs),
        pairs=[
            {k: v for k, v in p.items() if k != "score_sum"} | {"mean_score": _ratio(p["score_sum"], p["rated"])}
            for p in pairs
        ],
    )
    return out


def _quality(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    rated = sum(p["rated"] for p in pairs)
    if rated == 0:
        return {"rated": 0, "running": None, "candidate_estimate": None, "estimated_disagreements": 0}
    # Mean score of what the running router sent to each route (every rated request counts).
    by_route: dict[str, list[float]] = {}
    for p in pairs:
        s = by_route.setdefault(p["running_route"], [0.0, 0.0])
        s[0] += p["score_sum"]
        s[1] += p["rated"]
    cand_sum = cand_n = 0.0
    estimated = unestimated = 0
    for p in pairs:
        if p["running_route"] == p["candidate_route"]:
            cand_sum += p["score_sum"]
            cand_n += p["rated"]
        elif (r := by_route.get(p["candidate_route"])) is not None and r[1] > 0:
            cand_sum += p["rated"] * r[0] / r[1]
            cand_n += p["rated"]
            estimated += p["rated"]
        else:
            unestimated += p["rated"]
    return {
        "rated": rated,
        "running": round(sum(p["score_sum"] for p in pairs) / rated, 4),
        "candidate_estimate": round(cand_sum / cand_n, 4) if cand_n else None,
        "estimated_disagreements": estimated,
        "unestimated_disagreements": unestimated,  # rated, but no rated request reached the candidate's route
    }


def _times(x: float | None) -> str:
    """The candidate's cost as a multiple of the running router's (`x0.85`); none without requests."""
    return "no requests to compare" if x is None else f"x{x}"


def table(r: dict[str, Any]) -> str:
    """The report as text for `edgeroute router shadow`."""
    cost, q = r["cost"], r["quality"]
    lines = [
        f"candidate {r['candidate']}: {r['requests']} policy-routed requests evaluated",
        f"agreement with the running router: {_pct(r['agreement'])}",
        f"estimated cost: running ${cost['running_usd']:.6f}, candidate ${cost['candidate_usd']:.6f} "
        f"({_times(cost['candidate_vs_running'])}); paid ${cost['paid_usd']:.6f}",
    ]
    if q["rated"]:
        lines.append(
            f"quality (mean feedback, {q['rated']} rated): running {q['running']}, candidate (estimated) "
            f"{q['candidate_estimate']}; {q['estimated_disagreements']} rated disagreements estimated from the "
            f"candidate route's scores, {q['unestimated_disagreements']} could not be"
        )
    else:
        lines.append("quality: no feedback on these requests (POST /v1/feedback)")
    head = ("running route", "candidate route", "requests", "running $", "candidate $", "rated", "score")
    lines.append("\n{:20s} {:20s} {:>8s} {:>11s} {:>11s} {:>6s} {:>6s}".format(*head))
    for p in r["pairs"]:
        score = "-" if p["mean_score"] is None else f"{p['mean_score']:.3f}"
        lines.append(
            f"{p['running_route'][:20]:20s} {p['candidate_route'][:20]:20s} {p['requests']:8d} "
            f"{p['running_cost_usd']:11.6f} {p['candidate_cost_usd']:11.6f} {p['rated']:6d} {score:>6s}"
        )
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"
