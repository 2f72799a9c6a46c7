"""The semantic cache's index shared by every instance, through Redis (cache entries in Redis).

Each instance keeps its own nearest-neighbour index: a search stays in process (no round
trip, no vector module needed in Redis). What instances share is what was indexed. An
instance that stores an answer matchable by meaning appends a record (the exact key of the
answer, the context hash, the guards and the embedding in half precision, compressed) to a
Redis stream per route and embedder, expiring with the route's ttl when no answer is added; a
record older than the route's ttl (and stale-if-error) is trimmed at the next one added, so
that it never outlives its answer. Each tenant holds at most the route's `max_entries` records
of a stream (its oldest go first: a sorted set of its record ids per stream, kept by the
publishing script), so that one tenant's flood of prompts trims its own records, not the
others' (an instance that starts later reads theirs still); the whole stream holds at most
`STREAM_TENANTS` times `max_entries` (its oldest go, whoever wrote them). Every
instance follows the streams of the routes it looks up: a new or restarted one reads the
stream from its start (the first lookup waits for that, within the Redis timeout), then
blocks for new records and adds them to its index. The answers stay the exact entries, so a
record whose answer has expired finds nothing: a miss.

Redis down: the follower retries every second; lookups search what the index holds and the
read of the answer misses. A record that does not decode is skipped and counted as corrupt,
never matched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import zlib
from collections.abc import Callable, Collection
from typing import Any

import orjson

from edgeroute import redis_client
from edgeroute.cache.entry import inflate
from edgeroute.cache.semantic import Guards, is_packed_spans, is_shape
from edgeroute.cache.signing import EntrySigner, unsigned
from edgeroute.cache.stores import RECORD, CacheCounters, forget_owned, owned_set, owner_shares
from edgeroute.redis_pipe import RedisPipe

log = logging.getLogger("edgeroute.cache")

# 2: the guards as a digest and packed spans; 3: and the turn's shape, and the tenant. Another version's record
# is skipped (`OtherVersion`): a version-2 record lacks the shape a match needs (its answer is still found exactly).
_VERSION = 3
_MAX_DIM = 16_384
_MAX_RECORD_BYTES = 1 << 20  # a vector of _MAX_DIM halves is 32 KiB; past this, a record no instance wrote
_PAGE = 500  # records per read while catching up
_BLOCK_MS = 5_000  # a follower's wait for new records
# A stream holds at most this many tenants' full shares (`max_entries` records each; Redis
# trims by whole nodes, so up to about 100 more): its size, and what an instance starting
# reads, do not grow with the number of tenants. Past it, tenants that fill their shares push
# the oldest records out whoever wrote them.
STREAM_TENANTS = 8

# Appends a record (ARGV[1]) to the stream (KEYS[1]) and its id to its tenant's share of it
# (KEYS[2]; scored by when it was added), of which past ARGV[3] records the oldest go from both
# (at most 64 an add); records and ids older than the keep time (ARGV[2], ms) go too. For a
# managed key's request, the id goes into the key's set (KEYS[3], `owned_set`) and the share's
# name into its set of shares (KEYS[4], `owner_shares`), for its revocation. Past ARGV[4]
# records (`STREAM_TENANTS` shares) the stream's oldest go whoever wrote them: its backstop.
# Returns how many of the tenant's records went.
_PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local px = tonumber(ARGV[2])
local id = redis.call('XADD', KEYS[1], '*', 'r', ARGV[1])
redis.call('XTRIM', KEYS[1], 'MINID', tostring(math.max(0, now - px)) .. '-0')
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[4])
redis.call('PEXPIRE', KEYS[1], px)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - px)
redis.call('ZADD', KEYS[2], now, id)
local over = math.min(redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3]), 64)
if over > 0 then
  redis.call('XDEL', KEYS[1], unpack(redis.call('ZRANGE', KEYS[2], 0, over - 1)))
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
else
  over = 0
end
redis.call('PEXPIRE', KEYS[2], px)
if #KEYS == 4 then
  redis.call('ZADD', KEYS[3], now + px, 's ' .. id .. ' ' .. KEYS[1])
  if redis.call('PTTL', KEYS[3]) < px then redis.call('PEXPIRE', KEYS[3], px) end
  redis.call('SADD', KEYS[4], KEYS[2])
  if redis.call('PTTL', KEYS[4]) < px then redis.call('PEXPIRE', KEYS[4], px) end
end
return over
"""

