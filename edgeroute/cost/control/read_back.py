"""Spend read back from the ledger: at start (budgets, every managed key's counter, rate-limit
windows), into a shared store that lost or never had its budgets, and for a budget a reload
adds or re-scopes, which counts each request once: those that started after the reload in
memory, those before from the ledger (`restore.read` reads it).

A managed key's monthly spend is counted whether or not it has a budget (`cost.keys.key_counter`:
read back at start, added to at settlement), so a budget given to a key later, or taken off
and given back, needs no read-back: it starts from the month so far, requests still running
when it was given included."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

from edgeroute.accounting import RequestRecord
from edgeroute.config import Budget, Config
from edgeroute.config.schema import MAX_FLUSH_INTERVAL_S
from edgeroute.cost import budgets as B
from edgeroute.cost import restore
from edgeroute.cost.control import crashed
from edgeroute.cost.control.stores import Stores
from edgeroute.cost.keys import KeySource, key_budget_name, key_counter
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import Backend
from edgeroute.cost.redis_store import LedgerSpend, RedisState
from edgeroute.cost.restore import Restored
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.state import ServerState
from edgeroute.workers import worker as workers

log = logging.getLogger("edgeroute.cost")
# How long reloaded budgets wait for the previous config's requests before reading the
# ledger (streams end by their total timeout; this bounds a request that never ends).
RESTORE_WAIT_S = 600.0
# The fail-open ledger read (`_read_ledger_now`): its deadline, and the subjects of a budget
# per user (team, key, model) it counts, those that spent the most.
LEDGER_READ_WITHIN_S = 5.0
LEDGER_READ_MOST = 1000
UNWRITTEN_WAIT_S = 2.0  # how long a refill waits for a ledger flush under way to take its records
T = TypeVar("T")


class ReadBack(Stores):
    """When each budget is counted from the ledger (a part of `CostControl`)."""

    cfg: Config
    # Set when a ledger is configured: reservations are journaled with its batches, and
    # budgets a reload adds are read back from it.
    ledger: Ledger | None
    # Managed keys (governance/keys.py), once the server runs: their budgets and spenders.
    keys: KeySource | None
    _restoring: set[asyncio.Task[None]]
    # Budget name -> when the generation that added (or re-scoped) it was swapped in:
    # requests that started before count from the ledger, not in memory (see `apply`).
    _counted_from: dict[str, float]
    _read_at_start: dict[tuple[str, int], int]  # the ledger's spend, for `seed_shared`
    _in_flight_at_start: frozenset[str]  # the requests it counted at their reservation, likewise
    _buckets_at_start: list[tuple[str, str, int, float]]  # the last minute's rate-limit use, likewise

    def restore_at_start(self, db: Backend, keys: KeySource | None) -> None:
        """Before serving (blocking: run it in a thread): budgets, managed keys' counters and
        rate-limit windows as the ledger left them."""
        self.keys = keys
        limits = keys.limits() if keys is not None else None
        found = restore.read(db, self.cfg, key_budgets=self._key_counters(), key_limits=limits)
        self.restore(found)
        if self.ledger is not None and found.in_flight and _only_writer(self.cfg):
            for rec in crashed.records(db, self.cfg.budgets.limits, found.in_flight):
                self.ledger.record(rec)  # written with the first batch: reports show what budgets count
        self._read_at_start = found.budgets
        self._in_flight_at_start = found.in_flight
        self._buckets_at_start = found.buckets

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
            if isinstance(self.shared, RedisState):
                seeded = await self.shared.seed(self._read_at_start, self._in_flight_at_start, self._buckets_at_start)
                if not seeded and (filled := await self.shared.fill(self._config_budgets_spent())):
                    log.info("shared state: %d budget counters new to Redis read back from the ledger", filled)
            else:
                seeded = await self.shared.seed(self._read_at_start, self._buckets_at_start)
            if seeded:
                log.info("shared state: %d budget counters read back from the ledger", len(self._read_at_start))
            # Counted from the ledger now: another instance that takes these budgets by a reload
            # must not add the period's spend so far again (it added it on top of the fill).
            now = time.time()
            for b in self.cfg.budgets.limits:
                await self.shared.mark_once(*_read_back_claim(b, now))
        except StoreUnavailable as e:
            log.warning("shared state unavailable at start (%s): budgets are read back into it once it answers", e)

    def _config_budgets_spent(self) -> dict[tuple[str, int], int]:
        """The config's budgets' part of what was read at start. A budget added to the config and
        applied by a restart found Redis seeded by a config without it, and counted from zero:
        its spend so far this period was forgotten (a rolling update let a new monthly budget
        through in full). Managed keys' counters are counted in Redis whatever their budget."""
        names = tuple(f"{b.name}:" for b in self.cfg.budgets.limits)
        keys = key_budget_name("")  # a managed key's counter: "key:<id>:..."
        spent = self._read_at_start.items()
        return {k: v for k, v in spent if names and k[0].startswith(names) and not k[0].startswith(keys)}

    async def _spent_now(self) -> LedgerSpend:
        """Every budget's spend this period and the last minute's rate-limit use, from the
        ledger: this instance's records written first, and the other instances' given the
        longest flush interval a config may set (a request they answered just before Redis lost
        its budgets settles into no counter: the ledger is where it counts). A ledger that does
        not write lacks this instance's records (those it admitted while Redis was down among
        them): they are added from its memory, where they wait."""
        ledger = self.ledger
        assert ledger is not None
        started = time.monotonic()
        await asyncio.to_thread(ledger.flush)
        await asyncio.sleep(max(0.0, MAX_FLUSH_INTERVAL_S + 0.25 - (time.monotonic() - started)))

        def read() -> LedgerSpend:  # in a thread: thousands of keys take a while
            keyed = self._key_counters()
            limits = self.keys.limits() if self.keys is not None else None
            # Taken before the ledger is read: one written meanwhile counts twice (never not at all).
            held = ledger.unwritten(UNWRITTEN_WAIT_S) if ledger.failing_since is not None else ([], [])
            if held is None:
                raise StoreUnavailable(f"the ledger is not writing ({ledger.queue_depth()} records of this instance)")
            found = restore.read(ledger.backend, self.cfg, key_budgets=keyed, key_limits=limits)
            records, journal = held
            if records or journal:
                unwritten = [_unwritten(r) for r in records if r.shadow_of is None]
                found = restore.add_unwritten(found, self.cfg.budgets.limits, keyed, unwritten, journal)
            return found.budgets, found.in_flight, found.buckets

        return await asyncio.to_thread(read)

    def _key_counters(self) -> list[restore.KeyBudget]:
        """Every managed key's counter (budgeted or not) with the keys whose spend counts in it."""
        keys = self.keys
        if keys is None:
            return []
        return [restore.KeyBudget(key_counter(k), keys.spenders(k)) for k in keys.key_ids()]

    def restore(self, found: Restored) -> None:
        """Counts what the ledger says was spent (`restore.read`) before this process counted
        the budgets itself (at start; for a reloaded budget, requests that started before it)."""
        for (key, slot), amount in found.budgets.items():
            self.local_budgets.add_read_back(key, amount, slot)
        for name, kind, limit, used in found.buckets:
            self.local_limits.seed(name, kind, limit, used)

    async def read_back_again(self) -> None:
        """After the ledger's lock was taken back from another server (`ledger_lock`): what that
        server spent meanwhile, counted before requests are taken again. This process's own
        records are written first, so the ledger holds all of its spend too, and each counter is
        raised to the ledger's (never lowered). Raises while the ledger cannot write them."""
        ledger = self.ledger
        if ledger is None or self.shared is not None:
            return
        await asyncio.to_thread(ledger.flush)
        if ledger.failing_since is not None or ledger.queue_depth():
            raise StoreUnavailable(f"{ledger.queue_depth()} records of this server not written yet")
        found = await asyncio.to_thread(restore.read, ledger.backend, self.cfg, key_budgets=self._key_counters())
        for (key, slot), amount in found.budgets.items():
            self.local_budgets.raise_read_back(key, amount, slot)

    def _read_ledger_now(self) -> asyncio.Task[None] | None:
        """With the shared store failing (fail open): this process's counters raised to what the
        ledger says was spent, in the background (never lowered: its own records not written
        yet are in them). They followed Redis's only for counters this process knew; a budget
        (or a period) another instance spent on since was admitted again in full.

        The budgets only (no rate-limit windows), the most spent subjects of a per-subject
        budget (`LEDGER_READ_MOST`), in a thread of its own (one read at a time: `Stores`),
        stopped after `LEDGER_READ_WITHIN_S`: a ledger locked by a migration, or a month of a
        million rows, held every fail-open request 2 s and the default executor's threads."""
        ledger = self.ledger
        if ledger is None:
            return None
        budgets, keyed = self.cfg.budgets.limits, self._key_counters()

        def read() -> Restored:
            return restore.spent(
                ledger.backend,
                budgets,
                time.time(),
                key_budgets=keyed,
                within=LEDGER_READ_WITHIN_S,
                most=LEDGER_READ_MOST,
            )

        async def raise_counters() -> None:
            try:
                found = await _own_thread(read)
            except Exception as e:  # the database down or slow too: this process's counters as they are
                log.warning("shared state unavailable, and the ledger could not be read (%s)", type(e).__name__)
                return
            for (key, slot), amount in found.budgets.items():
                self.local_budgets.raise_read_back(key, amount, slot)

        task = asyncio.get_running_loop().create_task(raise_counters())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _restore_later(self, budgets: list[Budget], since: float, state: ServerState | None) -> None:
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
                found = await asyncio.to_thread(restore.read, ledger.backend, cfg, budgets, until=since)
                self.restore(found)  # this process's counters: what it counts with the shared store down
                await self._read_back_shared(found, budgets)
            except Exception:
                log.exception("could not read the spend of reloaded budgets back from the ledger")

        task = asyncio.get_running_loop().create_task(go())
        self._restoring.add(task)
        task.add_done_callback(self._restoring.discard)

    async def _read_back_shared(self, found: Restored, budgets: Sequence[Budget]) -> None:
        """Adds the spend read back for budgets a reload added to the shared store (Redis, the
        workers' file), where admission counts: once per budget and period, by the
        instance or worker that claims it first (the others' read is the same ledger's)."""
        if self.shared is None or not self.shared_up():
            return
        now = time.time()
        for b in budgets:
            p = B.period_of(b, now)
            prefix, suffix = f"{b.name}:", f":{p.id}"
            spent = {k: v for k, v in found.budgets.items() if k[0].startswith(prefix) and k[0].endswith(suffix)}
            try:
                if await self.shared.mark_once(*_read_back_claim(b, now)):
                    await self.shared.add_spent(spent, p.ttl_s)
            except StoreUnavailable as e:
                log.warning("budget %s: its spend so far could not reach the shared store (%s)", b.name, e)


