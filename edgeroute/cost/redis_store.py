"""Budgets, reservations and rate-limit buckets shared by several proxy instances, in Redis.

Every check-and-charge is one Lua script (`redis_scripts`), so it is atomic across
instances: a budget's reservations from all instances see each other, and a bucket is one
bucket. Admission is one script and one round trip (key and model limits, the deployment's
limits, budgets); settlements are batched (`redis_settle`), after the answers have gone
out. A store that lost its budgets (Redis restarted empty) is filled from the ledger by the
first instance that finds it so. Errors surface as :class:`StoreUnavailable`; what to do
then (fail open to the in-process store, or closed) is the caller's policy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from edgeroute import redis_client
from edgeroute.config import SharedState
from edgeroute.cost.budgets import Charge, Reserved
from edgeroute.cost.limits import BucketState, Take, held_takes
from edgeroute.cost.redis_scripts import (
    ADD_SPENT,
    ADMIT,
    FILL,
    READ,
    RESERVE,
    SEED,
    SETTLE,
    SETTLE_SEEDED,
    SETTLE_STALE,
    TAKE,
    unseeded,
)
from edgeroute.cost.redis_settle import Settlements, Stale
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.leases import LEASE_S
from edgeroute.redis_pipe import NotSent, RedisPipe, Script

log = logging.getLogger("edgeroute.cost")

SEED_TTL_S = 40 * 86400  # a seeded counter outlives its period (a month at most); charges renew it
SEED_WAIT_S = 10.0  # how long admission waits for the ledger to be read back into Redis


@dataclass(slots=True)
class Admitted:
    """What one admission round trip found: each group's result, None when the group was
    empty or not reached (the key and model buckets refused the request)."""

    rate: tuple[bool, list[BucketState]] | None
    deployment: tuple[bool, list[BucketState]] | None
    reserved: Reserved | None
    # The keys' slots in flight: True leased, False not (refused, or the buckets refused);
    # None when none was asked for. `lease_refused`: the index of the set at its cap, or -1.
    leased: bool | None = None
    lease_refused: int = -1


# A slot to lease in the admission script: the lease set's Redis key, its cap, the lease id.
Lease = tuple[str, int, str]
# What the ledger says was spent (store key and rolling slot -> nano-USD), the requests it
# counted at their reservation (in flight: no spend row yet), by id, and the last minute's
# rate-limit use (name, kind, limit, used).
LedgerSpend = tuple[dict[tuple[str, int], int], Collection[str], Sequence[tuple[str, str, int, float]]]


class RedisState:
    """The scripts, run over the request path's own pipelined connection (`redis_pipe`);
    budgets and buckets both live here."""

    def __init__(self, cfg: SharedState) -> None:
        self.pipe = RedisPipe.shared(cfg.redis_url, cfg.timeout_ms / 1000)
        self.prefix = cfg.prefix
        self._giving_back: set[asyncio.Task[None]] = set()
        # Named anew when what a seed counts grew (every managed key's counter, budgeted or not),
        # or what the marker means: a store seeded by an earlier release is seeded again, its
        # counters kept (SET NX). It holds the counters' generation (`redis_scripts`); beside
        # it, the requests its seed counted at their reservation. (`:2` was set to '1' by every
        # refill of the release before generations: shared with it, a give-back made before
        # an old instance's refill looked current and was applied again.)
        self.seeded_key = f"{self.prefix}:budgets-seeded:3"
        self.in_flight_key = f"{self.seeded_key}:in-flight"
        self._settlements = Settlements(self._settle, self._settle_stale, self._reseed, self.seeded_key)
        # What this instance admitted by its own counters while Redis was down (`spent_later`).
        self._outage_spend = Settlements(
            self._settle_outage, self._settle_stale, self._reseed, self.seeded_key, resend_unsure=True
        )
        # What the ledger says was spent this period (`CostControl` sets it): read back into
        # Redis when Redis turns out to hold no budgets (`unseeded`), once at a time.
        self.spent_from_ledger: Callable[[], Awaitable[LedgerSpend]] | None = None
        self._seeding: asyncio.Task[None] | None = None

    async def _run(
        self,
        script: Script,
        keys: list[str],
        args: list[Any],
        soon: bool = False,
        if_abandoned: Callable[[Any], None] | None = None,
    ) -> Any:
        try:
            return await self.pipe.eval(script, keys, args, soon, if_abandoned)
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__, sent=not isinstance(e, NotSent)) from None

    # -- admission: one round trip -----------------------------------------------

    async def admit(
        self, takes: list[Take], deployment: list[Take], charges: list[Charge], leases: list[Lease] | None = None
    ) -> Admitted:
        """Checks that each of `leases` has a slot free (else nothing happens), takes `takes`
        (all or nothing; refused, nothing else happens), leases the slots (for `LEASE_S`),
        then takes `deployment`'s buckets (all or nothing, on their own), then reserves
        `charges` — one atomic script."""
        leases = leases or []
        keys = [self._rkey(t) for t in takes] + [self._rkey(t) for t in deployment]
        keys += [self._bkey(c) for c in charges] + [k for k, _, _ in leases] + [self.seeded_key]
        args: list[Any] = [len(takes), len(deployment), len(charges), len(leases)]
        args += self._take_args(takes) + self._take_args(deployment) + self._reserve_args(charges)
        args.append(int(LEASE_S * 1000))
        for _, cap, lease in leases:
            args += [cap, lease]
        undo = lambda out: self._give_back(out, takes, deployment, charges, leases)  # noqa: E731
        out = await self._seeded(lambda: self._run(ADMIT, keys, args, if_abandoned=undo))
        return self._read_admit(out, takes, deployment, charges, leases)

    async def _seeded(self, script: Callable[[], Awaitable[Any]]) -> Any:
        """Runs a script that reserves; when Redis has lost its budgets, reads them back from
        the ledger first (one instance counts, the others find them there) and runs it again."""
        out = await script()
        if unseeded(out):
            await self._reseed()
            out = await script()
            if unseeded(out):
                raise StoreUnavailable("Redis holds no budgets and they could not be read back")
        return out

    async def _reseed(self) -> None:
        if self._seeding is None:
            task = asyncio.get_running_loop().create_task(self._read_and_seed())
            task.add_done_callback(lambda _: setattr(self, "_seeding", None))
            self._seeding = task
        try:
            async with asyncio.timeout(SEED_WAIT_S):
                await asyncio.shield(self._seeding)
        except TimeoutError:
            raise StoreUnavailable("reading budgets back from the ledger took too long") from None

    async def _read_and_seed(self) -> None:
        try:
            found = await self.spent_from_ledger() if self.spent_from_ledger is not None else ({}, (), ())
            spent, in_flight, buckets = found
        except StoreUnavailable:
            raise  # said by the caller (`Stores._unavailable`), once per outage
        except Exception as e:  # the ledger's database: admission then follows `on_unavailable`
            log.exception("shared state: could not read budgets back from the ledger")
            raise StoreUnavailable(f"the ledger could not be read ({type(e).__name__})") from None
        if self.spent_from_ledger is not None:
            # What this instance admitted while Redis was down is in what was read (its records
            # are written first; `spent_from_ledger` raises while the ledger does not write
            # them): sent too, it would count twice.
            self._outage_spend.forget()
        if await self.seed(spent, in_flight, buckets):
            log.warning(
                "shared state: Redis held no budgets (restarted empty?); %d counters read back from the ledger",
                len(spent),
            )

    async def seed(
        self,
        spent: dict[tuple[str, int], int],
        in_flight: Collection[str] = (),
        buckets: Sequence[tuple[str, str, int, float]] = (),
    ) -> bool:
        """Counts what the ledger says was spent (`restore.read`: store key and rolling slot ->
        nano-USD) into Redis if it holds no budgets, as a new generation; True when this call
        did. Each counter is set only where Redis has none, so budgets Redis kept are never
        counted twice. `in_flight`: the requests counted at their reservation, whose
        settlements made in an earlier generation still apply (`SETTLE_STALE`). `buckets`: the
        last minute's rate-limit use (name, kind, limit, used), each bucket Redis lacks drained
        by it (left out, Redis restarted or flushed gave every RPM/TPM limit a full minute anew)."""
        counters, pairs = self._seed_args(spent)
        ids = list(in_flight)
        keys = [counters[0], self.in_flight_key, *counters[1:]]
        args = [pairs[0], os.urandom(8).hex(), len(ids), len(buckets), *ids, *pairs[1:]]
        for name, kind, limit, used in buckets:
            keys.append(f"{self.prefix}:rl:{name}:{kind}")
            args += [limit, used]
        return bool(await self._run(SEED, keys, args))

    async def fill(self, spent: dict[tuple[str, int], int]) -> int:
        """Counts what the ledger says was spent into a seeded store where it has no counter
        (`FILL`): budgets no instance counted in Redis before this one started with them. Returns
        how many counters it set."""
        return int(await self._run(FILL, *self._seed_args(spent)))

    def _seed_args(self, spent: dict[tuple[str, int], int]) -> tuple[list[str], list[Any]]:
        """`SEED`'s and `FILL`'s keys (the marker first) and arguments."""
        keys = [self.seeded_key] + [f"{self.prefix}:b:{key}" for key, _ in spent]
        args: list[Any] = [SEED_TTL_S]
        for (_, slot), amount in spent.items():
            args += [slot, amount]
        return keys, args

    def _read_admit(
        self, out: list[Any], takes: list[Take], deployment: list[Take], charges: list[Charge], leases: list[Lease]
    ) -> Admitted:
        asked = True if leases else None
        if (refused := int(out[0])) > 0:
            return Admitted(None, None, None, False, refused - 1)
        rate, at = self._read_take(out, 1, takes)
        if not rate[0]:
            return Admitted(rate if takes else None, None, None, False if leases else None)
        dep, at = self._read_take(out, at, deployment)
        reserved = self._read_reserve(out, at, charges)
        return Admitted(rate if takes else None, dep if deployment else None, reserved if charges else None, asked)

    def _give_back(
        self, out: list[Any], takes: list[Take], deployment: list[Take], charges: list[Charge], leases: list[Lease]
    ) -> None:
        """An admission whose request was cancelled while its script ran (the client hung up):
        what it took goes back as a refused request's does (its slots, its tokens, the
        deployment's request and the reservation; the request itself still counts against the
        key's rate)."""
        if unseeded(out):
            return  # it took nothing
        got = self._read_admit(out, takes, deployment, charges, leases)
        if got.lease_refused >= 0:
            return  # refused at a key's cap: it took nothing
        back = []
        if got.rate is not None and got.rate[0]:
            back = [t for t in held_takes(takes, got.rate[1]) if t.kind == "tokens"]
        if got.deployment is not None and got.deployment[0]:
            back += held_takes(deployment, got.deployment[1])
        work = [self.adjust_buckets(back, [-t.amount for t in back])] if back else []
        if got.leased:
            work += [self._unlease(key, lease) for key, _, lease in leases]
        if got.reserved is not None and got.reserved.ok:
            # Never journaled: no seed counted it, so only its own generation takes it back.
            work.append(self.adjust_async(charges, [-c.amount for c in charges], got.reserved.generation))
        for coro in work:
            task = asyncio.get_running_loop().create_task(self._logged(coro))
            self._giving_back.add(task)
            task.add_done_callback(self._giving_back.discard)

    async def _unlease(self, key: str, lease: str) -> None:
        try:
            await self.pipe.call("ZREM", key, lease, soon=True)
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None

    @staticmethod
    async def _logged(coro: Awaitable[None]) -> None:
        try:
            await coro
        except StoreUnavailable as e:
            log.warning("shared state unavailable (%s): an abandoned admission was not given back", e)

    # -- budgets ---------------------------------------------------------------

    def _bkey(self, c: Charge) -> str:
        return f"{self.prefix}:b:{c.store_key}"

    @staticmethod
    def _reserve_args(charges: list[Charge]) -> list[Any]:
        args: list[Any] = []
        for c in charges:
            p = c.period
            args += [1 if p.rolling else 0, c.amount, c.block_at, p.ttl_s, p.slot, p.first_slot]
        return args

    @staticmethod
    def _read_reserve(out: list[Any], at: int, charges: list[Charge]) -> Reserved:
        used = [int(float(x)) for x in out[at + 2 : at + 2 + len(charges)]]
        used += [0] * (len(charges) - len(used))
        gen = out[at + 2 + len(charges)] if len(out) > at + 2 + len(charges) else b""
        generation = gen.decode() if isinstance(gen, bytes) else str(gen)
        return Reserved(bool(int(out[at])), used, int(out[at + 1]) - 1, generation)

    async def reserve(self, charges: list[Charge], now: float) -> Reserved:
        keys = [self._bkey(c) for c in charges] + [self.seeded_key]
        out = await self._seeded(lambda: self._run(RESERVE, keys, self._reserve_args(charges)))
        return self._read_reserve(out, 0, charges)

    async def adjust_async(self, charges: list[Charge], deltas: list[int], gen: str = "", request_id: str = "") -> None:
        """Adds `deltas` to reservations made in generation `gen` (`Reserved.generation`) by
        request `request_id` ('': one never journaled), batched with other requests' settlements."""
        for c, d in zip(charges, deltas, strict=True):
            if d:
                p = c.period
                self._settlements.add_budget(
                    self._bkey(c), 1 if p.rolling else 0, d, p.ttl_s, p.slot, 0, gen, request_id
                )
        await self._settlements.sent()

    def count_later(self, store_keys: list[str], amount: int, ttl_s: int) -> None:
        """Adds `amount` to managed keys' monthly counters (created where missing, see SETTLE):
        sent with the next batch of settlements, or within `redis_settle.COUNT_FLUSH_S`, never
        in a round trip of its own per request."""
        for store_key in store_keys:
            self._settlements.add_budget(f"{self.prefix}:b:{store_key}", 0, amount, ttl_s, -1, create=1)
        self._settlements.send_later()

    def spent_later(self, charges: list[Charge], amount: int) -> None:
        """Adds a request's cost to budgets it was admitted to by this process's counters alone
        (Redis was down): sent with the next batch of settlements, again each second while Redis
        is down, so the other instances count it once it is back. Into a Redis that restarted
        empty it is sent once Redis is seeded again (`_settle_outage`)."""
        if amount <= 0:
            return
        for c in charges:
            p = c.period
            self._outage_spend.add_budget(self._bkey(c), 1 if p.rolling else 0, amount, p.ttl_s, p.slot, create=1)
        self._outage_spend.send_later()

    def outage_settled(self) -> bool:
        """Whether this instance's spend admitted while Redis was down is all in Redis."""
        return self._outage_spend.idle()

    async def read_counters(
        self, cal: list[str], rolling: list[str]
    ) -> tuple[dict[str, int], dict[str, dict[int, int]]]:
        """Budget counters (store keys; `rolling`: windows' hashes of slots) as Redis holds them,
        one script; those it has none of (or all, when it holds no budgets) are left out."""
        keys = [f"{self.prefix}:b:{k}" for k in cal + rolling] + [self.seeded_key]
        out = await self._run(READ, keys, ["0"] * len(cal) + ["1"] * len(rolling), soon=True)
        if unseeded(out):
            return {}, {}
        got_cal = {k: int(v) for k, v in zip(cal, out, strict=False) if v is not None}
        got_rolling: dict[str, dict[int, int]] = {}
        for k, flat in zip(rolling, out[len(cal) :], strict=False):
            if flat:
                got_rolling[k] = {int(flat[j]): int(flat[j + 1]) for j in range(0, len(flat), 2)}
        return got_cal, got_rolling

    async def add_spent(self, spent: dict[tuple[str, int], int], ttl_s: int) -> None:
        """Adds spend read back from the ledger (store key and rolling slot -> nano-USD)."""
        if not spent:
            return
        args: list[Any] = [ttl_s]
        for (_, slot), amount in spent.items():
            args += [slot, amount]
        await self._run(ADD_SPENT, [f"{self.prefix}:b:{key}" for key, _ in spent], args)

    async def mark_once(self, key: str, ttl_s: int) -> bool:
        """True the first time `key` is marked (across instances) within `ttl_s`."""
        try:
            return bool(await self.pipe.call("SET", f"{self.prefix}:once:{key}", b"1", "NX", "EX", max(1, ttl_s)))
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None

    # -- rate limits -----------------------------------------------------------

    def _rkey(self, t: Take) -> str:
        return f"{self.prefix}:rl:{t.name}:{t.kind}"

    @staticmethod
    def _take_args(takes: list[Take]) -> list[Any]:
        args: list[Any] = []
        for t in takes:
            args += [t.limit, t.limit / 60_000, t.amount, t.more]
        return args

    @staticmethod
    def _read_take(out: list[Any], at: int, takes: list[Take]) -> tuple[tuple[bool, list[BucketState]], int]:
        """The result of one `take` appended at `out[at]`, and where the next result starts."""
        n = len(takes)
        ok = bool(int(out[at]))
        states = []
        for i, t in enumerate(takes):
            level = float(out[at + 1 + i])
            wait_ms = int(out[at + 1 + n + i])
            taken = float(out[at + 1 + 2 * n + i])
            per_s = t.limit / 60
            states.append(
                BucketState(
                    t.name,
                    t.kind,
                    t.limit,
                    max(0, int(level)),
                    max(0.0, (t.limit - level) / per_s),
                    math.inf if wait_ms < 0 else wait_ms / 1000,
                    taken,
                )
            )
        return (ok, states), at + 1 + 3 * n

    async def take(self, takes: list[Take]) -> tuple[bool, list[BucketState]]:
        out = await self._run(TAKE, [self._rkey(t) for t in takes], self._take_args(takes))
        return self._read_take(out, 0, takes)[0]

    async def adjust_buckets(self, takes: list[Take], deltas: list[float]) -> None:
        """Takes `deltas` more from buckets (gives back when negative), batched like `adjust_async`."""
        for t, d in zip(takes, deltas, strict=True):
            self._settlements.add_bucket(self._rkey(t), d, t.limit)
        await self._settlements.sent()

    # -- settlement, batched (`redis_settle`) ------------------------------------

    async def _settle(self, keys: list[str], args: list[Any]) -> list[int]:
        return list(await self._run(SETTLE, keys, args, soon=True))  # with the cache's writes, after answers

    async def _settle_stale(self, parts: list[Stale]) -> None:
        """Sends settlements `SETTLE` found made in an earlier generation, request by request
        (`SETTLE_STALE`): after a seed only, so once per restart of Redis at most."""
        keys, args = [], []
        for key, rolling, delta, ttl, slot, request_id in parts:
            keys.append(key)
            args += [rolling, delta, ttl, slot, request_id]
        applied = await self._run(SETTLE_STALE, [*keys, self.in_flight_key], args)
        log.info(
            "shared state: of %d settlements made before Redis was seeded again, %d applied (the others' "
            "requests were counted from the ledger)",
            len(parts),
            applied,
        )

    async def _settle_outage(self, keys: list[str], args: list[Any]) -> list[int]:
        """Sends spend admitted while Redis was down (`spent_later`). A Redis that restarted
        empty is seeded first, as a request finding it so does, whichever comes first: with a
        ledger the seed reads this spend back (and `_read_and_seed` drops it here); without
        one, it is added to the counters, created where the restart lost them."""
        out = await self._run(SETTLE_SEEDED, keys, args, soon=True)
        if unseeded(out):
            await self._reseed()
            if self.spent_from_ledger is not None:
                return []
            out = await self._run(SETTLE_SEEDED, keys, args, soon=True)
            if unseeded(out):
                raise StoreUnavailable("Redis holds no budgets", sent=False)
        return list(out)

    async def close(self, within: float = 5.0) -> None:
        """Waits `within` seconds at most, in all, for the settlements under way, then closes."""
        end = time.monotonic() + within
        await self._settlements.close(within)
        await self._outage_spend.close(max(0.0, end - time.monotonic()))
        await self.pipe.close()
