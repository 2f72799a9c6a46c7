"""`GET /admin/budgets`: each budget's use against its limit, and rate-limit headroom.

Read from this instance's counters (which, with a ledger, start from what the ledger
holds for the current period); with `shared_state`, from Redis, where every instance
counts. `projected_usd` extends the period's spend so far at its average rate to the end
of the period (a rolling window is its own projection).

One team's view (a team-bound key's, or `?team=` for a key bound to none) holds the budgets
that apply to that team: its team budget, its keys' budgets (config and managed) with their
figures; and, marked `shared` with their figures withheld (null), the budgets that constrain
it but count other teams' spend too: global, model and user budgets, and the budgets of
managed keys outside the team that made its keys. Its rate limits: its keys' buckets, and the
model and deployment limits with their use withheld. No other team's name or figure is in it.

A budget of one key says whether that key still works (`key_status`: `active`; `revoked` or
`expired`, a managed key ended by itself or a maker; `removed`, a config key no longer in the
config): an ended key's budget stays listed, what it spent this period is real.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from edgeroute.admission import ADMISSION
from edgeroute.config import Budget
from edgeroute.cost import budgets as B
from edgeroute.cost.control import CostControl
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.cost.teams import team_in_view
from edgeroute.errors import ProxyError
from edgeroute.governance.http import only_params
from edgeroute.state import STATE

_FIGURES = ("spent_usd", "reserved_usd", "percent", "projected_usd")


def _entry(b: Budget, subject: str | None, p: B.Period, used: int, reserved: int, now: float) -> dict[str, Any]:
    spent = max(0, used - reserved) / B.NANO
    if p.rolling:
        projected = spent
    else:
        elapsed = max(now - p.starts_at, 60.0)  # the first minute says little about a month
        projected = spent * (p.resets_at - p.starts_at) / elapsed
    return {
        "name": b.name,
        "scope": b.scope,
        "match": subject,
        "period": b.period,
        "period_id": p.id,
        "period_start": p.starts_at,
        "period_end": p.resets_at,
        "limit_usd": b.limit_usd,
        "spent_usd": round(spent, 8),
        "reserved_usd": round(reserved / B.NANO, 8),
        "percent": round(100 * used / B.NANO / b.limit_usd, 3),
        "projected_usd": round(projected, 8),
    }


async def used(control: CostControl, charges: list[B.Charge]) -> list[int]:
    """Counters for `charges`: from Redis when it is in use and up, else this instance's."""
    if control.shared is not None and control.shared_up() and charges:
        try:  # a reservation of nothing that never blocks: it reads the counters
            return (await control.shared.reserve(charges, time.time())).used_before
        except StoreUnavailable:  # this instance's view is better than none
            pass
    return [control.local_budgets.used(c) for c in charges]


def _subjects(b: Budget, p: B.Period, counters: dict[str, int]) -> set[str]:
    """Who a configured budget is counted for: "*" (global), its `match`, or each subject
    with a counter this period (a budget per key, team, user or model)."""
    if b.scope == "global":
        return {"*"}
    if b.match is not None:
        return {b.match}
    prefix, suffix = f"{b.name}:", f":{p.id}"
    return {k[len(prefix) : -len(suffix)] for k in counters if k.startswith(prefix) and k.endswith(suffix)}


