"""Budgets, reservations and rate-limit buckets shared by several proxy instances, in Redis.

Every check-and-charge is one Lua script, so it is atomic across instances: a budget's
reservations from all instances see each other, and a bucket is one bucket. Keys are
`{prefix}:b:{budget}:{subject}:{period}` (an integer of nano-USD, or a hash of rolling
slots) and `{prefix}:rl:{name}:{kind}` (a hash: level, stamp in ms from Redis's clock).
All keys expire on their own. Errors surface as :class:`StoreUnavailable`; what to do
then (fail open to the in-process store, or closed) is the caller's policy.
"""

from __future__ import annotations

import math
from typing import Any

from edgeroute import redis_client
from edgeroute.config import SharedState
from edgeroute.cost.budgets import Charge, Reserved
from edgeroute.cost.limits import BucketState, Take

RESERVE = """
local n = #KEYS
local out = {1, 0}
for i = 1, n do
  local b = (i - 1) * 6
  local amount = tonumber(ARGV[b + 2])
  local block_at = tonumber(ARGV[b + 3])
  local u = 0
  if ARGV[b + 1] == '1' then
    local first = tonumber(ARGV[b + 6])
    local h = redis.call('HGETALL', KEYS[i])
    for j = 1, #h, 2 do
      if tonumber(h[j]) < first then redis.call('HDEL', KEYS[i], h[j]) else u = u + tonumber(h[j + 1]) end
    end
  else
    u = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  out[i + 2] = tostring(u)
  if out[1] == 1 and block_at >= 0 and u + amount > block_at then
    out[1] = 0
    out[2] = i
  end
end
if out[1] == 1 then
  for i = 1, n do
    local b = (i - 1) * 6
    if ARGV[b + 1] == '1' then
      redis.call('HINCRBY', KEYS[i], ARGV[b + 5], ARGV[b + 2])
    else
      redis.call('INCRBY', KEYS[i], ARGV[b + 2])
    end
    redis.call('EXPIRE', KEYS[i], ARGV[b + 4])
  end
end
return out
"""

ADJUST = """
for i = 1, #KEYS do
  local b = (i - 1) * 4
  if ARGV[b + 1] == '1' then
    redis.call('HINCRBY', KEYS[i], ARGV[b + 4], ARGV[b + 2])
  else
    redis.call('INCRBY', KEYS[i], ARGV[b + 2])
  end
  redis.call('EXPIRE', KEYS[i], ARGV[b + 3])
end
return 1
"""

TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local levels, waits, ok = {}, {}, 1
for i = 1, n do
  local b = (i - 1) * 3
  local cap, rate, amt = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local v = redis.call('HMGET', KEYS[i], 'l', 't')
  local level, ts = tonumber(v[1]) or cap, tonumber(v[2]) or now
  if now > ts then level = math.min(cap, level + (now - ts) * rate) end
  levels[i] = level
  waits[i] = 0
  if level < amt then
    ok = 0
    if amt > cap then waits[i] = -1 else waits[i] = math.ceil((amt - level) / rate) end
  end
end
local out = {ok}
for i = 1, n do
  local b = (i - 1) * 3
  local cap, rate, amt = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  if ok == 1 then levels[i] = levels[i] - amt end
  redis.call('HSET', KEYS[i], 'l', tostring(levels[i]), 't', now)
  redis.call('PEXPIRE', KEYS[i], math.ceil(cap / rate) + 1000)
  out[i + 1] = tostring(levels[i])
  out[n + i + 1] = waits[i]
end
return out
"""

GIVE = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local cap = tonumber(ARGV[(i - 1) * 2 + 2])
    local l = tonumber(redis.call('HGET', KEYS[i], 'l') or cap) - tonumber(ARGV[(i - 1) * 2 + 1])
    redis.call('HSET', KEYS[i], 'l', tostring(math.min(cap, l)))
  end
end
return 1
"""


class StoreUnavailable(Exception):
    """Redis did not answer (down, unreachable, timed out)."""


class RedisState:
    """One Redis connection pool and the scripts; budgets and buckets both live here."""

    def __init__(self, cfg: SharedState) -> None:
        timeout = cfg.timeout_ms / 1000
        self.client = redis_client.connect(
            cfg.redis_url,
            no_retry=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=0,
        )
        self.prefix = cfg.prefix
        self._reserve = self.client.register_script(RESERVE)
        self._adjust = self.client.register_script(ADJUST)
        self._take = self.client.register_script(TAKE)
        self._give = self.client.register_script(GIVE)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None

    # -- budgets ---------------------------------------------------------------

    def _bkey(self, c: Charge) -> str:
        return f"{self.prefix}:b:{c.store_key}"

    async def reserve(self, charges: list[Charge], now: float) -> Reserved:
        args: list[Any] = []
        for c in charges:
            p = c.period
            args += [1 if p.rolling else 0, c.amount, c.block_at, p.ttl_s, p.slot, p.first_slot]
        out = await self._run(self._reserve, [self._bkey(c) for c in charges], args)
        used = [int(float(x)) for x in out[2:]]
        used += [0] * (len(charges) - len(used))
        return Reserved(bool(int(out[0])), used, int(out[1]) - 1)

    async def adjust_async(self, charges: list[Charge], deltas: list[int]) -> None:
        pairs = [(c, d) for c, d in zip(charges, deltas, strict=True) if d]
        if not pairs:
            return
        args: list[Any] = []
        for c, d in pairs:
            args += [1 if c.period.rolling else 0, d, c.period.ttl_s, c.period.slot]
        await self._run(self._adjust, [self._bkey(c) for c, _ in pairs], args)

    async def mark_once(self, key: str, ttl_s: int) -> bool:
        """True the first time `key` is marked (across instances) within `ttl_s`."""
        try:
            return bool(await self.client.set(f"{self.prefix}:once:{key}", b"1", nx=True, ex=max(1, ttl_s)))
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None

    # -- rate limits -----------------------------------------------------------

    def _rkey(self, t: Take) -> str:
        return f"{self.prefix}:rl:{t.name}:{t.kind}"

    async def take(self, takes: list[Take]) -> tuple[bool, list[BucketState]]:
        args: list[Any] = []
        for t in takes:
            args += [t.limit, t.limit / 60_000, t.amount]
        out = await self._run(self._take, [self._rkey(t) for t in takes], args)
        n = len(takes)
        ok = bool(int(out[0]))
        states = []
        for i, t in enumerate(takes):
            level = float(out[1 + i])
            wait_ms = int(out[1 + n + i])
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
        return ok, states

    async def adjust_buckets(self, takes: list[Take], deltas: list[float]) -> None:
        args: list[Any] = []
        for t, d in zip(takes, deltas, strict=True):
            args += [d, t.limit]
        await self._run(self._give, [self._rkey(t) for t in takes], args)

    async def close(self) -> None:
        await self.client.aclose()
