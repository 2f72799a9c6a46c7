"""Which instances sharing Redis and a ledger are alive, and who records a dead one's requests.

Each running instance (a run: its ledger writer's id, the prefix of every journal row it
writes) keeps a key `{prefix}:alive:{run}` that expires `ttl` after its last heartbeat, and is
a member of the set of runs of its ledger (`{prefix}:runs:{ledger}`). A run whose key has
expired is claimed by one other instance at a time (`{prefix}:claim:{run}`, SET NX with an
expiry: a claimer that dies is replaced). Each of the dead run's unsettled requests then has
one fate, set once across instances in `{prefix}:fate:{run}`: `crashed:<claimer>` (the
claimer writes its `crashed` row) or `settled` (the run came back, a paused process, and
settles it itself). Whoever sets a request's fate first decides; the other side leaves it.
"""

from __future__ import annotations

from typing import Any

from edgeroute import redis_client
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.redis_pipe import RedisPipe, Script

SETTLED = "settled"
FATE_TTL_S = 7 * 86400  # past any request's life: a paused owner asks no later than its stream's end

# KEYS: the run's alive key, its ledger's set of runs; ARGV: ttl ms, run, create (1/0).
# Renews the key and answers 1 when it is there; else 0, having created it only when asked
# (a run's first beat): one that expired stays dead, for a claimer to take over.
BEAT = Script.of("""
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[2])
  return 1
end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[2])
end
return 0
""")
# KEYS: the run's alive key, its claim; ARGV: the claimer, the claim's ms. 1: claimed (the
# run is not alive and nobody else holds its claim).
CLAIM = Script.of("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
""")
# KEYS: the run's fates; ARGV: the fate asked for, the hash's ttl s, then request ids. Each
# request's fate is set where it has none; answers the ids whose fate is the one asked for.
FATE = Script.of("""
local won = {}
for i = 3, #ARGV do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[1])
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then won[#won + 1] = ARGV[i] end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return won
""")
# KEYS: the run's alive key, its ledger's set of runs, its claim; ARGV: run, claimer. A run
# still dead leaves the set (its requests are recorded); the claim is given up.
DONE = Script.of("""
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
if redis.call('GET', KEYS[3]) == ARGV[2] then redis.call('DEL', KEYS[3]) end
return 1
""")


class RunRegistry:
    """The runs of one ledger in Redis, over the request path's pipelined connection (off the
    request path itself: a heartbeat a second or so, a check of the others every few)."""

    def __init__(self, pipe: RedisPipe, prefix: str, ledger: str) -> None:
        self.pipe = pipe
        self.prefix = prefix
        self.runs_key = f"{prefix}:runs:{ledger}"

    def _key(self, kind: str, run: str) -> str:
        return f"{self.prefix}:{kind}:{run}"

    async def _eval(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.pipe.eval(script, keys, args, soon=True)
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None

    async def beat(self, run: str, ttl_s: float, create: bool = False) -> bool:
        """Renews `run`'s alive key; False when it had expired (or is new: created if `create`)."""
        args = [int(ttl_s * 1000), run, int(create)]
        return bool(await self._eval(BEAT, [self._key("alive", run), self.runs_key], args))

    async def runs(self) -> list[str]:
        try:
            got = await self.pipe.call("SMEMBERS", self.runs_key, soon=True)
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None
        return sorted(_text(r) for r in got or [])

    async def claim(self, run: str, claimer: str, for_s: float) -> bool:
        """Whether `claimer` now holds dead `run`'s claim (for `for_s`)."""
        keys = [self._key("alive", run), self._key("claim", run)]
        return bool(await self._eval(CLAIM, keys, [claimer, int(for_s * 1000)]))

    async def fates(self, run: str, fate: str, request_ids: list[str]) -> set[str]:
        """Of `request_ids` (requests of `run`), those whose fate is now `fate`."""
        if not request_ids:
            return set()
        won = await self._eval(FATE, [self._key("fate", run)], [fate, FATE_TTL_S, *request_ids])
        return {_text(r) for r in won or []}

    async def done(self, run: str, claimer: str) -> None:
        keys = [self._key("alive", run), self.runs_key, self._key("claim", run)]
        await self._eval(DONE, keys, [run, claimer])


def crashed_by(claimer: str) -> str:
    """The fate a claimer sets: its own, so that another claimer after it writes no row again."""
    return f"crashed:{claimer}"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
