"""The semantic cache's index shared by every instance, through Redis (cache entries in Redis).

Each instance keeps its own nearest-neighbour index: a search stays in process (no round
trip, no vector module needed in Redis). What instances share is what was indexed. An
instance that stores an answer matchable by meaning appends a record (the exact key of the
answer, the context hash, the guards and the embedding in half precision, compressed) to a
Redis stream per route and embedder, trimmed to the route's `max_entries` and expiring with
the route's ttl when no answer is added; a record older than the route's ttl (and
stale-if-error) is trimmed at the next one added, so that it never outlives its answer. Every
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
import math
import os
import time
import zlib
from collections.abc import Callable, Collection
from typing import Any

import orjson

from edgeroute import redis_client
from edgeroute.cache.entry import inflate
from edgeroute.cache.semantic import Guards, is_packed_spans, is_shape
from edgeroute.cache.stores import RECORD, CacheCounters, owned_set

log = logging.getLogger("edgeroute.cache")

# 2: the guards as a digest and packed spans; 3: and the turn's shape, and the tenant. Another version's record
# is skipped (`OtherVersion`): a version-2 record lacks the shape a match needs (its answer is still found exactly).
_VERSION = 3
_MAX_DIM = 16_384
_MAX_RECORD_BYTES = 1 << 20  # a vector of _MAX_DIM halves is 32 KiB; past this, a record no instance wrote
_PAGE = 500  # records per read while catching up
_BLOCK_MS = 5_000  # a follower's wait for new records

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
    """The streams of one cache: publish what this instance indexed, follow what the others did."""

    def __init__(self, url: str, prefix: str, timeout_ms: int, counters: CacheCounters) -> None:
        timeout = timeout_ms / 1000
        self.timeout = timeout
        self.prefix = prefix
        self.counters = counters
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
        self._followers: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}

    def stream(self, route: str, embedder: str | None) -> str:
        return f"{self.prefix}:cache:sem:{embedder or '-'}:{route}"

    async def publish(
        self,
        route: str,
        embedder: str | None,
        record: bytes,
        keep_s: float,
        max_entries: int,
        owner: str | None = None,
    ) -> None:
        """Appends a record (`encode`) for the other instances; a Redis error loses it (counted).
        `owner`: the managed key whose request it indexes; its id goes into the key's set of
        what it wrote (`owned_set`), so that its revocation deletes the record (`forget`)."""
        stream = self.stream(route, embedder)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xadd(stream, {b"r": record}, maxlen=max_entries, approximate=True)
                # Records older than their answers go too: each holds the prompt's numbers, names
                # and quoted text (its guards), which must not outlive the answer they point to.
                pipe.xtrim(stream, minid=f"{max(0, int((time.time() - keep_s) * 1000))}-0", approximate=False)
                pipe.expire(stream, max(1, math.ceil(keep_s)))
                rid = (await pipe.execute())[0]
            if owner is not None:
                rid = rid.decode() if isinstance(rid, bytes) else str(rid)
                # The entry's own write set the set's expiry, at least as late as this record's.
                until = int((time.time() + keep_s) * 1000)
                await self.client.zadd(owned_set(self.prefix, owner), {f"{RECORD}{rid} {stream}": until})
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
                    try:
                        origin, key, context, g, vector, tenant = decode(fields.get(b"r", b""))
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
        """Deletes the records these keys' requests published (their prompts' guards)."""
        for owner in owners:
            members = await self.client.zrange(owned_set(self.prefix, owner), 0, -1)
            for m in members:
                text = m.decode() if isinstance(m, bytes) else str(m)
                if text.startswith(RECORD):
                    rid, _, stream = text[len(RECORD) :].partition(" ")
                    await self.client.xdel(stream, rid)

    async def close(self) -> None:
        for task, _ in self._followers.values():
            task.cancel()
        if self._followers:
            await asyncio.wait([t for t, _ in self._followers.values()], timeout=2)
        await self.client.aclose()
        await self._reader.aclose()
