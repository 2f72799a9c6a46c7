"""The cost-control `Admission`: identity, rate limits, deployment limits and budgets.

`admit` runs after the core's decision and before dispatch:

1. the client's identity (set by the keys middleware; anonymous without `keys:`) goes
   into the record;
2. key and model token buckets (RPM, TPM) are taken, all or nothing, else 429 with
   `Retry-After` and OpenAI's `x-ratelimit-*` headers (also sent on success);
3. the first deployment's provider limits: when its bucket is empty the core is told
   (a rate-limit cool-down until a token is back) and the ticket asks the endpoint to
   decide again, so selection routes around it;
4. budgets: the estimated maximum cost (prompt tokens + max_tokens, or the configured
   cap, at the highest price among the deployments the request may use) is reserved in
   every budget the request falls under, atomically; at a `downgrade` threshold the
   request is rerouted to the cheaper model (the reservation follows); over a `block`
   threshold it is refused with 429 naming the budget and when it resets.

`settle` replaces reservations by the actual cost and the token estimate by the actual
tokens. Without Redis everything is synchronous dict arithmetic (microseconds). With
Redis, one script per step; if Redis fails, `on_unavailable: open` falls back to this
instance's own counters, `closed` refuses with 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from edgeroute import _core
from edgeroute.accounting import RequestRecord
from edgeroute.config import Budget, Config, Limit
from edgeroute.cost import budgets as B
from edgeroute.cost.keys import ANONYMOUS, IDENTITY, Identity
from edgeroute.cost.limits import BucketState, LocalLimiter, Take, headers_for
from edgeroute.cost.prices import Ceiling, ceiling, route_ceilings
from edgeroute.cost.redis_store import RedisState, StoreUnavailable
from edgeroute.errors import ProxyError
from edgeroute.state import STATE

log = logging.getLogger("edgeroute.cost")

RATE_STATES = web.RequestKey("rate_states", list)


@dataclass(slots=True)
class CostTicket:
    """What one request holds until settlement."""

    identity: Identity
    reroute: str | None = None  # the endpoint decides again for this model before dispatch
    charges: list[B.Charge] = field(default_factory=list)
    charges_shared: bool = False
    takes: list[Take] = field(default_factory=list)  # token buckets charged with an estimate
    takes_shared: bool = False
    estimated_tokens: int = 0


def _enabled(cfg: Config) -> bool:
    rl = cfg.rate_limits
    return bool(cfg.keys or cfg.budgets.limits or rl.per_key or rl.models or rl.deployments)


class CostControl:
    """Budgets and rate limits; build with :meth:`from_config`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.budgets = cfg.budgets.limits
        self.reserve_max_tokens = cfg.budgets.reserve_max_tokens
        self.ceilings: dict[str, Ceiling] = route_ceilings(cfg)
        self._model_limits = cfg.rate_limits.models
        self._block_at = [B.block_limit(b) for b in self.budgets]
        self._any_downgrade = any(a.action == "downgrade" for b in self.budgets for a in b.actions)
        self._any_notify = any(a.action == "notify" for b in self.budgets for a in b.actions)
        self._periods: dict[str, tuple[float, B.Period]] = {}
        self._tops: dict[tuple[int, ...], Ceiling] = {}
        self.local_budgets = B.LocalBudgetStore()
        self.local_limits = LocalLimiter()
        self.shared = RedisState(cfg.shared_state) if cfg.shared_state else None
        self.fail_open = cfg.shared_state is None or cfg.shared_state.on_unavailable == "open"
        self._down_until = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._notified: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    @staticmethod
    def wanted(cfg: Config) -> bool:
        return _enabled(cfg)

    # -- admission -------------------------------------------------------------

    async def admit(self, request: web.Request, decision: _core.Decision, rec: RequestRecord) -> CostTicket | None:
        ident = request.get(IDENTITY, ANONYMOUS)
        rec.key, rec.team, rec.user = ident.key, ident.team, ident.user
        ticket = CostTicket(ident)
        live = request.app[STATE].live
        await self._rate_limits(request, decision, rec, ticket)
        await self._deployment_limits(live.router, live.deployments, decision, ticket)
        if self.budgets:
            order = tuple(decision.order)
            top = self._tops.get(order)
            if top is None or len(self._tops) > 4096:
                if len(self._tops) > 4096:
                    self._tops.clear()  # config reloads change the table: never grow without bound
                top = self._tops[order] = ceiling([live.deployments[i].price for i in order])
            await self._budgets(decision, rec, ticket, top)
        return ticket

    def _key_limit(self, ident: Identity) -> Limit | None:
        return ident.limits or self.cfg.rate_limits.per_key

    async def _rate_limits(
        self, request: web.Request, decision: _core.Decision, rec: RequestRecord, ticket: CostTicket
    ) -> None:
        key_limit = self._key_limit(ticket.identity)
        route = decision.route
        model_limit = self._model_limits.get(route)
        if key_limit is None and model_limit is None:
            return
        tokens = decision.prompt_tokens + (decision.max_tokens or 0)
        takes: list[Take] = []
        for name, lim in ((f"key:{ticket.identity.key}", key_limit), (f"model:{route}", model_limit)):
            if lim is None:
                continue
            if lim.rpm:
                takes.append(Take(name, "requests", lim.rpm, 1))
            if lim.tpm:
                takes.append(Take(name, "tokens", lim.tpm, tokens))
        ok, states, shared = await self._take(takes)
        request[RATE_STATES] = states  # headers are made when the answer goes out
        if not ok:
            rec.outcome = "rate_limited"
            raise _rate_limit_error(states, headers_for(states))
        ticket.takes = [t for t in takes if t.kind == "tokens"]
        ticket.takes_shared = shared
        ticket.estimated_tokens = tokens

    async def _deployment_limits(
        self, router: _core.Router, table: list[Any], decision: _core.Decision, ticket: CostTicket
    ) -> None:
        limits = self.cfg.rate_limits.deployments
        if not limits:
            return
        dep = table[decision.order[0]]
        lim = limits.get(dep.name)
        if lim is None:
            return
        tokens = decision.prompt_tokens + (decision.max_tokens or 0)
        takes = [Take(f"deployment:{dep.name}", "requests", lim.rpm, 1)] if lim.rpm else []
        if lim.tpm:
            takes.append(Take(f"deployment:{dep.name}", "tokens", lim.tpm, tokens))
        ok, states, _ = await self._take(takes)
        # The core has no limit-aware selection: cool the deployment down in it until a request's
        # worth is back, so that selection routes around it (a rate-limit report, counted as a failure).
        if not ok:
            wait = max(s.wait_s for s in states)
        else:
            drained = [s for s in states if s.kind == "requests" and s.remaining < 1]
            wait = 60 / drained[0].limit if drained else 0.0
        if wait > 0:
            router.report(dep.index, "rate_limited", 0.0, math.ceil(min(wait, 60.0) * 1000))
        if ok:
            return
        if len(decision.order) > 1:
            ticket.reroute = decision.model
            return
        raise ProxyError(
            429,
            f"The only deployment for model '{decision.model}' is at its provider's rate limit; "
            f"try again in {min(wait, 60.0):.2f}s.",
            code="upstream_rate_limited",
            headers={"Retry-After": str(max(1, math.ceil(min(wait, 60.0))))},
        )

    async def _budgets(self, decision: _core.Decision, rec: RequestRecord, ticket: CostTicket, top: Ceiling) -> None:
        now = time.time()
        completion = decision.max_tokens or self.reserve_max_tokens
        route = decision.route
        prompt = decision.prompt_tokens
        hedges = 2 if decision.hedge_after_ms is not None else 1
        for step in range(2):
            estimate = top.cost(prompt, completion) * hedges
            charges = self._charges(ticket.identity, route, B.to_nano(estimate), now)
            if not charges:
                return
            res, shared = await self._reserve(charges, now)
            target = None
            if step == 0 and self._any_downgrade:
                for c, used in zip(charges, res.used_before, strict=True):
                    a = B.crossed(c.budget, used, "downgrade")
                    if a is not None and a.to is not None and a.to != route:
                        target = a.to
                        rec.admission = f"downgraded:{c.budget.name}"
                        break
            if target is not None:
                if res.ok:
                    self._adjust(charges, [-c.amount for c in charges], shared)
                route = target
                ticket.reroute = target
                top = self.ceilings[target]
                hedges = 1
                continue
            if not res.ok:
                c = charges[res.blocked]
                rec.outcome = "blocked"
                rec.admission = f"blocked:{c.budget.name}"
                raise _budget_error(c, res.used_before[res.blocked], now)
            ticket.charges, ticket.charges_shared = charges, shared
            if self._any_notify:
                self._notify(charges, res.used_before)
            return

    def _charges(self, ident: Identity, route: str, amount: int, now: float) -> list[B.Charge]:
        out = []
        for b, block_at in zip(self.budgets, self._block_at, strict=True):
            subject = _subject(b, ident, route)
            if subject is not None:
                out.append(B.charge(b, subject, self._period(b, now), amount, block_at))
        return out

    def _period(self, b: Budget, now: float) -> B.Period:
        """The budget's current period, computed once per period (or rolling slot)."""
        hit = self._periods.get(b.name)
        if hit is not None and now < hit[0]:
            return hit[1]
        p = B.period_of(b, now)
        until = p.resets_at
        if p.rolling:
            assert b.window_hours is not None
            until = (p.slot + 1) * (b.window_hours * 3600 / B.ROLLING_SLOTS)
        self._periods[b.name] = (until, p)
        return p

    # -- settlement ------------------------------------------------------------

    def settle(self, ticket: Any, rec: RequestRecord) -> None:
        if not isinstance(ticket, CostTicket):
            return
        if ticket.charges:
            actual = B.to_nano(rec.cost_usd)
            self._adjust(ticket.charges, [actual - c.amount for c in ticket.charges], ticket.charges_shared)
        if ticket.takes:
            used = (rec.usage.prompt_tokens + rec.usage.completion_tokens) if rec.usage else ticket.estimated_tokens
            delta = float(used - ticket.estimated_tokens)
            if delta:
                if ticket.takes_shared and self.shared is not None:
                    self._spawn(self.shared.adjust_buckets(ticket.takes, [delta] * len(ticket.takes)))
                else:
                    for t in ticket.takes:
                        self.local_limits.adjust(t.name, t.kind, delta)

    # -- the stores: shared when configured and up, else local -----------------

    def _shared_up(self) -> bool:
        return self.shared is not None and time.monotonic() >= self._down_until

    def _unavailable(self, what: str, e: StoreUnavailable) -> None:
        if time.monotonic() >= self._down_until:
            log.warning(
                "shared state unavailable (%s: %s); failing %s", what, e, "open" if self.fail_open else "closed"
            )
        self._down_until = time.monotonic() + 1.0
        if not self.fail_open:
            raise ProxyError(
                503,
                "Budget and rate-limit state is unavailable; requests are refused until it is back.",
                code="budget_store_unavailable",
                headers={"Retry-After": "1"},
            )

    def _check_closed(self) -> None:
        if self.shared is not None and not self.fail_open and not self._shared_up():
            self._unavailable("recently failed", StoreUnavailable("down"))

    async def _take(self, takes: list[Take]) -> tuple[bool, list[BucketState], bool]:
        self._check_closed()
        if self._shared_up():
            assert self.shared is not None
            try:
                ok, states = await self.shared.take(takes)
                return ok, states, True
            except StoreUnavailable as e:
                self._unavailable("rate limits", e)
        ok, states = self.local_limits.take(takes)
        return ok, states, False

    async def _reserve(self, charges: list[B.Charge], now: float) -> tuple[B.Reserved, bool]:
        self._check_closed()
        if self._shared_up():
            assert self.shared is not None
            try:
                return await self.shared.reserve(charges, now), True
            except StoreUnavailable as e:
                self._unavailable("budgets", e)
        return self.local_budgets.reserve_now(charges), False

    def _adjust(self, charges: list[B.Charge], deltas: list[int], shared: bool) -> None:
        if shared and self.shared is not None:
            self._spawn(self.shared.adjust_async(charges, deltas))
        else:
            self.local_budgets.adjust(charges, deltas)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except StoreUnavailable as e:
                log.warning("shared state unavailable at settlement (%s); this adjustment is lost", e)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- notifications ---------------------------------------------------------

    def _notify(self, charges: list[B.Charge], used_before: list[int]) -> None:
        for c, used in zip(charges, used_before, strict=True):
            a = B.crossed(c.budget, used + c.amount, "notify")
            if a is None:
                continue
            mark = f"{c.store_key}:{a.at_percent}"
            if mark in self._notified:
                continue
            self._notified.add(mark)
            event = {
                "event": "budget_threshold",
                "budget": c.budget.name,
                "scope": c.budget.scope,
                "subject": c.subject,
                "period": c.period.id,
                "threshold_percent": a.at_percent,
                "used_usd": round((used + c.amount) / B.NANO, 6),
                "limit_usd": c.budget.limit_usd,
                "resets_at": _iso(c.period.resets_at),
            }
            self._spawn(self._send(mark, c.period.ttl_s, a.webhook, event))

    async def _send(self, mark: str, ttl_s: int, url: str | None, event: dict[str, Any]) -> None:
        if self.shared is not None and self._shared_up():
            try:
                if not await self.shared.mark_once(mark, ttl_s):
                    return  # another instance has told already
            except StoreUnavailable:
                pass
        log.warning(
            "budget %s for %s %s reached %s%% ($%.4f of $%.2f)",
            event["budget"], event["scope"], event["subject"], event["threshold_percent"],
            event["used_usd"], event["limit_usd"],
        )  # fmt: skip
        if url is None:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.post(url, data=orjson.dumps(event), headers={"Content-Type": "application/json"}):
                pass
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("budget webhook failed: %s", type(e).__name__)

    async def close(self) -> None:
        """Waits for pending adjustments and notifications, then closes connections."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        if self._session is not None:
            await self._session.close()
        if self.shared is not None:
            await self.shared.close()


def _subject(b: Budget, ident: Identity, route: str) -> str | None:
    scope = b.scope
    if scope == "global":
        return "*"
    if scope == "key":
        value: str | None = ident.key
    elif scope == "team":
        value = ident.team
    elif scope == "user":
        value = ident.user
    else:
        value = route
    if value is None or (b.match is not None and b.match != value):
        return None
    return value


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _budget_error(c: B.Charge, used: int, now: float) -> ProxyError:
    b = c.budget
    who = "all requests" if b.scope == "global" else f"{b.scope} '{c.subject}'"
    period = {"day": "today", "month": "this month"}.get(b.period) or f"in the last {b.window_hours or 0:g} hours"
    wait = max(1, math.ceil(c.period.resets_at - now))
    return ProxyError(
        429,
        f"Budget '{b.name}' for {who} is exhausted: ${used / B.NANO:.4f} of ${b.limit_usd:.2f} spent or reserved "
        f"{period}. It resets at {_iso(c.period.resets_at)}.",
        code="budget_exceeded",
        headers={
            "Retry-After": str(wait),
            "x-edgeroute-budget": b.name,
            "x-edgeroute-budget-reset": _iso(c.period.resets_at),
        },
    )


def _rate_limit_error(states: list[BucketState], hdrs: dict[str, str]) -> ProxyError:
    worst = max((s for s in states if s.wait_s > 0), key=lambda s: s.wait_s)
    what = "requests" if worst.kind == "requests" else "tokens"
    scope, _, name = worst.name.partition(":")
    if math.isinf(worst.wait_s):
        msg = f"Request too large for {scope} '{name}': the {what} per minute limit is {worst.limit}."
        retry = "60"
    else:
        msg = (
            f"Rate limit reached for {what} per minute on {scope} '{name}': limit {worst.limit}. "
            f"Please try again in {worst.wait_s:.2f}s."
        )
        retry = str(max(1, math.ceil(worst.wait_s)))
    return ProxyError(429, msg, code="rate_limit_exceeded", headers={**hdrs, "Retry-After": retry})


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Adds the `x-ratelimit-*` headers computed at admission to the answer."""
    states = request.get(RATE_STATES)
    if states:
        for k, v in headers_for(states).items():
            response.headers.setdefault(k, v)
