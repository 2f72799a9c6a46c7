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
   cap, for each of the `n` choices, at the highest price among the deployments the
   request may use in the running config generation) is reserved in every budget the
   request falls under, atomically; at a `downgrade` threshold the request is rerouted
   to the cheaper model (the reservation and the model's rate limits follow); over a
   `block` threshold it is refused with 429 naming the budget and when it resets.

A refused request gives back its reservations and token estimates. `settle` replaces reservations by the
actual cost and token estimates by the actual tokens (a deployment's by the tokens that
deployment served). Without Redis everything is synchronous dict arithmetic
(microseconds). With Redis, admission's three checks are one script (one round trip) and
settlements are batched with other requests' after the answer; if Redis fails, `on_unavailable: open`
falls back to this instance's own counters, `closed` refuses with 503. Under
`serve --workers N` without Redis, the workers share one SQLite file instead
(`workers/local_state.py`, the same interface and guarantee on one machine).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from edgeroute import _core
from edgeroute.accounting import RequestRecord, Usage
from edgeroute.admission import Counter
from edgeroute.config import Budget, Config, Limit
from edgeroute.config.schema import MAX_FLUSH_INTERVAL_S
from edgeroute.cost import budgets as B
from edgeroute.cost import restore
from edgeroute.cost.keys import ANONYMOUS, IDENTITY, Identity, KeySource
from edgeroute.cost.ledger import Backend, Ledger
from edgeroute.cost.limits import BucketState, LocalLimiter, Take, headers_for
from edgeroute.cost.prices import Ceiling, ceiling, route_ceilings
from edgeroute.cost.redis_store import RedisState, StoreUnavailable
from edgeroute.cost.restore import Restored
from edgeroute.errors import ProxyError
from edgeroute.state import STATE, ServerState
from edgeroute.workers import worker as workers
from edgeroute.workers.local_state import SqliteState

log = logging.getLogger("edgeroute.cost")
# How long reloaded budgets wait for the previous config's requests before reading the
# ledger (streams end by their total timeout; this bounds a request that never ends).
RESTORE_WAIT_S = 600.0

RATE_STATES = web.RequestKey("rate_states", list)


@dataclass(slots=True)
class Held:
    """Token-bucket takes charged together at admission, in one store."""

    takes: list[Take]
    shared: bool
    deployment: str | None = None  # a provider limit: settled to that deployment's own tokens


@dataclass(slots=True)
class CostTicket:
    """What one request holds until settlement."""

    identity: Identity
    started: float = 0.0  # the request's start (its record's ts): which budgets count it in memory
    reroute: str | None = None  # the endpoint decides again for this model before dispatch
    tokens: int = 0  # the request's token estimate (prompt + max completions), for limits
    charges: list[B.Charge] = field(default_factory=list)
    charges_shared: bool = False
    held: list[Held] = field(default_factory=list)


_Taken = tuple[bool, list[BucketState], bool]  # allowed, the buckets' states, taken in the shared store


@dataclass(slots=True)
class _AtOnce:
    """Admission's checks made in one round trip (`CostControl._at_once`); None: not made."""

    rate: _Taken | None = None
    deployment: _Taken | None = None
    reserved: B.Reserved | None = None
    charges: list[B.Charge] = field(default_factory=list)  # what `reserved` reserved (when ok)


@dataclass(slots=True)
class _Prices:
    """Reservation ceilings for one config generation: a reload changes prices, and the
    deployment table that decisions' indices point into."""

    config: Config
    routes: dict[str, Ceiling]
    tops: dict[tuple[int, ...], Ceiling] = field(default_factory=dict)

    def top(self, order: list[int], table: list[Any]) -> Ceiling:
        key = tuple(order)
        hit = self.tops.get(key)
        if hit is None:
            if len(self.tops) > 4096:
                self.tops.clear()  # orders are few in practice: never grow without bound
            hit = self.tops[key] = ceiling([table[i].price for i in key])
        return hit


def _workers_store() -> SqliteState | None:
    """Under `serve --workers N` without Redis, the workers' one store on this machine."""
    worker = workers.current()
    return SqliteState(worker.dir / "shared.db") if worker is not None and worker.count > 1 else None


def _enabled(cfg: Config) -> bool:
    rl = cfg.rate_limits
    keyed = bool(cfg.keys) or cfg.governance.managed_keys
    return keyed or bool(cfg.budgets.limits or rl.per_key or rl.models or rl.deployments)


def _bucket_takes(name: str, lim: Limit, tokens: int) -> list[Take]:
    takes = [Take(name, "requests", lim.rpm, 1)] if lim.rpm else []
    if lim.tpm:
        takes.append(Take(name, "tokens", lim.tpm, tokens))
    return takes


def _total(u: Usage) -> int:
    return u.prompt_tokens + u.completion_tokens


def _tokens_used(rec: RequestRecord, h: Held) -> int | None:
    """Actual tokens to settle `h` to; None keeps the estimate (nothing was measured)."""
    if h.deployment is None:
        return _total(rec.usage) if rec.usage is not None else None
    attempts = [a for a in rec.attempts if a.deployment == h.deployment]
    measured = [_total(a.usage) for a in attempts if a.usage is not None]
    if measured:
        return sum(measured)
    return None if attempts else 0  # never sent there (failover, downgrade): it used nothing


class CostControl:
    """Budgets and rate limits; build with :meth:`from_config`."""

    def __init__(self, cfg: Config) -> None:
        self._prices = [_Prices(cfg, route_ceilings(cfg))]
        self.budgets: list[Budget] = []
        self.apply(cfg)
        self.local_budgets = B.LocalBudgetStore()
        # Reserved and not yet settled, per store key (what `/admin/budgets` shows as reserved).
        self.reserved: dict[str, int] = {}
        # Set when a ledger is configured: reservations are journaled with its batches, and
        # budgets a reload adds are read back from it (see `restore`).
        self.ledger: Ledger | None = None
        self._restoring: set[asyncio.Task[None]] = set()
        # Budget name -> when the generation that added (or re-scoped) it was swapped in:
        # requests that started before count from the ledger, not in memory (see `apply`).
        self._counted_from: dict[str, float] = {}
        # Managed keys (governance/keys.py), once the server runs: their budgets and spenders.
        self.keys: KeySource | None = None
        self._keys_counted: set[str] = set()  # managed keys' budgets counted since start
        self._read_at_start: dict[tuple[str, int], int] = {}  # the ledger's spend, for `seed_shared`
        self.local_limits = LocalLimiter()
        self.shared = RedisState(cfg.shared_state) if cfg.shared_state else _workers_store()
        self.fail_open = cfg.shared_state is None or cfg.shared_state.on_unavailable == "open"
        self._down_until = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._notified: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    @staticmethod
    def wanted(cfg: Config) -> bool:
        return _enabled(cfg)

    def apply(self, cfg: Config, since: float = 0.0, state: ServerState | None = None) -> None:
        """Takes the budgets and limits of a config generation (at start, and after a reload,
        at the next admission). Counters are kept by budget name and bucket name, so spend
        already recorded carries over, and a lowered limit applies to the next request.

        A budget that is new (or whose scope, match or period changed) counts each request
        once: those that started after the generation was swapped in (`since`) in memory as
        they are admitted, those that started before it from the ledger, read in the
        background once every request of the earlier generations (`state.retiring`) has
        finished and been written."""
        old = {b.name: b for b in self.budgets}
        self.cfg = cfg
        self.budgets = cfg.budgets.limits
        self.reserve_max_tokens = cfg.budgets.reserve_max_tokens
        self._model_limits = cfg.rate_limits.models
        self._block_at = [B.block_limit(b) for b in self.budgets]
        self._any_downgrade = any(a.action == "downgrade" for b in self.budgets for a in b.actions)
        self._any_notify = any(a.action == "notify" for b in self.budgets for a in b.actions)
        self._periods: dict[str, tuple[float, B.Period]] = {}
        if old and (changed := [b for b in self.budgets if not _same_counting(old.get(b.name), b)]):
            for b in changed:
                self._counted_from[b.name] = since
            self._restore_later(changed, since, state)

    def restore_at_start(self, db: Backend, keys: KeySource | None) -> None:
        """Before serving (blocking: run it in a thread): budgets, managed keys' budgets and
        rate-limit windows as the ledger left them."""
        self.keys = keys
        key_budgets = keys.budgets() if keys is not None else []
        self._keys_counted.update(b.name for b in key_budgets)
        limits = keys.limits() if keys is not None else None
        found = restore.read(db, self.cfg, key_budgets=self._spenders(key_budgets), key_limits=limits)
        self.restore(found)
        self._read_at_start = found.budgets

    async def seed_shared(self) -> None:
        """Before serving: a shared store that holds no budgets (the new run directory of
        `serve --workers N`, a Redis that restarted empty or is new) counts what the ledger
        says was spent; one instance or worker does, the others find it done. Redis that
        loses its budgets later is read back into the same way (`RedisState.spent_from_ledger`)."""
        if self.shared is None or self.ledger is None:
            return
        if isinstance(self.shared, RedisState):
            self.shared.spent_from_ledger = self._spent_now
        try:
            if await self.shared.seed(self._read_at_start):
                log.info("shared state: %d budget counters read back from the ledger", len(self._read_at_start))
        except StoreUnavailable as e:
            log.warning("shared state unavailable at start (%s): budgets are read back into it once it answers", e)

    async def _spent_now(self) -> dict[tuple[str, int], int]:
        """Every budget's spend this period, from the ledger: this instance's records written
        first, and the other instances' given the longest flush interval a config may set (a
        request they answered just before Redis lost its budgets settles into no counter: the
        ledger is where it counts)."""
        ledger = self.ledger
        assert ledger is not None
        await asyncio.gather(asyncio.to_thread(ledger.flush), asyncio.sleep(MAX_FLUSH_INTERVAL_S + 0.25))

        def read() -> dict[tuple[str, int], int]:  # in a thread: thousands of keys take a while
            keyed = self._spenders(self.keys.budgets() if self.keys is not None else [])
            return restore.read(ledger.backend, self.cfg, self.cfg.budgets.limits, key_budgets=keyed).budgets

        return await asyncio.to_thread(read)

    def _spenders(self, budgets: Sequence[Budget], from_creation: bool = False) -> list[restore.KeyBudget]:
        """Managed keys' budgets with the keys whose spend counts against each."""
        keys = self.keys
        if keys is None:
            return []
        out = []
        for b in budgets:
            key = b.match or ""
            out.append(restore.KeyBudget(b, keys.spenders(key), keys.created_at(key) if from_creation else 0.0))
        return out

    def restore(self, found: Restored) -> None:
        """Counts what the ledger says was spent (`restore.read`) before this process counted
        the budgets itself (at start; for a reloaded budget, requests that started before it)."""
        for (key, slot), amount in found.budgets.items():
            self.local_budgets.add_read_back(key, amount, slot)
        for name, kind, limit, used in found.buckets:
            self.local_limits.seed(name, kind, limit, used)

    def _restore_later(
        self, budgets: list[Budget], since: float, state: ServerState | None, key_budgets: Sequence[Budget] = ()
    ) -> None:
        if self.ledger is None:
            return
        ledger, cfg = self.ledger, self.cfg

        async def go() -> None:
            try:
                # Requests of earlier generations end by their total timeout at the latest
                # (`reload._retire` bounds its own wait the same way).
                async with asyncio.timeout(RESTORE_WAIT_S):
                    for gen in list(state.retiring) if state is not None else []:
                        await gen.wait_idle()
            except TimeoutError:
                log.warning("reloaded budgets read back with requests of the previous config still running")
            try:
                await asyncio.to_thread(ledger.flush)  # their records, queued as they finished
                spenders = self._spenders(key_budgets, from_creation=True)
                found = await asyncio.to_thread(
                    restore.read, ledger.backend, cfg, budgets, until=since, key_budgets=spenders
                )
                self.restore(found)  # this process's counters: what it counts with the shared store down
                await self._read_back_shared(found, [*budgets, *key_budgets])
            except Exception:
                log.exception("could not read the spend of reloaded budgets back from the ledger")

        task = asyncio.get_running_loop().create_task(go())
        self._restoring.add(task)
        task.add_done_callback(self._restoring.discard)

    async def _read_back_shared(self, found: Restored, budgets: Sequence[Budget]) -> None:
        """Adds the spend read back for budgets first seen after start to the shared store
        (Redis, the workers' file), where admission counts: once per budget and period, by the
        instance or worker that claims it first (the others' read is the same ledger's)."""
        if self.shared is None or not self.shared_up():
            return
        now = time.time()
        for b in budgets:
            p = B.period_of(b, now)
            prefix, suffix = f"{b.name}:", f":{p.id}"
            spent = {k: v for k, v in found.budgets.items() if k[0].startswith(prefix) and k[0].endswith(suffix)}
            try:
                if await self.shared.mark_once(f"read-back:{b.name}:{p.id}", p.ttl_s):
                    await self.shared.add_spent(spent, p.ttl_s)
            except StoreUnavailable as e:
                log.warning("budget %s: its spend so far could not reach the shared store (%s)", b.name, e)

    def _prices_for(self, cfg: Config) -> _Prices:
        """The ceilings of the generation a request runs on; the previous one is kept for
        requests that started before a reload."""
        for p in self._prices:
            if p.config is cfg:
                return p
        p = _Prices(cfg, route_ceilings(cfg))
        self._prices = [self._prices[-1], p]
        return p

    # -- admission -------------------------------------------------------------

    async def admit(
        self, request: web.Request, decision: _core.Decision, rec: RequestRecord, count: Counter | None = None
    ) -> CostTicket | None:
        ident = request.get(IDENTITY, ANONYMOUS)
        rec.key, rec.team, rec.user = ident.key, ident.team, ident.user
        ticket = CostTicket(ident, started=rec.started)
        state = request.app[STATE]
        live = state.live
        if live.config is not self.cfg:
            self.apply(live.config, live.since, state)
        choices = decision.choices
        tokens = decision.prompt_tokens + (decision.max_tokens or 0) * choices
        ticket.tokens = tokens
        budgeted = bool(self.budgets) or bool(ident.budgets)
        prices = self._prices_for(live.config) if budgeted else None
        top = prices.top(decision.order, live.deployments) if prices is not None else None
        try:
            # With Redis, the three checks below are made in one round trip up front (`_at_once`)
            # and each step reads its result from it; otherwise each step checks on its own.
            now = time.time()
            first = await self._at_once(live.deployments, decision, ticket, top, now)
            try:
                await self._rate_limits(request, decision.route, tokens, rec, ticket, first.rate)
                await self._deployment_limits(
                    live.router, live.deployments, decision, tokens, ticket, got=first.deployment
                )
            except BaseException:
                if first.reserved is not None and first.reserved.ok:
                    await self._wait([self._adjust(first.charges, [-c.amount for c in first.charges], True)])
                raise
            if prices is not None and top is not None:
                try:
                    route = await self._budgets(
                        decision, rec, ticket, prices, top, choices, prompt_upper(decision), now, first
                    )
                except ProxyError as e:
                    if e.code != "budget_exceeded" or decision.tokens_exact or count is None:
                        raise
                    # Refused by the bound: the exact count decides (nothing was reserved).
                    rec.outcome, rec.admission = "pending", None
                    route = await self._budgets(decision, rec, ticket, prices, top, choices, await count(), now)
                if route != decision.route:
                    await self._follow_downgrade(request, rec, ticket, decision.route, route, tokens)
        except BaseException:
            # Refused (or the client went away): nothing it took may stay taken.
            await self._wait(self._release(ticket))
            raise
        return ticket

    async def _at_once(
        self, table: list[Any], decision: _core.Decision, ticket: CostTicket, top: Ceiling | None, now: float
    ) -> _AtOnce:
        """With Redis up: the key and model limits, the first deployment's limits and the
        budgets' first reservation, in one script (one round trip). Else nothing: each step
        then checks on its own (in process, in the workers' file, or after Redis failed)."""
        if not isinstance(self.shared, RedisState) or not self.shared_up():
            return _AtOnce()
        takes = self._rate_takes(ticket.identity, decision.route, ticket.tokens)
        dep = self._deployment_of(table, decision)
        deployment = _bucket_takes(f"deployment:{dep[0]}", dep[1], ticket.tokens) if dep is not None else []
        charges = [] if top is None else self._first_charges(decision, ticket, top, prompt_upper(decision), now)
        if not (takes or deployment or charges):
            return _AtOnce()
        try:
            got = await self.shared.admit(takes, deployment, charges)
        except StoreUnavailable as e:
            self._unavailable("admission", e)
            return _AtOnce()
        return _AtOnce(
            None if got.rate is None else (*got.rate, True),
            None if got.deployment is None else (*got.deployment, True),
            got.reserved,
            charges,
        )

    async def rerouted(self, request: web.Request, decision: _core.Decision, ticket: Any) -> None:
        """After a reroute (a downgrade, or a first deployment at its provider limit) the
        deployment now first in line takes its provider limit too; at its limit as well,
        the request is refused rather than rerouted again."""
        if not isinstance(ticket, CostTicket):
            return
        live = request.app[STATE].live
        try:
            await self._deployment_limits(live.router, live.deployments, decision, ticket.tokens, ticket, again=False)
        except BaseException:
            await self._wait(self._release(ticket))
            raise

    def _key_limit(self, ident: Identity) -> Limit | None:
        return ident.limits or self.cfg.rate_limits.per_key

    def _rate_takes(self, ident: Identity, route: str, tokens: int) -> list[Take]:
        key_limit = self._key_limit(ident)
        model_limit = self._model_limits.get(route)
        takes = _bucket_takes(f"key:{ident.key}", key_limit, tokens) if key_limit else []
        for ancestor, lim in ident.ancestor_limits:  # the keys that made it share their limits
            takes += _bucket_takes(f"key:{ancestor}", lim, tokens)
        if model_limit is not None:
            takes += _bucket_takes(f"model:{route}", model_limit, tokens)
        return takes

    async def _rate_limits(
        self,
        request: web.Request,
        route: str,
        tokens: int,
        rec: RequestRecord,
        ticket: CostTicket,
        got: _Taken | None = None,
    ) -> None:
        """Takes the key and model limits (or reads `got`, their result taken already)."""
        takes = self._rate_takes(ticket.identity, route, tokens)
        if not takes:
            return
        ok, states, shared = got if got is not None else await self._take(takes)
        request[RATE_STATES] = states  # headers are made when the answer goes out
        if not ok:
            rec.outcome = "rate_limited"
            raise _rate_limit_error(states, headers_for(states))
        ticket.held.append(Held(takes, shared))

    async def _follow_downgrade(
        self, request: web.Request, rec: RequestRecord, ticket: CostTicket, old: str, new: str, tokens: int
    ) -> None:
        """A downgraded request counts against the target model's limits: the original model
        and its deployment will not serve it, so their takes go back."""
        gone = f"model:{old}"
        tasks = []
        for h in ticket.held:
            back = h.takes if h.deployment is not None else [t for t in h.takes if t.name == gone]
            tasks.append(self._give(back, [-t.amount for t in back], h.shared))
            h.takes = [t for t in h.takes if t not in back]
        ticket.held = [h for h in ticket.held if h.takes]
        await self._wait(tasks)
        states = [s for s in request.get(RATE_STATES, []) if s.name != gone]
        request[RATE_STATES] = states
        lim = self._model_limits.get(new)
        takes = _bucket_takes(f"model:{new}", lim, tokens) if lim is not None else []
        if not takes:
            return
        ok, taken, shared = await self._take(takes)
        states += taken
        if not ok:
            rec.outcome = "rate_limited"
            raise _rate_limit_error(states, headers_for(states))
        ticket.held.append(Held(takes, shared))

    async def _deployment_limits(
        self,
        router: _core.Router,
        table: list[Any],
        decision: _core.Decision,
        tokens: int,
        ticket: CostTicket,
        again: bool = True,
        got: _Taken | None = None,
    ) -> None:
        """Takes the provider limit of the decision's first deployment (or reads `got`, taken
        already); at its limit, asks the endpoint to decide again (`again`) when the model has
        other deployments, else refuses."""
        found = self._deployment_of(table, decision)
        if found is None:
            return
        name, lim = found
        dep = table[decision.order[0]]
        takes = _bucket_takes(f"deployment:{name}", lim, tokens)
        ok, states, shared = got if got is not None else await self._take(takes)
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
            ticket.held.append(Held(takes, shared, name))
            return
        if again and len(decision.order) > 1:
            ticket.reroute = decision.model
            return
        raise ProxyError(
            429,
            f"The only deployment for model '{decision.model}' is at its provider's rate limit; "
            f"try again in {min(wait, 60.0):.2f}s.",
            code="upstream_rate_limited",
            headers={"Retry-After": str(max(1, math.ceil(min(wait, 60.0))))},
        )

    def _deployment_of(self, table: list[Any], decision: _core.Decision) -> tuple[str, Limit] | None:
        """The decision's first deployment and its provider limit, when it has one."""
        limits = self.cfg.rate_limits.deployments
        if not limits:
            return None
        name: str = table[decision.order[0]].name
        lim = limits.get(name)
        return None if lim is None else (name, lim)

    def _first_charges(
        self, decision: _core.Decision, ticket: CostTicket, top: Ceiling, prompt: int, now: float
    ) -> list[B.Charge]:
        """The reservations of the request's maximum cost on its own route."""
        completion = (decision.max_tokens or self.reserve_max_tokens) * decision.choices
        hedges = 2 if decision.hedge_after_ms is not None else 1
        return self._charges(ticket, decision.route, B.to_nano(top.cost(prompt, completion) * hedges), now)

    async def _budgets(
        self,
        decision: _core.Decision,
        rec: RequestRecord,
        ticket: CostTicket,
        prices: _Prices,
        top: Ceiling,
        choices: int,
        prompt: int,
        now: float,
        first: _AtOnce | None = None,
    ) -> str:
        """Reserves the request's maximum cost (its first reservation made already when `first`
        has it); returns the route reserved for (a downgrade's target)."""
        completion = (decision.max_tokens or self.reserve_max_tokens) * choices
        route = decision.route
        hedges = 2 if decision.hedge_after_ms is not None else 1
        for step in range(2):
            if step == 0 and first is not None and first.reserved is not None:
                charges, res, shared = first.charges, first.reserved, True
            else:
                estimate = top.cost(prompt, completion) * hedges
                charges = self._charges(ticket, route, B.to_nano(estimate), now)
                if not charges:
                    return route
                res, shared = await self._reserve(charges, now)
            target = self._downgrade_to(charges, res.used_before, route, prices) if step == 0 else None
            if target is not None:
                rec.admission = f"downgraded:{target[1]}"
                if res.ok:
                    # Undone before reserving again, or the second reservation would see both.
                    await self._wait([self._adjust(charges, [-c.amount for c in charges], shared)])
                route = target[0]
                ticket.reroute = route
                top = prices.routes[route]
                hedges = 1
                continue
            if not res.ok:
                c = charges[res.blocked]
                rec.outcome = "blocked"
                rec.admission = f"blocked:{c.budget.name}"
                raise _budget_error(c, res.used_before[res.blocked], now)
            ticket.charges, ticket.charges_shared = charges, shared
            self._hold(rec.request_id, now, charges)
            if self._any_notify:
                self._notify(charges, res.used_before)
            return route
        return route

    def _downgrade_to(
        self, charges: list[B.Charge], used_before: list[int], route: str, prices: _Prices
    ) -> tuple[str, str] | None:
        """(target model, budget name) of the first downgrade threshold crossed, if any; a target
        that a reload removed from the config is skipped."""
        if not self._any_downgrade:
            return None
        for c, used in zip(charges, used_before, strict=True):
            a = B.crossed(c.budget, used, "downgrade")
            if a is not None and a.to is not None and a.to != route and a.to in prices.routes:
                return a.to, c.budget.name
        return None

    def _charges(self, ticket: CostTicket, route: str, amount: int, now: float) -> list[B.Charge]:
        ident = ticket.identity
        out = []
        for b, block_at in zip(self.budgets, self._block_at, strict=True):
            if ticket.started < self._counted_from.get(b.name, 0.0):
                continue  # started before the reload that added it: counted from the ledger
            subject = _subject(b, ident, route)
            if subject is not None:
                out.append(B.charge(b, subject, self._period(b, now), amount, block_at))
        for b in ident.budgets:  # a managed key's own, then its creators' (governance/keys.py)
            if b.name not in self._keys_counted:
                self._count_key_budget(b, ticket.started)
            if ticket.started < self._counted_from.get(b.name, 0.0):
                continue
            assert b.match is not None
            out.append(B.charge(b, b.match, self._period(b, now), amount, B.block_limit(b)))
        return out

    def _count_key_budget(self, b: Budget, since: float) -> None:
        """A managed key's budget seen for the first time since start (a key created, or given a
        budget, since): requests from `since` count in memory as they are admitted, those before
        from the ledger, read in the background."""
        self._keys_counted.add(b.name)
        self._counted_from[b.name] = since
        self._restore_later([], since, None, key_budgets=[b])

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

    def _hold(self, request_id: str, now: float, charges: list[B.Charge]) -> None:
        """Notes the reservations as held until settled, and journals them with the ledger."""
        for c in charges:
            self.reserved[c.store_key] = self.reserved.get(c.store_key, 0) + c.amount
            if self.ledger is not None:
                self.ledger.journal(request_id, now, c.store_key, c.amount)

    def _unhold(self, charges: list[B.Charge]) -> None:
        for c in charges:
            left = self.reserved.get(c.store_key, 0) - c.amount
            if left > 0:
                self.reserved[c.store_key] = left
            else:
                self.reserved.pop(c.store_key, None)

    def settle(self, ticket: Any, rec: RequestRecord) -> None:
        if not isinstance(ticket, CostTicket):
            return
        if ticket.charges:
            self._unhold(ticket.charges)
            actual = B.to_nano(rec.cost_usd)
            self._adjust(ticket.charges, [actual - c.amount for c in ticket.charges], ticket.charges_shared)
        for h in ticket.held:
            used = _tokens_used(rec, h)
            if used is not None:
                tokens = [t for t in h.takes if t.kind == "tokens"]
                self._give(tokens, [used - t.amount for t in tokens], h.shared)

    def _release(self, ticket: CostTicket) -> list[asyncio.Task[None] | None]:
        """Gives back what a refused request took: its reservations, its token estimates and its
        deployment's request (the provider never saw it). Key and model limits still count the
        request itself, as OpenAI counts unsuccessful requests against requests per minute."""
        tasks = []
        for h in ticket.held:
            back = [t for t in h.takes if t.kind == "tokens" or h.deployment is not None]
            tasks.append(self._give(back, [-t.amount for t in back], h.shared))
        if ticket.charges:
            self._unhold(ticket.charges)
            tasks.append(self._adjust(ticket.charges, [-c.amount for c in ticket.charges], ticket.charges_shared))
        ticket.held, ticket.charges = [], []
        return tasks

    # -- the stores: shared when configured and up, else local -----------------

    def shared_up(self) -> bool:
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
        if self.shared is not None and not self.fail_open and not self.shared_up():
            self._unavailable("recently failed", StoreUnavailable("down"))

    async def _take(self, takes: list[Take]) -> tuple[bool, list[BucketState], bool]:
        self._check_closed()
        if self.shared_up():
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
        if self.shared_up():
            assert self.shared is not None
            try:
                return await self.shared.reserve(charges, now), True
            except StoreUnavailable as e:
                self._unavailable("budgets", e)
        return self.local_budgets.reserve_now(charges), False

    def _adjust(self, charges: list[B.Charge], deltas: list[int], shared: bool) -> asyncio.Task[None] | None:
        """Adds `deltas` to reservations; a task when they go to Redis."""
        if shared and self.shared is not None:
            return self._spawn(self.shared.adjust_async(charges, deltas))
        self.local_budgets.adjust(charges, deltas)
        return None

    def _give(self, takes: list[Take], deltas: list[float], shared: bool) -> asyncio.Task[None] | None:
        """Takes `deltas` more from buckets (gives back when negative); a task when they are in Redis."""
        pairs = [(t, d) for t, d in zip(takes, deltas, strict=True) if d]
        if not pairs:
            return None
        if shared and self.shared is not None:
            return self._spawn(self.shared.adjust_buckets([t for t, _ in pairs], [d for _, d in pairs]))
        for t, d in pairs:
            self.local_limits.adjust(t.name, t.kind, d)
        return None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await coro
            except StoreUnavailable as e:
                log.warning("shared state unavailable at settlement (%s); this adjustment is lost", e)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _wait(tasks: list[asyncio.Task[None] | None]) -> None:
        """Waits for adjustments that must land before the next step (tasks: they finish even if
        this request is cancelled meanwhile)."""
        pending = [t for t in tasks if t is not None]
        if pending:
            await asyncio.wait(pending)

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
        if self.shared is not None and self.shared_up():
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
        for task in self._restoring:
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        if self._session is not None:
            await self._session.close()
        if self.shared is not None:
            await self.shared.close()


def _same_counting(old: Budget | None, new: Budget) -> bool:
    """Whether `new` counts the same spend as `old` (a changed limit or action does not matter)."""
    if old is None:
        return False
    keep = ("scope", "match", "period", "window_hours", "utc_offset_minutes")
    return all(getattr(old, f) == getattr(new, f) for f in keep)


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


def prompt_upper(decision: _core.Decision) -> int:
    """The prompt's tokens, or a bound no count can exceed: the core's estimate is a quarter of
    the text's bytes (scaled by the encoding), and no token is shorter than a byte. Reserving
    by it keeps exact BPE counting (tens of microseconds per thousand tokens) off the request
    path; a request the bound alone refuses is counted exactly."""
    return decision.prompt_tokens if decision.tokens_exact else 4 * decision.prompt_tokens


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
