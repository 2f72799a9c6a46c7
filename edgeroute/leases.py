"""Leases on slots shared by every process that holds them: the instances that share Redis
(`shared_state`), or the workers of one `serve --workers N` without it (a SQLite file in the
supervisor's run directory). A deployment's `max_concurrency` (`capacity_share`) and a key's
`max_parallel` (`cost.control.parallel`) are both counted this way, in sets of their own.

Each slot is a lease: a member of one set per name, with an expiry. Taking a slot is one round
trip (a Lua script, or one SQLite transaction: drop expired leases, count, add one when under
the limit); giving it back is one more, sent off the request path. A background task renews
this process's leases every `RENEW_S`, so the slots of a process killed with -9 come back by
themselves within `LEASE_S`; the renewal adds back the leases a Redis restarted empty (or
flushed) has lost, and leases the slots taken on this process's count while the store could
not answer, so the slots still taken count in the fleet again within `RENEW_S`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from edgeroute import redis_client
from edgeroute.config import SharedState
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.redis_pipe import RedisPipe, Script
from edgeroute.workers.local_state import SqliteState

log = logging.getLogger("edgeroute.capacity")
T = TypeVar("T")

LEASE_S = 15.0  # a lease lives this long unless renewed
RENEW_S = 5.0  # this process renews its leases this often

# KEYS[1]: the deployment's leases; ARGV: limit, lease ms, lease id. Redis's own clock, so
# that the instances' clocks do not matter.
_TAKE = Script.of("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
""")
# KEYS[1]: the deployment's leases; ARGV: lease ms, then the lease ids still held. Added back
# when missing: a Redis restarted empty or flushed has lost them, and the slots are still taken.
_RENEW = Script.of("""
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], until_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
""")


class LeaseStore(Protocol):
    async def take_lease(self, deployment: str, limit: int, lease: str, ttl_s: float = LEASE_S) -> bool: ...
    async def give_back(self, deployment: str, lease: str) -> None: ...
    async def renew(self, held: dict[str, list[str]]) -> None: ...
    async def count(self, deployment: str) -> int: ...
    async def close(self) -> None: ...


class RedisLeases:
    """Leases in one sorted set per deployment (`{prefix}:cap:{deployment}`, scored by expiry),
    over the request path's pipelined connection (`redis_pipe`). `kind` names another set of
    leases kept the same way (`par`: a key's requests in flight, `cost.control.parallel`)."""

    def __init__(self, cfg: SharedState, kind: str = "cap") -> None:
        self.prefix = f"{cfg.prefix}:{kind}:"
        self.pipe = RedisPipe.shared(cfg.redis_url, cfg.timeout_ms / 1000)

    async def _call(self, op: Awaitable[T]) -> T:
        try:
            return await op
        except redis_client.errors() as e:  # timeouts included (the pipe's own)
            raise StoreUnavailable(type(e).__name__) from None

    async def take_lease(self, deployment: str, limit: int, lease: str, ttl_s: float = LEASE_S) -> bool:
        got = await self._call(self.pipe.eval(_TAKE, [self.prefix + deployment], [limit, int(ttl_s * 1000), lease]))
        return bool(got)

    async def give_back(self, deployment: str, lease: str) -> None:
        await self._call(self.pipe.call("ZREM", self.prefix + deployment, lease, soon=True))

    async def renew(self, held: dict[str, list[str]]) -> None:
        ms = int(LEASE_S * 1000)
        for deployment, leases in held.items():
            await self._call(self.pipe.eval(_RENEW, [self.prefix + deployment], [ms, *leases]))

    async def count(self, deployment: str) -> int:
        now_ms = int(time.time() * 1000)  # for a view only: this clock is near enough
        return int(await self._call(self.pipe.call("ZCOUNT", self.prefix + deployment, now_ms, "+inf")))

    async def close(self) -> None:
        await self.pipe.close()