async def _own_thread(fn: Callable[[], T]) -> T:
    """`fn()` in a thread of its own (daemon: a close does not wait for it), not the default
    executor's: the proxy's other blocking work (the ledger's flush, request bodies) must not
    wait behind a slow read."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(cast(T, result))

    def run() -> None:
        try:
            result = fn()
        except BaseException as e:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, e)
            return
        loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="edgeroute-ledger-read", daemon=True).start()
    return await done


def _unwritten(r: RequestRecord) -> restore.Unwritten:
    subjects = {"key": r.key, "team": r.team, "user": r.user, "model": r.route, "global": "*"}
    return restore.Unwritten(r.request_id, r.started, subjects, r.key, r.cost_usd)


def _only_writer(cfg: Config) -> bool:
    """Whether this process is the ledger's only writer: it counts budgets alone, without
    shared_state (so its ledger lock is exclusive: `ledger_lock.counts_alone`), and is not one
    of a supervisor's workers, whose siblings may be running requests still."""
    return cfg.shared_state is None and workers.current() is None


_COUNTING = ("scope", "match", "period", "window_hours", "utc_offset_minutes")  # what a budget counts


def same_counting(old: Budget | None, new: Budget) -> bool:
    """Whether `new` counts the same spend as `old` (a changed limit or action does not matter)."""
    if old is None:
        return False
    return all(getattr(old, f) == getattr(new, f) for f in _COUNTING)


def _read_back_claim(b: Budget, now: float) -> tuple[str, int]:
    """The shared store's mark (and its ttl) saying that `b`'s spend this period was read back
    into it: once per budget, counting and period. A budget a reload re-scoped (global to
    per-model, say) counts in new counters, never read back when the mark named the budget alone."""
    p = B.period_of(b, now)
    counting = hashlib.sha256(repr([getattr(b, f) for f in _COUNTING]).encode()).hexdigest()[:12]
    return f"read-back:{b.name}:{counting}:{p.id}", p.ttl_s