# Adds decoded records (vector, context, guards, exact key, tenant) to an index; runs off the loop.
Adder = Callable[[list[tuple[Any, str, Guards, str, str]]], None]


def encode(origin: str, key: str, context: str, g: Guards, vector: Any, tenant: str = "") -> bytes:
    import numpy as np

    half = np.asarray(vector, dtype=np.float16)
    head = [_VERSION, origin, key, context, g.exact.hex(), g.language, g.spans.hex(), len(half), g.shape.hex(), tenant]
    return zlib.compress(orjson.dumps(head) + b"\n" + half.tobytes(), 1)


class OtherVersion(ValueError):
    """A record of another release's format (a rolling upgrade): skipped, not corrupt."""


def decode(data: bytes) -> tuple[str, str, str, Guards, Any, str]:
    """(origin, exact key, context, guards, vector, tenant); ValueError for anything this module did not write
    (`OtherVersion` for a record of another release's format)."""
    import numpy as np

    try:
        raw = inflate(data, _MAX_RECORD_BYTES)
        head, _, vec = raw.partition(b"\n")
        fields = orjson.loads(head)
        if isinstance(fields, list) and fields and type(fields[0]) is int and fields[0] != _VERSION:
            raise OtherVersion(f"a version-{fields[0]} record")
        v, origin, key, context, exact, language, spans, ndim, shape, tenant = fields
        g = Guards(bytes.fromhex(exact), language, bytes.fromhex(spans), bytes.fromhex(shape))
    except OtherVersion:
        raise
    except (zlib.error, orjson.JSONDecodeError, ValueError, TypeError) as e:
        raise ValueError(f"not a semantic index record: {type(e).__name__}") from None
    if (
        v != _VERSION
        or not all(isinstance(s, str) for s in (origin, key, context, tenant))
        or len(g.exact) != 16
        or not is_packed_spans(g.spans)
        or not is_shape(g.shape)
        or not (language is None or isinstance(language, str))
        or not isinstance(ndim, int)
        or not 0 < ndim <= _MAX_DIM
        or len(vec) != 2 * ndim
    ):
        raise ValueError("not a semantic index record")
    vector = np.frombuffer(vec, dtype=np.float16).astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise ValueError("a vector that is not finite")
    return origin, key, context, g, vector, tenant


