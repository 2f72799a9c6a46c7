"""Where budgets and token buckets are counted: the shared store (Redis, or the workers' file)
when one is configured and up, else this process's own counters.

After a failure the shared store is left alone for a second: `on_unavailable: open` counts in
process meanwhile, `closed` refuses with 503. Adjustments to the shared store run as tasks
(`_spawn`), so a request never waits for its settlement.

While Redis answers, this process's counters follow its budget counters each second
(`follow_shared`): what the fleet spent is what `open` counts from when Redis stops
answering, not only what Redis said at this process's own last admission."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from edgeroute.cost import budgets as B
from edgeroute.cost.limits import BucketState, LocalLimiter, Take, held_takes
from edgeroute.cost.redis_store import RedisState
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.errors import ProxyError
from edgeroute.workers import worker as workers
from edgeroute.workers.local_state import SqliteState

log = logging.getLogger("edgeroute.cost")
FOLLOW_S = 1.0  # how often this process's counters follow Redis's (one script, not per request)
FOLLOW_MOST = 5000  # counters read per pass; more are read in turns
# With Redis failing: the ledger is read (raising this process's counters) at most this often,
# one read at a time, and fail-open reservations wait for it at most this long from its start
# (after that they are admitted on this process's counters while it finishes).
LEDGER_READ_EVERY_S = 10.0
LEDGER_READ_WAIT_S = 0.2


def workers_store() -> SqliteState | None:
    """Under `serve --workers N` without Redis, the workers' one store on this machine."""
    worker = workers.current()
    return SqliteState(worker.dir / "shared.db") if worker is not None and worker.count > 1 else None


