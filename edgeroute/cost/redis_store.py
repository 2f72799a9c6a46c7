"""Budgets, reservations and rate-limit buckets shared by several proxy instances, in Redis.

Every check-and-charge is one Lua script, so it is atomic across instances: a budget's
reservations from all instances see each other, and a bucket is one bucket. Admission is
one script and one round trip (key and model limits, the deployment's limits, budgets);
settlements are summed per key and sent together, one script in flight at a time, so
under load many requests settle in one round trip, after their answers have gone out;
those Redis never received (it was down) are sent again with the next batch. Keys are
`{prefix}:b:{budget}:{subject}:{period}` (an integer of nano-USD, or a hash of rolling
slots) and `{prefix}:rl:{name}:{kind}` (a hash: level, stamp in ms from Redis's clock).
All keys expire on their own. Errors surface as :class:`StoreUnavailable`; what to do
then (fail open to the in-process store, or closed) is the caller's policy.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edgeroute import redis_client
from edgeroute.config import SharedState
from edgeroute.cost.budgets import Charge, Reserved
from edgeroute.cost.limits import BucketState, Take
from edgeroute.redis_pipe import NotSent, RedisPipe, Script

log = logging.getLogger("edgeroute.cost")

# Lua functions every script below is built from: a token-bucket take and a budget
# reservation, each all or nothing over its keys, each appending its result to `out`.
FUNCTIONS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Buckets KEYS[k0+1 .. k0+n]; ARGV from a0+1, three each: capacity, refill per ms, amount.
-- Appends ok (1/0), each level after, each wait in ms (-1: never fits).
local function take(k0, a0, n, now, out)
  local levels, waits, ok = {}, {}, 1
  for i = 1, n do
    local b = a0 + (i - 1) * 3
    local cap, rate, amt = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    local v = redis.call('HMGET', KEYS[k0 + i], 'l', 't')
    local level, ts = tonumber(v[1]) or cap, tonumber(v[2]) or now
    if now > ts then level = math.min(cap, level + (now - ts) * rate) end
    levels[i] = level
    waits[i] = 0
    if level < amt then
      ok = 0
      if amt > cap then waits[i] = -1 else waits[i] = math.ceil((amt - level) / rate) end
    end
  end
  out[#out + 1] = ok
  for i = 1, n do
    local b = a0 + (i - 1) * 3
    local cap, rate, amt = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    if ok == 1 then levels[i] = levels[i] - amt end
    redis.call('HSET', KEYS[k0 + i], 'l', tostring(levels[i]), 't', now)
    redis.call('PEXPIRE', KEYS[k0 + i], math.ceil(cap / rate) + 1000)
    out[#out + 1] = tostring(levels[i])
  end
  for i = 1, n do out[#out + 1] = waits[i] end
  return ok
end

-- Budgets KEYS[k0+1 .. k0+n]; ARGV from a0+1, six each: rolling (1/0), amount, block at
-- (-1: never), ttl, slot, first slot of the window. Appends ok, the blocked budget
-- (1-based; 0 when none), each amount used before.
local function reserve(k0, a0, n, out)
  local ok, blocked, used = 1, 0, {}
  for i = 1, n do
    local key, b = KEYS[k0 + i], a0 + (i - 1) * 6
    local amount, block_at = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    local u = 0
    if ARGV[b + 1] == '1' then
      local first = tonumber(ARGV[b + 6])
      local h = redis.call('HGETALL', key)
      for j = 1, #h, 2 do
        if tonumber(h[j]) < first then redis.call('HDEL', key, h[j]) else u = u + tonumber(h[j + 1]) end
      end
    else
      u = tonumber(redis.call('GET', key) or '0')
    end
    used[i] = u
    if ok == 1 and block_at >= 0 and u + amount > block_at then
      ok, blocked = 0, i
    end
  end
  if ok == 1 then
    for i = 1, n do
      local key, b = KEYS[k0 + i], a0 + (i - 1) * 6
      if ARGV[b + 1] == '1' then
        redis.call('HINCRBY', key, ARGV[b + 5], ARGV[b + 2])
      else
        redis.call('INCRBY', key, ARGV[b + 2])
      end
      redis.call('EXPIRE', key, ARGV[b + 4])
    end
  end
  out[#out + 1] = ok
  out[#out + 1] = blocked
  for i = 1, n do out[#out + 1] = tostring(used[i]) end
  return ok
end
"""