class SqliteLeases(SqliteState):
    """Leases in a SQLite file shared by the workers of one machine: the workers' shared state
    (WAL, one `BEGIN IMMEDIATE` transaction each) with a lease table, in a file of its own."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS lease (deployment TEXT NOT NULL, id TEXT NOT NULL, "
                "expires REAL NOT NULL, PRIMARY KEY (deployment, id)) WITHOUT ROWID"
            )

    async def take_lease(self, deployment: str, limit: int, lease: str, ttl_s: float = LEASE_S) -> bool:
        def tx(db: sqlite3.Connection) -> bool:
            now = time.time()
            db.execute("DELETE FROM lease WHERE deployment = ? AND expires <= ?", (deployment, now))
            (n,) = db.execute("SELECT COUNT(*) FROM lease WHERE deployment = ?", (deployment,)).fetchone()
            if n >= limit:
                return False
            db.execute("INSERT INTO lease VALUES (?, ?, ?)", (deployment, lease, now + ttl_s))
            return True

        return await self._run(tx)

    async def give_back(self, deployment: str, lease: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM lease WHERE deployment = ? AND id = ?", (deployment, lease)))

    async def renew(self, held: dict[str, list[str]]) -> None:
        def tx(db: sqlite3.Connection) -> None:
            until = time.time() + LEASE_S
            for deployment, leases in held.items():
                db.executemany(  # added when missing, as in Redis: slots taken while the file failed
                    "INSERT INTO lease VALUES (?, ?, ?) "
                    "ON CONFLICT (deployment, id) DO UPDATE SET expires = excluded.expires",
                    [(deployment, lease, until) for lease in leases],
                )

        await self._run(tx)

    async def count(self, deployment: str) -> int:
        def tx(db: sqlite3.Connection) -> int:
            q = "SELECT COUNT(*) FROM lease WHERE deployment = ? AND expires > ?"
            return int(db.execute(q, (deployment, time.time())).fetchone()[0])

        return await self._run(tx)


class SharedSlots:
    """This process's leases, by deployment name (so that they outlive a reload).

    `fail_open` False: a store that cannot answer raises `StoreUnavailable` from `claim`
    (`shared_state.on_unavailable: closed`, for the leases of `cost.control.parallel`)."""

    def __init__(self, store: LeaseStore, fail_open: bool = True, label: str = "shared capacity") -> None:
        self.store = store
        self.label = label  # what the log says is shared
        self.fail_open = fail_open
        self.instance = secrets.token_hex(6)
        self._ids = itertools.count()
        # Per deployment, one entry per slot this process holds: its lease id, or None for a
        # slot taken while the store was unavailable (failing open).
        self.held: dict[str, list[str | None]] = {}
        self.results = {"taken": 0, "refused": 0, "unavailable": 0, "release_failed": 0}
        self._tasks: set[asyncio.Task[None]] = set()
        self._down = False

    async def claim(self, deployment: str, limit: int) -> bool:
        """Takes a lease if the fleet has fewer than `limit` in flight; True when the store
        cannot say (fail open: this process's own count has admitted the request already)."""
        lease = self.lease_id()
        try:
            ok = await self.store.take_lease(deployment, limit, lease)
        except StoreUnavailable as e:
            self.results["unavailable"] += 1
            if not self.fail_open:
                self._background(deployment, lease)  # a timed-out script may still have run
                raise
            if not self._down:  # once per outage, not once per request
                log.warning("%s unavailable (%s): admitting on this process's count", self.label, e)
                self._down = True
            self.held.setdefault(deployment, []).append(None)
            self._background(deployment, lease)  # a timed-out script may still have run
            return True
        except asyncio.CancelledError:
            self._background(deployment, lease)  # the script may have run: give it back
            raise
        if self._down:
            log.warning("%s available again", self.label)
            self._down = False
        if not ok:
            self.results["refused"] += 1
            return False
        self.results["taken"] += 1
        self.held.setdefault(deployment, []).append(lease)
        return True

    def lease_id(self) -> str:
        """A new lease id of this process (for a lease another script takes, see `adopt`)."""
        return f"{self.instance}:{next(self._ids)}"

    def adopt(self, name: str, lease: str) -> None:
        """Holds (renews, gives back on `release`) a lease taken by another script: the
        admission script takes a key's slot with its buckets (`cost.redis_scripts.ADMIT`)."""
        self.results["taken"] += 1
        self.held.setdefault(name, []).append(lease)

    def hold_unleased(self, name: str) -> None:
        """Holds a slot taken on this process's count while the store could not answer (the
        admission script failed, `on_unavailable: open`): leased at the next renewal, so that
        the fleet counts it once the store answers again."""
        self.held.setdefault(name, []).append(None)

    def release(self, deployment: str) -> None:
        """Gives one slot back: an unleased one first, so the shared count never falls below
        what this process runs; a lease is removed off the request path."""
        held = self.held.get(deployment)
        if not held:
            return
        if None in held:
            held.remove(None)
        else:
            lease = held.pop()
            assert lease is not None
            self._background(deployment, lease)
        if not held:  # names may be many (a key's slots): none kept once empty
            del self.held[deployment]

    def _background(self, deployment: str, lease: str) -> None:
        async def give_back() -> None:
            try:
                await self.store.give_back(deployment, lease)
            except StoreUnavailable:
                self.results["release_failed"] += 1  # the lease expires by itself within LEASE_S

        task = asyncio.get_running_loop().create_task(give_back())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            # A slot taken while the store could not answer is leased now: added by the
            # renewal, it counts in the fleet for as long as its request runs.
            for slots in self.held.values():
                for i, slot in enumerate(slots):
                    if slot is None:
                        slots[i] = self.lease_id()
            held = {d: [x for x in slots if x is not None] for d, slots in self.held.items()}
            held = {d: ids for d, ids in held.items() if ids}
            if not held:
                continue
            try:
                await self.store.renew(held)
            except StoreUnavailable as e:
                if not self._down:  # once per outage, not every RENEW_S
                    n = sum(map(len, held.values()))
                    log.warning("%s: could not renew %d leases (%s)", self.label, n, e)
                    self._down = True
            else:
                if self._down:
                    log.warning("%s available again", self.label)
                    self._down = False
            # A lease given back while the renewal was on its way may have been added back
            # by it (its ZREM sent first): given back again, it is not held for LEASE_S more.
            for deployment, ids in held.items():
                still = set(self.held.get(deployment, []))
                for lease in ids:
                    if lease not in still:
                        self._background(deployment, lease)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()

    def metrics(self, _: web.Application) -> Iterable[Metric]:
        c = CounterMetricFamily(
            "edgeroute_shared_capacity",
            "Shared capacity leases: taken, refused (the fleet was full), unavailable (the store "
            "could not answer; admitted on this process's count) and release_failed.",
            labels=["result"],
        )
        for result, n in self.results.items():
            c.add_metric([result], n)
        yield c
