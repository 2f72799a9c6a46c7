"""Requests a dead instance left in flight, recorded by one surviving instance, once.

With `shared_state`, a `kill -9` left each request it was running reserved in Redis: counted,
at its whole reservation, with no spend row and no word of it in the reports (a restart
reads the ledger back only into a Redis that lost its budgets). Alone, a server records them
at start (`crashed`); here the others may be running requests still, so liveness decides:

- each instance is a *run* (its ledger writer's id, the prefix of every journal row it
  writes), alive while its heartbeat key in Redis is (`redis_runs`), renewed every `beat_s`
  off the request path and expiring `ttl_s` after the last renewal (`shared_state.liveness`);
- every `sweep_s`, an instance looks for runs of its ledger whose key has expired and claims
  one (one claimer at a time); it reads the run's journaled reservations that have no spend
  row, sets each one's fate to crashed unless it has one, and writes a `crashed` row for each
  it set, at its reservation, as `crashed.records` does at a lone server's start. Redis's
  counters keep the reservation: it is now that request's recorded cost, as after a restart.
- an instance paused past `ttl_s` (SIGSTOP, a stalled host) may have been claimed meanwhile.
  Its heartbeat finds its key expired: it becomes a new run (new journal rows are not the
  claimed run's), and each request it admitted before then is *doubtful*: its settlement
  (Redis adjustment and spend row) waits for its fate, which it sets to settled unless a
  claimer set it to crashed first. Settled: as any settlement. Crashed: its `crashed` row
  stands, and the reservation it holds in Redis with it (nothing is counted twice).

Redis decides for the settlements it is asked about; a row written without asking (settled before
the lapse, its batch under way or kept from a failed one when the pause began, or its instance
cut off from Redis alone) meets the claimer's at the database, which keeps the first committed
(`spend_once`): the request is recorded once either way.

A request is doubtful when its run's lease may have lapsed since its admission: a heartbeat
since found the key expired, or the last renewal's lease (from when it was sent) has run out.
Only those wait; every other settlement costs two comparisons more.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgeroute.accounting import RequestRecord
from edgeroute.config import Budget, SharedStateLiveness
from edgeroute.cost.control import crashed
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import Backend
from edgeroute.cost.redis_runs import SETTLED, RunRegistry, crashed_by
from edgeroute.cost.store_errors import StoreUnavailable

log = logging.getLogger("edgeroute.cost")

CLAIM_S = 60.0  # how long a claim holds another claimer off (it writes rows, waits for a flush)
RETRY_S = 1.0  # a doubtful settlement asks again this often while Redis does not answer
FLUSH_WAIT_S = 5.0  # how long a flush waits for the heartbeat it asked for
WITHDRAW_WAIT_S = 10.0  # for a ledger batch under way, before the records waiting are taken back


@dataclass(slots=True)
class _Doubtful:
    request_id: str
    run: str
    settle: Callable[[], None]  # its settlement, as if never in doubt
    yield_: Callable[[], None]  # its `crashed` row stands


@dataclass(slots=True)
class Liveness:
    """This instance's run and the sweeps for dead ones (started by `CostControl.start_liveness`)."""

    registry: RunRegistry
    ledger: Ledger
    budgets: Callable[[], Sequence[Budget]]  # the running config's (a dead run's rows name them)
    timing: SharedStateLiveness = field(default_factory=SharedStateLiveness)  # beat, expiry and sweep intervals
    runs: list[str] = field(default_factory=list)  # this instance's runs, by epoch
    lease_until: float = -1.0  # monotonic: the key surely exists until then
    _beaten: bool = False
    _doubtful: list[_Doubtful] = field(default_factory=list)
    _resolving: asyncio.Task[None] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _written: set[str] = field(default_factory=set)  # crashed rows this instance queued
    _beating: asyncio.Lock = field(default_factory=asyncio.Lock)  # one heartbeat at a time
    _loop: asyncio.AbstractEventLoop | None = None
    _loop_thread: int = 0
    _unreachable: bool = False  # the last heartbeat failed (Redis down or cut off)

    def __post_init__(self) -> None:
        self.runs.append(self.ledger.writer_id)

    @property
    def epoch(self) -> int:
        return len(self.runs) - 1

    def doubtful(self, epoch: int) -> bool:
        """Whether a request admitted in `epoch` may have been recorded as crashed by another instance."""
        return epoch != len(self.runs) - 1 or time.monotonic() > self.lease_until

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tasks = [loop.create_task(self._beat_loop()), loop.create_task(self._sweep_loop())]
        self.ledger.before_flush = self._before_flush

    async def stop(self, within: float = 5.0) -> None:
        """Stops the heartbeat and sweeps; waits `within` seconds at most for doubtful settlements."""
        self.ledger.before_flush = None
        for t in self._tasks:
            t.cancel()
        if self._resolving is not None:
            await asyncio.wait([self._resolving], timeout=within)

    # -- this run ----------------------------------------------------------------

    def _before_flush(self) -> None:
        """In the ledger's writer thread, before a flush: with this run's lease run out (the
        process was paused, or Redis is slow), a heartbeat first, so that records another
        instance may have recorded as crashed meanwhile are taken back (`beat`) before they
        are written. A Redis that does not answer within `FLUSH_WAIT_S` holds it up no longer,
        and one that failed the last heartbeat not at all (a flush stalled by every Redis
        outage would put the ledger's own records at risk)."""
        loop = self._loop
        if loop is None or time.monotonic() <= self.lease_until or threading.get_ident() == self._loop_thread:
            return
        if self._unreachable:  # asked already since the lease ran out: the ledger writes on
            return
        done = asyncio.run_coroutine_threadsafe(self._beat_quietly(), loop)
        try:
            done.result(FLUSH_WAIT_S)
        except Exception:  # a timeout, a loop closing: written as before
            done.cancel()

    async def _beat_quietly(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.beat()

    async def beat(self) -> None:
        """Renews this run's key; one found expired makes this instance a new run."""
        async with self._beating:
            try:
                await self._beat()
            except StoreUnavailable:
                self._unreachable = True
                raise
            self._unreachable = False

    async def _beat(self) -> None:
        sent = time.monotonic()
        run = self.runs[-1]
        ttl = self.timing.ttl_s
        if not await self.registry.beat(run, ttl, create=not self._beaten) and self._beaten:
            lapsed = self.epoch
            run = self.ledger.new_writer_id()
            self.runs.append(run)
            log.warning(
                "shared state: this instance's liveness had expired (paused, cut off from Redis, or Redis lost"
                " its keys, for over %.0f s); it goes on as a new run, and the requests it was running are"
                " recorded by one instance only: here, or as crashed by another that took them over",
                ttl,
            )
            self._beaten = False  # the new run's key is made by the next beat (this one, unless it fails)
            # Settled before the lapse but not written yet: their rows wait for their fate too.
            for rec in await asyncio.to_thread(self.ledger.withdraw, WITHDRAW_WAIT_S) or []:
                write, drop = (functools.partial(self.ledger.release, rec, write=w) for w in (True, False))
                self.defer(rec.request_id, lapsed, write, drop)
            sent = time.monotonic()
            await self.registry.beat(run, ttl, create=True)
        self._beaten = True
        self.lease_until = sent + ttl

    async def _beat_loop(self) -> None:
        while True:
            try:
                await self.beat()
            except StoreUnavailable:
                pass  # the lease runs out: settlements wait for their fate
            except Exception:
                log.exception("shared state: liveness heartbeat failed")
            await asyncio.sleep(self.timing.beat_s)

    def idle(self) -> bool:
        """Whether no doubtful settlement waits for its fate."""
        return not self._doubtful and self._resolving is None

    def defer(self, request_id: str, epoch: int, settle: Callable[[], None], yield_: Callable[[], None]) -> None:
        """Settles a doubtful request once its fate is known (`settle`, or `yield_` when another
        instance recorded it as crashed)."""
        self._doubtful.append(_Doubtful(request_id, self.runs[epoch], settle, yield_))
        if self._resolving is None:
            self._resolving = asyncio.get_running_loop().create_task(self._resolve())

    async def _resolve(self) -> None:
        try:
            while self._doubtful:
                batch, self._doubtful = self._doubtful, []
                by_run: dict[str, list[_Doubtful]] = {}
                for d in batch:
                    by_run.setdefault(d.run, []).append(d)
                for run, items in by_run.items():
                    try:
                        won = await self.registry.fates(run, SETTLED, [d.request_id for d in items])
                    except StoreUnavailable:
                        self._doubtful += items
                        continue
                    for d in items:
                        (d.settle if d.request_id in won else d.yield_)()
                    if lost := len(items) - len(won):
                        log.warning(
                            "shared state: %d requests of this instance's expired run %s were recorded as crashed"
                            " by another instance meanwhile; their reservations stand as their cost",
                            lost,
                            run,
                        )
                if self._doubtful:
                    await asyncio.sleep(RETRY_S)
        finally:
            self._resolving = None

    # -- the others ----------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.sweep_s)
            try:
                await self.sweep()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("shared state: looking for requests of stopped instances failed")

    async def sweep(self) -> int:
        """Records the requests of each dead run this instance claims; returns how many."""
        n = 0
        me = self.runs[-1]
        for run in await self.registry.runs():
            if run in self.runs or not await self.registry.claim(run, me, CLAIM_S):
                continue
            n += await self._take_over(run, me)
        return n

    async def _take_over(self, run: str, me: str) -> int:
        db = self.ledger.backend
        budgets = list(self.budgets())
        recs = await asyncio.to_thread(_unsettled, db, budgets, run)
        recs = [r for r in recs if r.request_id not in self._written]
        won = await self.registry.fates(run, crashed_by(me), [r.request_id for r in recs])
        mine = [r for r in recs if r.request_id in won]
        for rec in mine:
            self._written.add(rec.request_id)
            self.ledger.record(rec)
        if mine:
            log.warning(
                "shared state: instance run %s stopped (killed?) with %d requests in flight: recorded as crashed at"
                " their reservations ($%.6f), which the budgets count",
                run,
                len(mine),
                sum(r.cost_usd for r in mine),
            )
        await asyncio.to_thread(self.ledger.flush)
        if self.ledger.failing_since is None:  # written: the run is done (else claimed again later)
            await self.registry.done(run, me)
        return len(mine)


def _unsettled(db: Backend, budgets: Sequence[Budget], run: str) -> list[RequestRecord]:
    """The `crashed` records of run `run`'s journaled requests that have no spend row."""
    sql = (
        "SELECT DISTINCT r.request_id FROM reservations r WHERE r.row_id LIKE ?"
        " AND NOT EXISTS (SELECT 1 FROM spend s WHERE s.request_id = r.request_id)"
    )
    ids = [str(row[0]) for row in db.query(sql, [f"{run}-%"])]
    return crashed.records(db, budgets, ids) if ids else []


def ledger_identity(db: Backend) -> str:
    """Names the ledger's database (never its credentials): the runs one instance may take over
    are those writing where it reads. PostgreSQL's by database and schema, whatever address
    each instance reaches it by (a server's own address differs through a proxy or a VIP)."""
    if db.dialect == "sqlite":
        where = [socket.gethostname(), *(str(r[2]) for r in db.query("PRAGMA database_list", []) if r[1] == "main")]
    else:
        where = [str(v) for v in db.query("SELECT current_database(), current_schema()", [])[0]]
    return hashlib.sha256("\0".join(where).encode()).hexdigest()[:16]
