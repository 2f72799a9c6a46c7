"""`GET /admin/budgets`: each budget's use against its limit, and rate-limit headroom.

Read from this instance's counters (which, with a ledger, start from what the ledger
holds for the current period); with `shared_state`, from Redis, where every instance
counts. `projected_usd` extends the period's spend so far at its average rate to the end
of the period (a rolling window is its own projection).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from edgeroute.admission import ADMISSION
from edgeroute.config import Budget
from edgeroute.cost import budgets as B
from edgeroute.cost.control import CostControl
from edgeroute.cost.redis_store import StoreUnavailable
from edgeroute.errors import ProxyError


def _entry(b: Budget, subject: str, p: B.Period, used: int, reserved: int, now: float) -> dict[str, Any]:
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


async def report(control: CostControl, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    counters = control.local_budgets.counters()
    charges: list[B.Charge] = []
    for b in control.budgets:
        p = B.period_of(b, now)
        prefix, suffix = f"{b.name}:", f":{p.id}"
        if b.scope == "global":
            subjects = {"*"}
        elif b.match is not None:
            subjects = {b.match}
        else:
            subjects = {k[len(prefix) : -len(suffix)] for k in counters if k.startswith(prefix) and k.endswith(suffix)}
        charges += [B.charge(b, s, p, 0, -1) for s in sorted(subjects)]
    for b in control.keys.budgets() if control.keys is not None else []:  # managed keys' own
        assert b.match is not None
        charges.append(B.charge(b, b.match, B.period_of(b, now), 0, -1))
    counted = await used(control, charges)
    budgets = [
        _entry(c.budget, c.subject, c.period, u, control.reserved.get(c.store_key, 0), now)
        for c, u in zip(charges, counted, strict=True)
    ]
    return {"budgets": budgets, "rate_limits": rate_limits(control)}


def rate_limits(control: CostControl) -> list[dict[str, Any]]:
    """Every configured limit (with what is used of it now) and every key bucket in use."""
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
    for name, lim in configured:
        r = row(name)
        r["rpm_limit"], r["tpm_limit"] = lim.rpm, lim.tpm
    for (name, kind), (limit, used) in control.local_limits.usage().items():
        r = row(name)
        prefix = "rpm" if kind == "requests" else "tpm"
        r[f"{prefix}_limit"], r[f"{prefix}_used"] = limit, round(max(0.0, used), 3)
    return sorted(rows.values(), key=lambda r: (r["scope"], r["name"]))


async def admin_budgets(request: web.Request) -> web.Response:
    control = request.app.get(ADMISSION)
    if not isinstance(control, CostControl):
        raise ProxyError(404, "No budgets or rate limits are configured.", code="no_budgets")
    return web.Response(body=orjson.dumps(await report(control)), content_type="application/json")