def _key_status(control: CostControl) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Adds `key_status` and `key_name` (a managed key's, as spend by key shows it) to an entry
    of a budget of one key (not to a withheld one's: it may be another team's key)."""
    keys = control.keys
    ended = keys.ended() if keys is not None else {}
    names = keys.names() if keys is not None else {}
    known = set(control.cfg.keys) | set(keys.key_ids() if keys is not None else ())

    def add(e: dict[str, Any]) -> dict[str, Any]:
        key = e["match"]
        if e["scope"] != "key" or not key or e.get("shared"):
            return e
        status = ended.get(key) or ("active" if key in known else "removed")
        return {**e, "key_status": status, "key_name": names.get(key)}

    return add


@dataclass(slots=True, frozen=True)
class _Team:
    """One team as the budgets see it: its keys and their users."""

    name: str
    keys: frozenset[str]
    users: frozenset[str]


def _team(control: CostControl, team: str) -> _Team:
    keyed = {k: (vk.team, vk.user) for k, vk in control.cfg.keys.items()}
    if control.keys is not None:
        keyed |= {k: (t, None) for k, t in control.keys.key_teams().items() if k not in keyed}
    keys = frozenset(k for k, (t, _) in keyed.items() if t == team)
    users = frozenset(u for k, (t, u) in keyed.items() if t == team and u)
    return _Team(team, keys, users)


def _team_charges(control: CostControl, team: _Team, now: float) -> list[tuple[B.Charge, bool]]:
    """(charge, shared) for each budget that applies to `team`; `shared`: it counts other
    teams' spend too (its figures are withheld), its subject None when it is one per model."""
    out: list[tuple[B.Charge, bool]] = []
    for b in control.budgets:
        p = B.period_of(b, now)
        if b.scope == "team":
            if b.match in (None, team.name):
                out.append((B.charge(b, team.name, p, 0, -1), False))
        elif b.scope == "key":
            subjects = team.keys if b.match is None else {b.match} & team.keys
            out += [(B.charge(b, s, p, 0, -1), False) for s in sorted(subjects)]
        elif b.scope == "user":
            if b.match is None or b.match in team.users:
                out += [(B.charge(b, u, p, 0, -1), True) for u in sorted(team.users if b.match is None else {b.match})]
        elif b.scope == "global":  # every team's requests count
            out.append((B.charge(b, "*", p, 0, -1), True))
        elif b.match is not None:
            out.append((B.charge(b, b.match, p, 0, -1), True))
        else:  # one budget per model: shown once, for whichever models the team asks for
            out.append((B.charge(b, "", p, 0, -1), True))
    if control.keys is not None:
        for b in control.keys.budgets():
            assert b.match is not None
            spenders = control.keys.spenders(b.match)
            if b.match in team.keys:
                out.append((B.charge(b, b.match, B.period_of(b, now), 0, -1), False))
            elif team.keys.intersection(spenders):  # a key outside the team made one of its keys
                out.append((B.charge(b, b.match, B.period_of(b, now), 0, -1), True))
    return out


async def report(control: CostControl, now: float | None = None, team: str | None = None) -> dict[str, Any]:
    """Every budget and rate limit; with `team`, that team's view (see the module's doc)."""
    now = time.time() if now is None else now
    if team is not None:
        of_team = _team(control, team)
        pairs = _team_charges(control, of_team, now)
        counted = iter(await used(control, [c for c, shared in pairs if not shared]))
        budgets = []
        for c, shared in pairs:
            if shared:
                e = _entry(c.budget, c.subject or None, c.period, 0, 0, now) | dict.fromkeys(_FIGURES)
            else:
                e = _entry(c.budget, c.subject, c.period, next(counted), control.reserved.get(c.store_key, 0), now)
            budgets.append({**e, "shared": shared})
        budgets = list(map(_key_status(control), budgets))
        return {"team": team, "budgets": budgets, "rate_limits": rate_limits(control, of_team)}
    counters = control.local_budgets.counters()
    charges: list[B.Charge] = []
    for b in control.budgets:
        p = B.period_of(b, now)
        charges += [B.charge(b, s, p, 0, -1) for s in sorted(_subjects(b, p, counters))]
    for b in control.keys.budgets() if control.keys is not None else []:  # managed keys' own
        assert b.match is not None
        charges.append(B.charge(b, b.match, B.period_of(b, now), 0, -1))
    counted_all = await used(control, charges)
    status = _key_status(control)
    budgets = [
        status(_entry(c.budget, c.subject, c.period, u, control.reserved.get(c.store_key, 0), now))
        for c, u in zip(charges, counted_all, strict=True)
    ]
    return {"budgets": budgets, "rate_limits": rate_limits(control)}


def rate_limits(control: CostControl, team: _Team | None = None) -> list[dict[str, Any]]:
    """Every configured limit (managed keys' as they are now), with what is used of it now, and
    every key bucket in use; for a team, its keys' alone, and the model and deployment limits
    with their use withheld. A key's row with a `max_parallel` adds its requests in flight on
    this instance (`in_flight`, 0 when idle), and a managed key's its `key_name`."""
    cfg = control.cfg
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        scope, _, who = name.partition(":")
        return rows.setdefault(
            name, {"scope": scope, "name": who, "rpm_limit": None, "rpm_used": 0, "tpm_limit": None, "tpm_used": 0}
        )

    configured = [(f"model:{m}", lim) for m, lim in cfg.rate_limits.models.items()]
    configured += [(f"deployment:{d}", lim) for d, lim in cfg.rate_limits.deployments.items()]
    configured += [(f"key:{k}", vk.limits) for k, vk in cfg.keys.items() if vk.limits is not None]
    # Managed keys' limits as they are now (a bucket holds the limit of its last request).
    configured += [(f"key:{k}", lim) for k, lim in (control.keys.limits() if control.keys is not None else {}).items()]
    for (name, kind), (limit, used) in control.local_limits.usage().items():
        r = row(name)
        prefix = "rpm" if kind == "requests" else "tpm"
        r[f"{prefix}_limit"], r[f"{prefix}_used"] = limit, round(max(0.0, used), 3)
    for name, lim in configured:
        r = row(name)
        if lim.rpm is not None or lim.tpm is not None:  # else a key's are rate_limits.per_key's, as its bucket says
            r["rpm_limit"], r["tpm_limit"] = lim.rpm, lim.tpm
        if lim.max_parallel is not None:
            r["max_parallel"] = lim.max_parallel
            r["in_flight"] = 0
    for key, n in control.parallel.local.items():
        row(f"key:{key}")["in_flight"] = n
    names = control.keys.names() if control.keys is not None else {}
    for r in rows.values():
        if r["scope"] == "key" and r["name"] in names:  # a managed key's, beside its id
            r["key_name"] = names[r["name"]]
    if team is not None:
        rows = {n: r for n, r in rows.items() if r["scope"] != "key" or r["name"] in team.keys}
        for r in rows.values():
            if r["scope"] != "key":  # every team's requests take from these
                r["rpm_used"] = r["tpm_used"] = None
                r["shared"] = True
    return sorted(rows.values(), key=lambda r: (r["scope"], r["name"]))


async def admin_budgets(request: web.Request) -> web.Response:
    only_params(request, {"team"})  # refused, not ignored: `?teams=a` answered every team's budgets
    team = team_in_view(request)
    control = request.app.get(ADMISSION)
    if not isinstance(control, CostControl):
        raise ProxyError(404, "No budgets or rate limits are configured.", code="no_budgets")
    control.current(request.app[STATE])
    return web.Response(body=orjson.dumps(await report(control, team=team)), content_type="application/json")
