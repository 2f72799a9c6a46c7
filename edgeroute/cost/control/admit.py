"""`CostControl`: a config generation's budgets and limits, and the admission of one request
through its parts (rate limits, deployment limits, budgets) in that order."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from edgeroute import _core
from edgeroute.accounting import RequestRecord
from edgeroute.admission import CanServe, Counter
from edgeroute.config import Budget, Config, SharedStateLiveness
from edgeroute.cost import budgets as B
from edgeroute.cost.control import parallel
from edgeroute.cost.control.liveness import Liveness, ledger_identity
from edgeroute.cost.control.rate_limits import RATE_STATES, RateLimits, bucket_takes
from edgeroute.cost.control.read_back import same_counting
from edgeroute.cost.control.reservations import Prices, Reservations, prompt_upper
from edgeroute.cost.control.stores import workers_store
from edgeroute.cost.control.ticket import AtOnce, CostTicket
from edgeroute.cost.keys import ANONYMOUS, IDENTITY
from edgeroute.cost.limits import LocalLimiter, given_back
from edgeroute.cost.media import Media
from edgeroute.cost.prices import Ceiling, route_ceilings
from edgeroute.cost.redis_runs import RunRegistry
from edgeroute.cost.redis_store import RedisState
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.errors import ProxyError
from edgeroute.leases import RedisLeases, SharedSlots, SqliteLeases
from edgeroute.state import STATE, Live, ServerState
from edgeroute.workers import worker as workers

log = logging.getLogger("edgeroute.cost")
# How long closing waits, in all, for settlements and notifications under way (a drain's end).
CLOSE_WAIT_S = 5.0


def _enabled(cfg: Config) -> bool:
    rl = cfg.rate_limits
    keyed = bool(cfg.keys) or cfg.governance.managed_keys
    return keyed or bool(cfg.budgets.limits or rl.per_key or rl.models or rl.deployments)


def _shared_slots(cfg: Config, fail_open: bool) -> Callable[[], SharedSlots] | None:
    """Where keys' `max_parallel` slots are shared: Redis (`shared_state`), else the workers'
    file under `serve --workers N`; None: this process counts alone."""
    label = "shared key parallel limits"
    if (shared := cfg.shared_state) is not None:
        return lambda: SharedSlots(RedisLeases(shared, "par"), fail_open, label)
    worker = workers.current()
    if worker is not None and worker.count > 1:
        path = worker.dir / "parallel.sqlite"
        return lambda: SharedSlots(SqliteLeases(path), True, label)
    return None


class CostControl(Reservations, RateLimits):
    """Budgets and rate limits: `CostControl(cfg)`, then the server sets `ledger` and `keys`.

    Its parts, one module each: `Stores` (shared or local), `RateLimits`, `Reservations`
    (budgets), `Settlement`, `ReadBack` (spend read back from the ledger), `Notifications`."""

    def __init__(self, cfg: Config) -> None:
        # Each attribute is declared, with what it holds, in the part that owns it.
        self._prices = [Prices(cfg, route_ceilings(cfg))]
        self.budgets = []
        self.apply(cfg)
        self.local_budgets = B.LocalBudgetStore()
        # The time admission goes by (rate-limit journal, Retry-After); a test's clock too. A
        # request's budgets are charged in the periods of its start (`Reservations._charges`).
        self.clock: Callable[[], float] = time.time
        self.reserved = {}
        self.ledger = None
        self._restoring = set()
        self._counted_from = {}
        self._months = (B.Period("", 0.0, 0), {})
        self.keys = None
        self._read_at_start = {}
        self._in_flight_at_start = frozenset()
        self._buckets_at_start = []
        self.local_limits = LocalLimiter()
        self.shared = RedisState(cfg.shared_state) if cfg.shared_state else workers_store()
        self.fail_open = cfg.shared_state is None or cfg.shared_state.on_unavailable == "open"
        self.parallel = parallel.ParallelSlots(_shared_slots(cfg, self.fail_open))
        self._down_until = 0.0
        self._tasks = set()
        self._following = None
        self._ledger_read = None
        self._ledger_read_at = -math.inf
        self._notified = {}
        self._session = None
        self.liveness = None

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
        self.reserve_tool_calls = cfg.budgets.reserve_tool_calls
        self._model_limits = cfg.rate_limits.models
        self._block_at = [B.block_limit(b) for b in self.budgets]
        self._any_downgrade = any(a.action == "downgrade" for b in self.budgets for a in b.actions)
        self._any_notify = any(a.action == "notify" for b in self.budgets for a in b.actions)
        self._periods = {}
        if old and (changed := [b for b in self.budgets if not same_counting(old.get(b.name), b)]):
            for b in changed:
                self._counted_from[b.name] = since
            self._restore_later(changed, since, state)

    def current(self, state: ServerState) -> None:
        """Takes the running config generation's budgets and limits if a reload swapped it in
        since: at an admission, and before `/admin/budgets` shows them (it showed the old ones,
        $7 left of a budget lowered to $3, until a request was admitted)."""
        live = state.live
        if live.config is not self.cfg:
            self.apply(live.config, live.since, state)

    # -- admission -------------------------------------------------------------

    async def admit(
        self,
        request: web.Request,
        decision: _core.Decision,
        rec: RequestRecord,
        count: Counter | None = None,
        can_serve: CanServe | None = None,
        media: Media | None = None,
    ) -> CostTicket | None:
        ident = request.get(IDENTITY, ANONYMOUS)
        rec.key, rec.team, rec.user = ident.key, ident.team, ident.user
        ticket = CostTicket(ident, rec.request_id, started=rec.started, can_serve=can_serve)
        if self.liveness is not None:
            ticket.run_epoch = self.liveness.epoch
        state = request.app[STATE]
        self.current(state)
        live = state.live
        choices = decision.choices
        budgeted = bool(self.budgets) or bool(ident.budgets)
        prices = self._prices_for(live.config) if budgeted else None
        top = prices.top(decision.route, decision.order, live.deployments) if prices is not None else None
        tokens = ticket.tokens = decision.prompt_tokens + (decision.max_tokens or 1) * choices
        if not decision.max_tokens:
            ticket.more, ticket.answers = self._unbounded_more(decision, top, live), choices
        if media is not None and prices is not None:
            ticket.media = await media()
        if wanted := parallel.caps(ident, self._key_parallel(ident)):
            # First: refused at its key's cap, a request takes nothing from its rate limits or budgets.
            try:
                ticket.parallel = self.parallel.count_here(wanted)
            except ProxyError:
                rec.outcome = "rate_limited"
                raise
        try:
            # With Redis, the four checks below are made in one round trip up front (`_at_once`)
            # and each step reads its result from it; otherwise each step checks on its own.
            now = self.clock()
            first = await self._at_once(live.deployments, decision, ticket, top, now, wanted)
            if wanted:
                await self._lease_slots(wanted, ticket, rec, first)
            try:
                await self._rate_limits(request, decision.route, tokens, rec, ticket, first.rate)
                await self._deployment_limits(
                    live.router, live.deployments, decision, tokens, ticket, got=first.deployment
                )
            except BaseException:
                if first.reserved is not None and first.reserved.ok:
                    back = [-c.amount for c in first.charges]
                    await self._wait([self._adjust(first.charges, back, True, first.reserved.generation)])
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
            if states := request.get(RATE_STATES):
                request[RATE_STATES] = given_back(states)
            raise
        self._journal_takes(rec.request_id, now, ticket.held)
        return ticket

    def _unbounded_more(self, decision: _core.Decision, top: Ceiling | None, live: Live) -> int:
        """The output a request naming no bound takes from TPM buckets beyond one token per
        answer, as far as each holds (a quarter of the limit at least: `limits.unbounded_take`):
        up to `rate_limits.unbounded_output_tokens`, else what its budgets reserve for it
        (`Reservations._completion`). So a lone one is served under a TPM below that bound, and
        those sent alongside find the bucket drained and get its 429; settlement gives back
        what the answer did not use."""
        per_answer = self.cfg.rate_limits.unbounded_output_tokens
        if per_answer is None:
            if top is None:
                top = self._prices_for(live.config).top(decision.route, decision.order, live.deployments)
            per_answer = self._completion(decision, top)
        return (per_answer - 1) * decision.choices

    def mirror_ticket(self, decision: _core.Decision, live: Live) -> CostTicket | None:
        """A shadow mirror's ticket: no client limit or budget counts a mirror, but the provider
        limits of the deployments it is sent to do (a mirror of every request took a
        deployment's provider quota from its own traffic, uncounted), by the client's rule:
        a mirror naming no output bound takes as much of a TPM as holds, up to the reservation."""
        if not self.cfg.rate_limits.deployments:
            return None
        ticket = CostTicket(ANONYMOUS, tokens=decision.prompt_tokens + (decision.max_tokens or 1) * decision.choices)
        if not decision.max_tokens:
            ticket.more, ticket.answers = self._unbounded_more(decision, None, live), decision.choices
        return ticket

    async def count_request(self, request: web.Request) -> None:
        """A request that reaches no upstream (`/v1/route/explain`, `/v1/messages/count_tokens`)
        counts against its key's RPM, as a cache hit does, so that a key held to a few requests
        a minute cannot have bodies decided or counted without end (CPU every tenant shares).
        It spends nothing: no tokens (TPM counts what upstreams are sent), no budget, and no
        model or provider limit (no model serves it)."""
        self.current(request.app[STATE])
        await self._request_limits(request, request.get(IDENTITY, ANONYMOUS))

    async def _at_once(
        self,
        table: list[Any],
        decision: _core.Decision,
        ticket: CostTicket,
        top: Ceiling | None,
        now: float,
        wanted: list[tuple[str, int]],
    ) -> AtOnce:
        """With Redis up: the keys' slots in flight (`wanted`), the key and model limits, the
        first deployment's limits and the budgets' first reservation, in one script (one round
        trip). Else nothing: each step then checks on its own (in process, in the workers'
        file, or after Redis failed)."""
        if not isinstance(self.shared, RedisState) or not self.shared_up():
            return AtOnce()
        takes = self._rate_takes(ticket.identity, decision.route, ticket.tokens, ticket.more, ticket.answers)
        dep = self._deployment_of(table, decision)
        more, answers = ticket.more, ticket.answers
        deployment = bucket_takes(f"deployment:{dep[0]}", dep[1], ticket.tokens, more, answers) if dep else []
        charges = [] if top is None else self._first_charges(decision, ticket, top, prompt_upper(decision), now)
        leases = (self.parallel.in_script(wanted) or []) if wanted else []
        if not (takes or deployment or charges or leases):
            return AtOnce()
        try:
            got = await self.shared.admit(takes, deployment, charges, leases)
        except StoreUnavailable as e:
            self._unavailable("admission", e)
            return AtOnce()
        return AtOnce(
            None if got.rate is None else (*got.rate, True),
            None if got.deployment is None else (*got.deployment, True),
            got.reserved,
            charges,
            got.leased,
            got.lease_refused,
            leases,
        )

    async def _lease_slots(
        self, wanted: list[tuple[str, int]], ticket: CostTicket, rec: RequestRecord, first: AtOnce
    ) -> None:
        """The fleet's slots of the keys in `wanted` (counted in this process already): leased
        by the admission script, or in a round trip of their own when it did not run."""
        if first.leased:
            self.parallel.adopt(first.leases, ticket.parallel)
            ticket.parallel_leased = True
            return
        if first.lease_refused >= 0:
            rec.outcome = "rate_limited"
            raise parallel.refused(*wanted[first.lease_refused])
        if first.leased is False:
            return  # the key and model buckets refused it: their 429 follows
        if isinstance(self.shared, RedisState) and not self.shared_up():
            # Redis failed within the last second: this process's count alone (open), or the 503
            # (closed), at once. Asked anyway, each capped key's request waited out its timeout.
            self._check_closed()
            # Leased at the next renewal, so that the fleet counts them once Redis answers.
            ticket.parallel_leased = self.parallel.unleased(ticket.parallel)
            return
        try:
            ticket.parallel_leased = await self.parallel.lease(wanted)
        except ProxyError:
            rec.outcome = "rate_limited"
            raise
        except StoreUnavailable as e:
            self._unavailable("key parallel limits", e)  # raised only when closed: a 503

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

    async def start_liveness(self) -> None:
        """With Redis and a ledger: this instance's heartbeat, and the sweep that records the
        requests of instances that stopped without settling them (`liveness`)."""
        if not isinstance(self.shared, RedisState) or self.ledger is None:
            return
        ledger = self.ledger
        try:
            where = await asyncio.to_thread(ledger_identity, ledger.backend)
        except Exception as e:  # the ledger was read at start; this only names it
            log.warning(
                "shared state: the ledger could not be named (%s); stopped instances' requests are not recorded", e
            )
            return
        registry = RunRegistry(self.shared.pipe, self.shared.prefix, where)
        timing = self.cfg.shared_state.liveness if self.cfg.shared_state is not None else SharedStateLiveness()
        self.liveness = Liveness(registry, ledger, self._limits, timing)
        try:
            await self.liveness.beat()
        except StoreUnavailable:
            pass  # the heartbeat tries again: settlements wait for it
        self.liveness.start()

    def _limits(self) -> list[Budget]:
        return self.cfg.budgets.limits

    async def close(self) -> None:
        """Waits for pending adjustments and notifications (`CLOSE_WAIT_S` in all), then closes
        connections."""
        # One deadline for every wait: each waited its own 5 s in turn, on the same stalled
        # store (a settlement's round trip), so a drain's end took 10 s more than that store's
        # grace, past the supervisor's (`--workers`), which then killed the worker unflushed.
        end = time.monotonic() + CLOSE_WAIT_S

        def left() -> float:
            return max(0.0, end - time.monotonic())

        for task in self._restoring:
            task.cancel()
        if self.liveness is not None:
            await self.liveness.stop(left())
        if self._following is not None:
            self._following.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=left())
        if self._session is not None:
            await self._session.close()
        await self.parallel.close()
        if self.shared is not None:
            await self.shared.close(left())
