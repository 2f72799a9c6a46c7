"""The Lua scripts behind the budgets and buckets shared in Redis (`redis_store`).

Each check-and-charge is one script, so it is atomic across instances. Keys are
`{prefix}:b:{budget}:{subject}:{period}` (an integer of nano-USD, or a hash of rolling
slots) and `{prefix}:rl:{name}:{kind}` (a hash: level, stamp in ms from Redis's clock);
all of them expire on their own. The comment above each script gives its KEYS and ARGV
layout, which the callers build.

The marker saying that Redis holds the budgets (the last key of the scripts that reserve or
settle) holds the *generation* of its counters: an id the seed that filled them from the
ledger chose. Each reservation answers it, and each settlement names the generation its
reservation was made in: a give-back of a reservation that a later seed never saw (it
counted the request's spend from the ledger instead) is not applied (`SETTLE_STALE`).
"""

from __future__ import annotations

from typing import Any

from edgeroute.redis_pipe import Script

# Lua functions every script below is built from: a token-bucket take and a budget
# reservation, each all or nothing over its keys, each appending its result to `out`.
FUNCTIONS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Buckets KEYS[k0+1 .. k0+n]; ARGV from a0+1, four each: capacity, refill per ms, amount, more
-- (taken too, in whole tokens, as far as the bucket holds after the amount: `limits.Take`).
-- Appends ok (1/0), each level after, each wait in ms (-1: never fits), each amount taken.
local function take(k0, a0, n, now, out)
  local levels, waits, taken, ok = {}, {}, {}, 1
  for i = 1, n do
    local b = a0 + (i - 1) * 4
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
    local b = a0 + (i - 1) * 4
    local cap, rate, amt = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    taken[i] = 0
    if ok == 1 then
      taken[i] = amt + math.max(0, math.min(tonumber(ARGV[b + 4]), math.floor(levels[i] - amt)))
      levels[i] = levels[i] - taken[i]
    end
    redis.call('HSET', KEYS[k0 + i], 'l', tostring(levels[i]), 't', now)
    -- Kept until it has refilled (a bucket in debt for longer than a minute): expired, it came back full.
    redis.call('PEXPIRE', KEYS[k0 + i], math.ceil((cap - math.min(cap, levels[i])) / rate) + 1000)
    out[#out + 1] = tostring(levels[i])
  end
  for i = 1, n do out[#out + 1] = waits[i] end
  for i = 1, n do out[#out + 1] = tostring(taken[i]) end
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
# last key: the scripts that reserve then answer {-1} and change nothing (`unseeded`). After
# the reservation's results comes the marker's generation.
RESERVE = Script.of(
    FUNCTIONS
    + """
local gen = redis.call('GET', KEYS[#KEYS])
if not gen then return {-1} end
local out = {} reserve(0, 0, #KEYS - 1, out) out[#out + 1] = gen return out
"""
)

# Admission in one round trip: the keys' slots in flight (`max_parallel`, lease sets of
# `edgeroute.leases`: a key at its cap refuses the request before anything is taken), the key
# and model buckets (refused: nothing else is done), then the slots are leased, then the first
# deployment's buckets (at its limit the caller reroutes, so the rest goes on), then the
# budgets. ARGV[1..4]: how many keys each group has (buckets, deployment buckets, budgets,
# lease sets); the lease sets' ARGV after the budgets': lease ms, then two each: cap, lease
# id. The first value answered is the lease set refused (1-based; 0: none), the last the
# marker's generation when budgets were reserved; the marker is the last key (without it the
# script answers {-1} when it would take or reserve: a store holding only buckets lost them too).
ADMIT = Script.of(
    FUNCTIONS
    + """
local na, nb, nc, nl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local gen = redis.call('GET', KEYS[#KEYS])
if not gen and na + nb + nc > 0 then return {-1} end
local out, now = {0}, now_ms()
local l0, la = na + nb + nc, 4 + 4 * (na + nb) + 6 * nc
for i = 1, nl do
  redis.call('ZREMRANGEBYSCORE', KEYS[l0 + i], '-inf', now)
  if redis.call('ZCARD', KEYS[l0 + i]) >= tonumber(ARGV[la + 2 * i]) then return {i} end
end
if take(0, 4, na, now, out) == 0 then return out end
local ttl = tonumber(ARGV[la + 1])
for i = 1, nl do
  redis.call('ZADD', KEYS[l0 + i], now + ttl, ARGV[la + 2 * i + 1])
  redis.call('PEXPIRE', KEYS[l0 + i], ttl)
end
take(na, 4 + 4 * na, nb, now, out)
reserve(na + nb, 4 + 4 * (na + nb), nc, out)
if nc > 0 then out[#out + 1] = gen end
return out
"""
)

# Settlement of many requests at once: budget deltas (ARGV from 2, six each: rolling, delta,
# ttl, slot, create, generation), then bucket deltas (two each: delta taken, capacity; a bucket
# that expired stays full on a give-back and is written in debt by a take; each is kept until
# it has refilled, so debt is not forgotten a minute after its last take); the marker is the
# last key. ARGV[1]: how many budget keys come first. A counter Redis lost since its
# reservation is not recreated from a delta: the seed (below) counts that request from the
# ledger. A counter with create 1 (a managed key's, or spend admitted while Redis was down) is
# created by the delta in a seeded store; in one that lost its budgets, the seed counts that
# cost too. A delta of reservations made in another generation than the marker's is not
# applied, nor one sent while there is no marker (Redis restarted empty: whether the request is
# spent or in flight is for the refill to read). Their indices are answered after 1 (stale:
# `SETTLE_STALE` decides request by request) or 0 (held: sent again once Redis is refilled,
# then stale); nothing when every delta was applied. One with generation '' is of no
# reservation, applied in any.
_SETTLE = """
local nb = tonumber(ARGV[1])
local gen = redis.call('GET', KEYS[#KEYS])
local left = {}
for i = 1, nb do
  local b = 1 + (i - 1) * 6
  local made = ARGV[b + 6]
  if made ~= '' and made ~= gen then
    left[#left + 1] = i
  elseif ARGV[b + 1] == '1' then
    if redis.call('HEXISTS', KEYS[i], ARGV[b + 4]) == 1 or (gen and ARGV[b + 5] == '1') then
      redis.call('HINCRBY', KEYS[i], ARGV[b + 4], ARGV[b + 2])
      redis.call('EXPIRE', KEYS[i], ARGV[b + 3])
    end
  elseif redis.call('EXISTS', KEYS[i]) == 1 or (gen and ARGV[b + 5] == '1') then
    redis.call('INCRBY', KEYS[i], ARGV[b + 2])
    redis.call('EXPIRE', KEYS[i], ARGV[b + 3])
  end
end
for i = nb + 1, #KEYS - 1 do
  local b = 1 + nb * 6 + (i - nb - 1) * 2
  local cap, delta = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 1])
  local exists = redis.call('EXISTS', KEYS[i]) == 1
  if exists or delta > 0 then
    local l = math.min(cap, tonumber(redis.call('HGET', KEYS[i], 'l') or cap) - delta)
    if exists then
      redis.call('HSET', KEYS[i], 'l', tostring(l))
    else
      local t = redis.call('TIME')
      redis.call('HSET', KEYS[i], 'l', tostring(l), 't', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
    end
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - l) * 60000 / cap) + 1000)
  end
end
if #left > 0 then table.insert(left, 1, gen and 1 or 0) end
return left
"""
SETTLE = Script.of(_SETTLE)
# The same, for spend admitted while Redis was down: a store that lost its budgets answers
# {-1} and changes nothing (`unseeded`), so the caller seeds it first, then sends it again.
SETTLE_SEEDED = Script.of("if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return {-1} end\n" + _SETTLE)

# The deltas `SETTLE` found stale, request by request (ARGV five each: rolling, delta, ttl,
# slot, request id; KEYS: each one's counter, then the seed's set of the requests it counted
# at their reservation). A seed read each request from the ledger either as
# spent (its cost: the counter holds it, and a give-back would count it below its cost) or
# as in flight (its reservation, counted in that set: its settlement applies as in the
# generation it was made in). A delta above the reservation is applied either way: a charge
# is never lost, at worst counted twice (towards refusing). Answers how many were applied.
SETTLE_STALE = Script.of("""
local set, n = KEYS[#KEYS], 0
for i = 1, #KEYS - 1 do
  local b = (i - 1) * 5
  local delta = tonumber(ARGV[b + 2])
  if delta > 0 or redis.call('SISMEMBER', set, ARGV[b + 5]) == 1 then
    if ARGV[b + 1] == '1' then
      if redis.call('HEXISTS', KEYS[i], ARGV[b + 4]) == 1 then
        redis.call('HINCRBY', KEYS[i], ARGV[b + 4], ARGV[b + 2])
        redis.call('EXPIRE', KEYS[i], ARGV[b + 3])
        n = n + 1
      end
    elseif redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('INCRBY', KEYS[i], ARGV[b + 2])
      redis.call('EXPIRE', KEYS[i], ARGV[b + 3])
      n = n + 1
    end
  end
end
return n
""")

# What the ledger says was spent, into a store without the marker (KEYS[1]): each counter
# (KEYS from 3 on, before the buckets; ARGV two each after the ids: slot, -1 for a calendar
# period, and nano-USD) only where it does not exist, each rate-limit bucket (the last ARGV[4]
# KEYS; ARGV two each after the counters': capacity, what the last minute used) likewise,
# drained by that use and stamped now, then the set of requests counted at their reservation
# (KEYS[2]: in flight, ARGV[3] ids from ARGV[5]), then the marker, holding the new generation
# (ARGV[2]). Atomic, so of instances seeding at once the first counts.
SEED = Script.of("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ttl, m, nk = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local nc = #KEYS - 2 - nk
for i = 3, 2 + nc do
  local a = 3 + m + 2 * (i - 2)
  local slot, amount = ARGV[a], ARGV[a + 1]
  if slot == '-1' then
    redis.call('SET', KEYS[i], amount, 'NX', 'EX', ttl)
  elseif redis.call('HSETNX', KEYS[i], slot, amount) == 1 then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for j = 1, nk do
  local key, a = KEYS[2 + nc + j], 4 + m + 2 * nc + 2 * (j - 1)
  local cap = tonumber(ARGV[a + 1])
  if redis.call('EXISTS', key) == 0 then
    local l = math.max(-cap, cap - tonumber(ARGV[a + 2]))
    redis.call('HSET', key, 'l', tostring(l), 't', now)
    redis.call('PEXPIRE', key, math.ceil((cap - l) * 60000 / cap) + 1000)
  end
end
redis.call('DEL', KEYS[2])
for i = 5, 4 + m, 1000 do
  redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 999, 4 + m)))
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
""")
# The same into a store seeded already, for the budgets of a config that was not the seeder's (a
# budget added to the config and applied by a restart): only counters Redis has none of are
# set, a calendar period's whole, a rolling window's only when its key is missing (a slot field
# missing from a kept key is no sign that nobody counted it). Answers how many were set.
FILL = Script.of("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ttl, n, fresh = tonumber(ARGV[1]), 0, {}
for i = 2, #KEYS do
  local key, slot, amount = KEYS[i], ARGV[2 * i - 2], ARGV[2 * i - 1]
  if slot == '-1' then
    if redis.call('SET', key, amount, 'NX', 'EX', ttl) then n = n + 1 end
  else
    if fresh[key] == nil then fresh[key] = redis.call('EXISTS', key) == 0 end
    if fresh[key] then
      redis.call('HSET', key, slot, amount)
      redis.call('EXPIRE', key, ttl)
      n = n + 1
    end
  end
end
return n
""")
# Budget counters as they are (KEYS: each counter, then the seeded marker; ARGV[i] '1' for a
# rolling window's hash, answered as its fields and values): what an instance's fail-open
# counters follow each second. {-1} when Redis holds no budgets (nothing to follow).
READ = Script.of("""
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return {-1} end
local out = {}
for i = 1, #KEYS - 1 do
  if ARGV[i] == '1' then out[i] = redis.call('HGETALL', KEYS[i]) else out[i] = redis.call('GET', KEYS[i]) or false end
end
return out
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


def unseeded(out: Any) -> bool:
    """Whether a script that reserves answered that Redis holds no budgets (`{-1}`)."""
    return isinstance(out, list) and len(out) == 1 and out[0] == -1