TAKE = Script.of(FUNCTIONS + "local out = {} take(0, 0, #KEYS, now_ms(), out) return out")
# A store that lost its budgets (Redis restarted empty, or never seeded) has no marker, the
# last key: the scripts that reserve then answer {-1} and change nothing (`Unseeded`).
RESERVE = Script.of(
    FUNCTIONS
    + """
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return {-1} end
local out = {} reserve(0, 0, #KEYS - 1, out) return out
"""
)

# Admission in one round trip: the key and model buckets (refused: nothing else is done),
# then the first deployment's buckets (at its limit the caller reroutes, so the rest goes on),
# then the budgets. ARGV[1..3]: how many keys each group has; the marker is the last key.
ADMIT = Script.of(
    FUNCTIONS
    + """
local na, nb, nc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if nc > 0 and redis.call('EXISTS', KEYS[#KEYS]) == 0 then return {-1} end
local out, now = {}, now_ms()
if take(0, 3, na, now, out) == 0 then return out end
take(na, 3 + 3 * na, nb, now, out)
reserve(na + nb, 3 + 3 * (na + nb), nc, out)
return out
"""
)

# Settlement of many requests at once: budget deltas (ARGV from 2, five each: rolling, delta,
# ttl, slot, create), then bucket deltas (two each: delta taken, capacity; a bucket that expired
# stays full); the marker is the last key. ARGV[1]: how many budget keys come first. A counter
# Redis lost since its reservation is not recreated from a delta: the seed (below) counts that
# request from the ledger. A managed key's counter (create 1) is created by its first request's
# cost in a seeded store; in one that lost its budgets, the seed counts that cost too.
SETTLE = Script.of("""
local nb = tonumber(ARGV[1])
local seeded = redis.call('EXISTS', KEYS[#KEYS]) == 1
for i = 1, nb do
  local b = 1 + (i - 1) * 5
  if ARGV[b + 1] == '1' then
    if redis.call('HEXISTS', KEYS[i], ARGV[b + 4]) == 1 then
      redis.call('HINCRBY', KEYS[i], ARGV[b + 4], ARGV[b + 2])
      redis.call('EXPIRE', KEYS[i], ARGV[b + 3])
    end
  elseif redis.call('EXISTS', KEYS[i]) == 1 or (seeded and ARGV[b + 5] == '1') then
    redis.call('INCRBY', KEYS[i], ARGV[b + 2])
    redis.call('EXPIRE', KEYS[i], ARGV[b + 3])
  end
end
for i = nb + 1, #KEYS - 1 do
  local b = 1 + nb * 5 + (i - nb - 1) * 2
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local cap = tonumber(ARGV[b + 2])
    local l = tonumber(redis.call('HGET', KEYS[i], 'l') or cap) - tonumber(ARGV[b + 1])
    redis.call('HSET', KEYS[i], 'l', tostring(math.min(cap, l)))
  end
end
return 1
""")