class Stores:
    """The stores and the adjustments sent to them (a part of `CostControl`)."""

    shared: RedisState | SqliteState | None  # None: this process counts alone
    local_budgets: B.LocalBudgetStore
    local_limits: LocalLimiter
    fail_open: bool
    _down_until: float  # the shared store is not asked again before this (monotonic)
    _tasks: set[asyncio.Task[Any]]  # adjustments and notifications under way
    _following: asyncio.Task[None] | None  # `follow_shared`'s loop
    _ledger_read: asyncio.Task[None] | None  # `_read_ledger_now`, once Redis failed
    _ledger_read_at: float  # when it was last started (monotonic)

    def shared_up(self) -> bool:
        return self.shared is not None and time.monotonic() >= self._down_until

    def follow_shared(self) -> None:
        """Starts following Redis's budget counters (with `on_unavailable: open`)."""
        if isinstance(self.shared, RedisState) and self.fail_open and self._following is None:
            self._following = asyncio.get_running_loop().create_task(self._follow(self.shared))

    async def _follow(self, shared: RedisState) -> None:
        """Each second while Redis answers, this process's counters are set to Redis's: the
        other instances' spend since this one's last admission was admitted again in full on
        fail-open (one instance, quiet while another spent 18 of 20, then admitted 19 more).
        Not while spend this process admitted during an outage is still on its way to Redis."""
        start = 0
        while True:
            await asyncio.sleep(FOLLOW_S)
            if not self.shared_up() or not shared.outage_settled():
                continue
            cal, rolling, next_start = self.local_budgets.to_follow(start, FOLLOW_MOST)
            if not cal and not rolling:
                start = 0
                continue
            try:
                got = await shared.read_counters(cal, rolling)
            except StoreUnavailable:
                continue  # admission finds it out and follows `on_unavailable`
            if self.shared_up():
                self.local_budgets.follow(*got)
                start = next_start

    def _unavailable(self, what: str, e: StoreUnavailable) -> None:
        if time.monotonic() >= self._down_until:
            log.warning(
                "shared state unavailable (%s: %s); failing %s", what, e, "open" if self.fail_open else "closed"
            )
        self._down_until = time.monotonic() + 1.0
        reading = self._ledger_read is not None and not self._ledger_read.done()
        if self.fail_open and not reading and time.monotonic() - self._ledger_read_at >= LEDGER_READ_EVERY_S:
            self._ledger_read_at = time.monotonic()
            self._ledger_read = self._read_ledger_now()
        if not self.fail_open:
            raise ProxyError(
                503,
                "Budget and rate-limit state is unavailable; requests are refused until it is back.",
                code="budget_store_unavailable",
                headers={"Retry-After": "1"},
            )

    def _read_ledger_now(self) -> asyncio.Task[None] | None:
        """Raises this process's counters to the ledger's spend (`ReadBack`); None without a ledger."""
        return None

    def _check_closed(self) -> None:
        if self.shared is not None and not self.fail_open and not self.shared_up():
            self._unavailable("recently failed", StoreUnavailable("down"))

    async def _take(self, takes: list[Take]) -> tuple[bool, list[BucketState], bool]:
        self._check_closed()
        if self.shared_up():
            assert self.shared is not None
            try:
                ok, states = await self._shared_take(self.shared, takes)
                return ok, states, True
            except StoreUnavailable as e:
                self._unavailable("rate limits", e)
        ok, states = self.local_limits.take(takes)
        return ok, states, False

    async def _shared_take(self, shared: RedisState | SqliteState, takes: list[Take]) -> tuple[bool, list[BucketState]]:
        """`shared.take(takes)`; a caller cancelled meanwhile (its client hung up) gives back the
        tokens it took once the store answers: it had no ticket to give them back from, so its
        take (up to a whole bucket without max_tokens) stayed until the bucket refilled."""
        task = asyncio.ensure_future(shared.take(takes))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._give_back_abandoned(takes, done))
            raise

    def _give_back_abandoned(self, takes: list[Take], done: asyncio.Future[tuple[bool, list[BucketState]]]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        ok, states = done.result()
        if ok:  # the request itself still counts against its rate, as a refused one's does
            back = [t for t in held_takes(takes, states) if t.kind == "tokens"]
            self._give(back, [-t.amount for t in back], True)

    async def _reserve(self, charges: list[B.Charge], now: float) -> tuple[B.Reserved, bool]:
        self._check_closed()
        if self.shared_up():
            assert self.shared is not None
            try:
                return await self._shared_reserve(self.shared, charges, now), True
            except StoreUnavailable as e:
                self._unavailable("budgets", e)
        left = self._ledger_read_at + LEDGER_READ_WAIT_S - time.monotonic()
        if (read := self._ledger_read) is not None and not read.done() and left > 0:
            # Counters raised to what the ledger holds first: the other instances' spend on a
            # budget (or period) this process never counted was admitted again in full. Not
            # for long: a locked or large ledger held every fail-open request 2 s.
            await asyncio.wait([read], timeout=left)
        return self.local_budgets.reserve_now(charges), False

    async def _shared_reserve(
        self, shared: RedisState | SqliteState, charges: list[B.Charge], now: float
    ) -> B.Reserved:
        """`shared.reserve(charges)`, as `_shared_take`: a caller cancelled meanwhile (its client
        hung up) gives its reservation back once the store answers. The workers' file commits in
        its thread and Redis runs its script whatever the caller does; with no ticket holding
        the charges, nothing gave them back, and the budget counted them as spent to the end
        of its period."""
        task = asyncio.ensure_future(shared.reserve(charges, now))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._give_back_reserved(charges, done))
            raise

    def _give_back_reserved(self, charges: list[B.Charge], done: asyncio.Future[B.Reserved]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        res = done.result()
        if res.ok:
            self._seen_shared(charges, res)  # this process's counters, as the admitted one's follow
            # Never journaled: no seed of Redis counted it (request id '').
            self._adjust(charges, [-c.amount for c in charges], True, res.generation)

    def _seen_shared(self, charges: list[B.Charge], res: B.Reserved) -> None:
        """This process's counters follow what the shared store said at each reservation (and
        every adjustment sent there, `_adjust`): with Redis down and `on_unavailable: open`
        they are what admission counts on, and held only what was read back at start, so a
        budget already spent through Redis was admitted in full again by every instance."""
        for i, (c, used) in enumerate(zip(charges, res.used_before, strict=False)):
            if res.ok:
                self.local_budgets.at_least(c, used + c.amount)
            elif i == res.blocked:
                self.local_budgets.at_least(c, used)

    def _settled(self, charges: list[B.Charge]) -> None:
        """Called once a request's charges hold what it cost (`Notifications` tells thresholds)."""

    def _adjust(
        self, charges: list[B.Charge], deltas: list[int], shared: bool, gen: str = "", request_id: str = ""
    ) -> asyncio.Task[None] | None:
        """Adds `deltas` to reservations; a task when they go to Redis (this process's counters
        follow them, see `_seen_shared`). In Redis they are of generation `gen`'s counters,
        by `request_id` ('': a reservation never journaled; see `RedisState.adjust_async`)."""
        self.local_budgets.adjust(charges, deltas)
        if shared and isinstance(self.shared, RedisState):
            return self._spawn(self.shared.adjust_async(charges, deltas, gen, request_id))
        if shared and self.shared is not None:
            return self._spawn(self.shared.adjust_async(charges, deltas))
        return None

    def _give(self, takes: list[Take], deltas: list[float], shared: bool) -> asyncio.Task[None] | None:
        """Takes `deltas` more from buckets (gives back when negative); a task when they are in Redis."""
        pairs = [(t, d) for t, d in zip(takes, deltas, strict=True) if d]
        if not pairs:
            return None
        if shared and self.shared is not None:
            return self._spawn(self.shared.adjust_buckets([t for t, _ in pairs], [d for _, d in pairs]))
        for t, d in pairs:
            self.local_limits.adjust(t.name, t.kind, d, limit=t.limit)
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