class SharedIndexes:
    """The streams of one cache: publish what this instance indexed, follow what the others did.
    With `signer`, records are signed for their stream as entries are (`signing.py`): a forged
    record pointing a tenant's paraphrases at another of its answers is skipped, counted."""

    def __init__(
        self, url: str, prefix: str, timeout_ms: int, counters: CacheCounters, signer: EntrySigner | None = None
    ) -> None:
        timeout = timeout_ms / 1000
        self.timeout = timeout
        self.prefix = prefix
        self.counters = counters
        self.signer = signer
        self.origin = os.urandom(8).hex()  # this instance: its own records are indexed already
        self.client = redis_client.connect(
            url, no_retry=True, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0
        )
        # Blocking reads hold a connection for seconds: their own client, with a longer timeout.
        self._reader = redis_client.connect(
            url,
            no_retry=True,
            socket_timeout=_BLOCK_MS / 1000 + timeout + 1,
            socket_connect_timeout=timeout,
            health_check_interval=0,
        )
        self._pipe = RedisPipe.shared(url, timeout)  # for `forget`'s pages, the exact store's connection
        self._followers: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self._publish = self.client.register_script(_PUBLISH)

    def stream(self, route: str, embedder: str | None) -> str:
        return f"{self.prefix}:cache:sem:{embedder or '-'}:{route}"

    def share(self, route: str, embedder: str | None, tenant: str) -> str:
        """A tenant's record ids in a stream, by when each was added (ids only, no content)."""
        return f"{self.prefix}:cache-sem-share:{embedder or '-'}:{route}:{tenant}"

    async def publish(
        self,
        route: str,
        embedder: str | None,
        record: bytes,
        keep_s: float,
        max_entries: int,
        owner: str | None = None,
        tenant: str = "",
    ) -> None:
        """Appends a record (`encode`) for the other instances, within `tenant`'s share of the
        stream (`_PUBLISH`); a Redis error loses it (counted). `owner`: the managed key whose
        request it indexes; its id goes into the key's set of what it wrote (`owned_set`), so
        that its revocation deletes the record (`forget`)."""
        stream = self.stream(route, embedder)
        if self.signer is not None:
            record = self.signer.sign(stream, record)
        keys = [stream, self.share(route, embedder, tenant)]
        if owner is not None:
            keys += [owned_set(self.prefix, owner), owner_shares(self.prefix, owner)]
        try:
            # Records older than their answers go too: each holds the prompt's numbers, names
            # and quoted text (its guards), which must not outlive the answer they point to.
            args: list[bytes | int] = [record, max(1, int(keep_s * 1000)), max_entries, max_entries * STREAM_TENANTS]
            await self._publish(keys=keys, args=args)
        except redis_client.errors() as e:
            self.counters.errors += 1
            log.warning("response cache: Redis unavailable (%s); a semantic entry was not shared", type(e).__name__)

    async def follow(self, route: str, embedder: str | None, add: Adder, run: Callable[..., Any]) -> None:
        """Follows the route's stream from its start (once per stream); the first call waits up to
        the Redis timeout for the records already there. `run(fn, arg)` runs an index update off the
        loop and returns its awaitable."""
        stream = self.stream(route, embedder)
        found = self._followers.get(stream)
        if found is None:
            ready = asyncio.Event()
            task = asyncio.get_running_loop().create_task(self._follow(stream, add, run, ready))
            self._followers[stream] = found = (task, ready)
        ready = found[1]
        if not ready.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(ready.wait()), self.timeout * 4)
            except TimeoutError:
                pass

    async def _follow(self, stream: str, add: Adder, run: Callable[..., Any], ready: asyncio.Event) -> None:
        last = "0-0"
        while True:
            try:
                block = _BLOCK_MS if ready.is_set() else None
                got: Any = await self._reader.xread({stream: last}, count=_PAGE, block=block)
            except redis_client.errors() as e:
                if not ready.is_set():
                    log.warning("response cache: cannot read the shared semantic index (%s)", type(e).__name__)
                ready.set()  # lookups go on with what this instance has
                await asyncio.sleep(1.0)
                continue
            records: list[tuple[Any, str, Guards, str, str]] = []
            n = 0
            for _, entries in got or ():
                for rid, fields in entries:
                    n += 1
                    last = rid.decode() if isinstance(rid, bytes) else str(rid)
                    raw = fields.get(b"r", b"")
                    data = unsigned(raw) if self.signer is None else self.signer.check(stream, raw)
                    if data is None:
                        self.counters.invalid += 1  # unsigned or badly signed: planted
                        continue
                    try:
                        origin, key, context, g, vector, tenant = decode(data)
                    except OtherVersion:
                        continue  # another release's instance indexed it: its answer is still found exactly
                    except ValueError:
                        self.counters.corrupt += 1
                        continue
                    if origin != self.origin:
                        records.append((vector, context, g, key, tenant))
            if records:
                try:
                    await run(add, records)
                except Exception:  # an index that refuses a record must not stop the follower
                    log.exception("response cache: shared semantic records not indexed")
            if n < _PAGE:
                ready.set()  # caught up: from now on, wait for new records

    async def forget(self, owners: Collection[str]) -> None:
        """Deletes the records these keys' requests published (their prompts' guards), and
        strikes them from their tenants' shares of the streams (one instance deletes; see
        `forget_owned`)."""
        for owner in owners:
            async for _ in forget_owned(self._pipe, self.prefix, owner, RECORD):
                pass

    async def close(self) -> None:
        for task, _ in self._followers.values():
            task.cancel()
        if self._followers:
            await asyncio.wait([t for t, _ in self._followers.values()], timeout=2)
        await self.client.aclose()
        await self._reader.aclose()
        await self._pipe.close()