# What the ledger says was spent, into a store without the marker (KEYS[1]): each counter
# (KEYS from 2; ARGV two each: slot, -1 for a calendar period, and nano-USD) only where it
# does not exist, then the marker. Atomic, so of instances seeding at once the first counts.
SEED = Script.of("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ttl = tonumber(ARGV[1])
for i = 2, #KEYS do
  local slot, amount = ARGV[2 * i - 2], ARGV[2 * i - 1]
  if slot == '-1' then
    redis.call('SET', KEYS[i], amount, 'NX', 'EX', ttl)
  elseif redis.call('HSETNX', KEYS[i], slot, amount) == 1 then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
redis.call('SET', KEYS[1], '1')
return 1
""")
# Spend read back for a budget first seen after start (ARGV[1]: ttl; then two each: slot, -1
# for a calendar period, and nano-USD), added to its counters.
ADD_SPENT = Script.of("""
for i = 1, #KEYS do
  local slot, amount = ARGV[2 * i], ARGV[2 * i + 1]
  if slot == '-1' then
    redis.call('INCRBY', KEYS[i], amount)
  else
    redis.call('HINCRBY', KEYS[i], slot, amount)
  end
  redis.call('EXPIRE', KEYS[i], ARGV[1])
end
return 1
""")
SEED_TTL_S = 40 * 86400  # a seeded counter outlives its period (a month at most); charges renew it
SEED_WAIT_S = 10.0  # how long admission waits for the ledger to be read back into Redis

RESEND_S = 1.0  # settlements Redis never received are sent again this often while it is down
# Managed keys' counters that no other settlement carried are sent at most this long after
# (`count_later`): under any load one script a tenth of a second, not one per request.
COUNT_FLUSH_S = 0.1


class StoreUnavailable(Exception):
    """Redis did not answer (down, unreachable, timed out). `sent`: False when the command
    never reached Redis, so it certainly did not run."""

    def __init__(self, reason: str, sent: bool = True) -> None:
        super().__init__(reason)
        self.sent = sent


class Unseeded(Exception):
    """Redis holds no budgets read back from the ledger: it restarted empty, or is new."""


@dataclass(slots=True)
class Admitted:
    """What one admission round trip found: each group's result, None when the group was
    empty or not reached (the key and model buckets refused the request)."""

    rate: tuple[bool, list[BucketState]] | None
    deployment: tuple[bool, list[BucketState]] | None
    reserved: Reserved | None


@dataclass(slots=True)
class _Pending:
    """Settlements not yet sent: deltas summed per budget key and per bucket key."""

    # (key, slot) -> [key, rolling, delta, ttl, slot, create]: a rolling budget's slots are
    # fields of one key; create 1 for a managed key's counter (see SETTLE)
    budgets: dict[tuple[str, int], list[Any]] = field(default_factory=dict)
    buckets: dict[str, list[Any]] = field(default_factory=dict)  # key -> [delta, capacity]
    done: asyncio.Future[str | None] | None = None  # an error's name, or None when sent

    def __bool__(self) -> bool:
        return bool(self.budgets or self.buckets)


class RedisState:
    """The scripts, run over the request path's own pipelined connection (`redis_pipe`);
    budgets and buckets both live here."""

    def __init__(self, cfg: SharedState) -> None:
        self.pipe = RedisPipe.shared(cfg.redis_url, cfg.timeout_ms / 1000)
        self.prefix = cfg.prefix
        self._pending = _Pending()
        self._flusher: asyncio.Task[None] | None = None
        self._giving_back: set[asyncio.Task[None]] = set()
        self._closing = False
        # Named anew when what a seed counts grew (every managed key's counter, budgeted or not):
        # a store seeded by an earlier release is seeded again, its counters kept (SET NX).
        self.seeded_key = f"{self.prefix}:budgets-seeded:2"
        # What the ledger says was spent this period (`CostControl` sets it): read back into
        # Redis when Redis turns out to hold no budgets (`Unseeded`), once at a time.
        self.spent_from_ledger: Callable[[], Awaitable[dict[tuple[str, int], int]]] | None = None
        self._seeding: asyncio.Task[None] | None = None
        self._count_timer: asyncio.TimerHandle | None = None  # sends counts nothing else carried

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

    async def admit(self, takes: list[Take], deployment: list[Take], charges: list[Charge]) -> Admitted:
        """Takes `takes` (all or nothing; refused, nothing else happens), then `deployment`'s
        buckets (all or nothing, on their own), then reserves `charges` — one atomic script."""
        keys = [self._rkey(t) for t in takes] + [self._rkey(t) for t in deployment]
        keys += [self._bkey(c) for c in charges] + [self.seeded_key]
        args: list[Any] = [len(takes), len(deployment), len(charges)]
        args += self._take_args(takes) + self._take_args(deployment) + self._reserve_args(charges)
        undo = lambda out: self._give_back(out, takes, deployment, charges)  # noqa: E731
        out = await self._seeded(lambda: self._run(ADMIT, keys, args, if_abandoned=undo))
        return self._read_admit(out, takes, deployment, charges)

    async def _seeded(self, script: Callable[[], Awaitable[Any]]) -> Any:
        """Runs a script that reserves; when Redis has lost its budgets, reads them back from
        the ledger first (one instance counts, the others find them there) and runs it again."""
        out = await script()
        if _unseeded(out):
            await self._reseed()
            out = await script()
            if _unseeded(out):
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
            spent = await self.spent_from_ledger() if self.spent_from_ledger is not None else {}
        except Exception as e:  # the ledger's database: admission then follows `on_unavailable`
            log.exception("shared state: could not read budgets back from the ledger")
            raise StoreUnavailable(f"the ledger could not be read ({type(e).__name__})") from None
        if await self.seed(spent):
            log.warning(
                "shared state: Redis held no budgets (restarted empty?); %d counters read back from the ledger",
                len(spent),
            )

    async def seed(self, spent: dict[tuple[str, int], int]) -> bool:
        """Counts what the ledger says was spent (`restore.read`: store key and rolling slot ->
        nano-USD) into Redis if it holds no budgets; True when this call did. Each counter is
        set only where Redis has none, so budgets Redis kept are never counted twice."""
        keys = [self.seeded_key] + [f"{self.prefix}:b:{key}" for key, _ in spent]
        args: list[Any] = [SEED_TTL_S]
        for (_, slot), amount in spent.items():
            args += [slot, amount]
        return bool(await self._run(SEED, keys, args))

    def _read_admit(self, out: list[Any], takes: list[Take], deployment: list[Take], charges: list[Charge]) -> Admitted:
        rate, at = self._read_take(out, 0, takes)
        if not rate[0]:
            return Admitted(rate if takes else None, None, None)
        dep, at = self._read_take(out, at, deployment)
        reserved = self._read_reserve(out, at, charges)
        return Admitted(rate if takes else None, dep if deployment else None, reserved if charges else None)

    def _give_back(self, out: list[Any], takes: list[Take], deployment: list[Take], charges: list[Charge]) -> None:
        """An admission whose request was cancelled while its script ran (the client hung up):
        what it took goes back as a refused request's does (its tokens, the deployment's
        request and the reservation; the request itself still counts against the key's rate)."""
        if _unseeded(out):
            return  # it took nothing
        got = self._read_admit(out, takes, deployment, charges)
        back = [t for t in takes if t.kind == "tokens"] if got.rate is None or got.rate[0] else []
        if got.deployment is not None and got.deployment[0]:
            back += deployment
        work = [self.adjust_buckets(back, [-t.amount for t in back])] if back else []
        if got.reserved is not None and got.reserved.ok:
            work.append(self.adjust_async(charges, [-c.amount for c in charges]))
        for coro in work:
            task = asyncio.get_running_loop().create_task(self._logged(coro))
            self._giving_back.add(task)
            task.add_done_callback(self._giving_back.discard)

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
        return Reserved(bool(int(out[at])), used, int(out[at + 1]) - 1)

    async def reserve(self, charges: list[Charge], now: float) -> Reserved:
        keys = [self._bkey(c) for c in charges] + [self.seeded_key]
        out = await self._seeded(lambda: self._run(RESERVE, keys, self._reserve_args(charges)))
        return self._read_reserve(out, 0, charges)

    async def adjust_async(self, charges: list[Charge], deltas: list[int]) -> None:
        """Adds `deltas` to reservations, batched with other requests' settlements."""
        pending = self._pending.budgets
        for c, d in zip(charges, deltas, strict=True):
            if d:
                key, slot = self._bkey(c), c.period.slot
                have = pending.get((key, slot))
                if have is None:
                    pending[(key, slot)] = [key, 1 if c.period.rolling else 0, d, c.period.ttl_s, slot, 0]
                else:
                    have[2] += d
        await self._flush_soon()

    def count_later(self, store_keys: list[str], amount: int, ttl_s: int) -> None:
        """Adds `amount` to managed keys' monthly counters (created where missing, see SETTLE):
        sent with the next batch of settlements, or within `COUNT_FLUSH_S`, never in a round
        trip of its own per request."""
        pending = self._pending.budgets
        for store_key in store_keys:
            key = f"{self.prefix}:b:{store_key}"
            have = pending.get((key, -1))
            if have is None:
                pending[(key, -1)] = [key, 0, amount, ttl_s, -1, 1]
            else:
                have[2] += amount
                have[5] = 1
        if self._flusher is None and self._count_timer is None:
            self._count_timer = asyncio.get_running_loop().call_later(COUNT_FLUSH_S, self._flush_counts)

    def _flush_counts(self) -> None:
        self._count_timer = None
        if self._flusher is None and self._pending and not self._closing:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

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
            args += [t.limit, t.limit / 60_000, t.amount]
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
            per_s = t.limit / 60
            states.append(
                BucketState(
                    t.name,
                    t.kind,
                    t.limit,
                    max(0, int(level)),
                    max(0.0, (t.limit - level) / per_s),
                    math.inf if wait_ms < 0 else wait_ms / 1000,
                )
            )
        return (ok, states), at + 1 + 2 * n

    async def take(self, takes: list[Take]) -> tuple[bool, list[BucketState]]:
        out = await self._run(TAKE, [self._rkey(t) for t in takes], self._take_args(takes))
        return self._read_take(out, 0, takes)[0]

    async def adjust_buckets(self, takes: list[Take], deltas: list[float]) -> None:
        """Takes `deltas` more from buckets (gives back when negative), batched like `adjust_async`."""
        pending = self._pending.buckets
        for t, d in zip(takes, deltas, strict=True):
            key = self._rkey(t)
            have = pending.get(key)
            if have is None:
                pending[key] = [d, t.limit]
            else:
                have[0] += d
        await self._flush_soon()

    # -- settlement, batched ----------------------------------------------------

    async def _flush_soon(self) -> None:
        """Waits until the pending settlements (this one among them) are in Redis: one script
        for every request settled since the last one was sent, one script in flight at a time."""
        pending = self._pending
        if not pending:
            return  # nothing to send (all deltas were zero)
        if pending.done is None:
            pending.done = asyncio.get_running_loop().create_future()
        done = pending.done
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        error = await asyncio.shield(done)
        if error is not None:
            raise StoreUnavailable(error)

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # settlements of the same loop pass join this batch
            while self._pending:
                batch, self._pending = self._pending, _Pending()
                keys = [v[0] for v in batch.budgets.values()]
                args: list[Any] = [len(keys)]
                for _, rolling, delta, ttl, slot, create in batch.budgets.values():
                    args += [rolling, delta, ttl, slot, create]
                for key, (delta, cap) in batch.buckets.items():
                    keys.append(key)
                    args += [delta, cap]
                keys.append(self.seeded_key)
                if batch.done is None:  # deltas carried over, nobody waiting for them
                    batch.done = asyncio.get_running_loop().create_future()
                try:
                    await self._run(SETTLE, keys, args, soon=True)  # with the cache's writes, after answers
                except StoreUnavailable as e:
                    batch.done.set_result(str(e))
                    if not e.sent and not self._closing:
                        # Redis never saw these deltas: they go with the next batch, sent again
                        # once Redis is back (a reservation is released late, never twice).
                        self._carry_over(batch)
                        await asyncio.sleep(RESEND_S)
                except BaseException:
                    batch.done.set_result("not sent")
                    raise
                else:
                    batch.done.set_result(None)
        finally:
            self._flusher = None

    def _carry_over(self, batch: _Pending) -> None:
        pending = self._pending
        for k, (key, rolling, delta, ttl, slot, create) in batch.budgets.items():
            if (have := pending.budgets.get(k)) is None:
                pending.budgets[k] = [key, rolling, delta, ttl, slot, create]
            else:
                have[2] += delta
                have[5] |= create
        for key, (delta, cap) in batch.buckets.items():
            if (had := pending.buckets.get(key)) is None:
                pending.buckets[key] = [delta, cap]
            else:
                had[0] += delta

    async def close(self) -> None:
        if self._count_timer is not None:
            self._count_timer.cancel()
            self._count_timer = None
            if self._flusher is None and self._pending:  # counts still waiting: sent now
                self._flusher = asyncio.get_running_loop().create_task(self._flush())
        self._closing = True
        if self._flusher is not None:
            await asyncio.wait([self._flusher], timeout=5)
        await self.pipe.close()


def _unseeded(out: Any) -> bool:
    return isinstance(out, list) and len(out) == 1 and out[0] == -1
