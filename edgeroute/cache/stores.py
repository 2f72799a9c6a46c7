"""Where cached answers live: a bounded in-process LRU, or Redis shared by every instance.

Both keep an entry for its ttl plus its stale-if-error window and no longer. A store never
fails a request: a Redis error or an entry that does not decode is a miss, counted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

from edgeroute import redis_client
from edgeroute.cache.entry import Entry
from edgeroute.redis_pipe import RedisPipe, Script, encode

log = logging.getLogger("edgeroute.cache")

DECODED_MAX_BYTES = 4 * 1024 * 1024  # decoded Redis entries kept in process, stored form and body


ENTRY = "e "  # a member of an `owned_set` naming an entry
RECORD = "s "  # one naming a shared semantic record: "s <id> <stream>"
# The entry, and its name in its writer's set (scored by when it expires, so that the names of
# expired entries go at the next write: a key that stores all day keeps a set of what is live),
# whose own expiry is pushed to the entry's if later.
_PUT_OWNED = Script.of(
    """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""
)


def owned_set(prefix: str, owner: str) -> str:
    """The sorted set of the entries (and semantic records) a managed key's requests wrote,
    scored by their expiry (ms): hashes and stream ids, no content. Kept as long as its
    longest-kept entry, and not deleted when the key ends: every instance reads it to drop
    what it holds in memory."""
    return f"{prefix}:cache-owner:{owner}"


@dataclass(slots=True)
class CacheCounters:
    hits: int = 0
    semantic_hits: int = 0  # of the hits, those matched by meaning
    misses: int = 0
    stale: int = 0
    bypass: int = 0
    stores: int = 0
    evictions: int = 0
    too_large: int = 0
    errors: int = 0  # the store was unreachable: served as misses
    corrupt: int = 0  # an entry that did not decode: a miss, never a bad answer
    embedding_errors: int = 0  # a configured embedder failed: a miss, never an error


class Store(Protocol):
    async def get(self, route: str, key: str) -> Entry | None: ...

    async def put(
        self, route: str, key: str, entry: Entry, keep_s: float, bounds: tuple[int, int], owner: str | None = None
    ) -> None:
        """`bounds`: the route's (max entries, max bytes), for stores that enforce them. `owner`:
        the managed key whose request wrote it, whose revocation drops it (`forget`)."""
        ...

    async def forget(self, owners: Collection[str]) -> set[str]:
        """Drops every entry these keys' requests wrote; the exact keys dropped."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """One LRU per route, bounded by entries and by bytes (each entry's body plus a fixed
    overhead); a JSON hit sends the stored body as it is."""

    def __init__(self, counters: CacheCounters) -> None:
        self.counters = counters
        # route -> key -> (seconds kept, the entry, its size, the managed key that wrote it)
        self._lrus: dict[str, collections.OrderedDict[str, tuple[float, Entry, int, str | None]]] = {}
        self._bytes: dict[str, int] = {}

    async def get(self, route: str, key: str) -> Entry | None:
        return self.get_now(route, key)

    def get_now(self, route: str, key: str, now: float | None = None) -> Entry | None:
        lru = self._lrus.get(route)
        item = lru.get(key) if lru is not None else None
        if item is None or lru is None:
            return None
        keep_s, entry, _, _ = item
        if entry.age(now) > keep_s:
            self._drop(route, key)
            return None
        lru.move_to_end(key)
        return entry

    async def put(
        self, route: str, key: str, entry: Entry, keep_s: float, bounds: tuple[int, int], owner: str | None = None
    ) -> None:
        max_entries, max_bytes = bounds
        size = entry.size()
        if size > max_bytes:
            self.counters.too_large += 1
            return
        lru = self._lrus.setdefault(route, collections.OrderedDict())
        if key in lru:
            self._drop(route, key)
        lru[key] = (keep_s, entry, size, owner)
        self._bytes[route] = self._bytes.get(route, 0) + size
        while len(lru) > max_entries or self._bytes[route] > max_bytes:
            oldest = next(iter(lru))
            self._drop(route, oldest)
            self.counters.evictions += 1

    def _drop(self, route: str, key: str) -> None:
        _, _, size, _ = self._lrus[route].pop(key)
        self._bytes[route] -= size

    async def forget(self, owners: Collection[str]) -> set[str]:
        """A scan of every entry (bounded by the routes' `max_entries`; revocations are rare)."""
        wanted = set(owners)
        gone = [(route, key) for route, lru in self._lrus.items() for key, item in lru.items() if item[3] in wanted]
        for route, key in gone:
            self._drop(route, key)
        return {key for _, key in gone}

    def totals(self) -> tuple[int, int]:
        """(entries, bytes) held over all routes."""
        return sum(len(lru) for lru in self._lrus.values()), sum(self._bytes.values())

    def size(self, route: str) -> tuple[int, int]:
        """(entries, bytes) held for a route."""
        return len(self._lrus.get(route, ())), self._bytes.get(route, 0)

    async def close(self) -> None:
        return None


class RedisStore:
    """Entries as compressed values under `{prefix}:cache:{route}:{key}`, expired by Redis,
    over the request path's pipelined connection (`redis_pipe`)."""

    def __init__(self, counters: CacheCounters, url: str, prefix: str, timeout_ms: int) -> None:
        self.counters = counters
        self.prefix = prefix
        self.pipe = RedisPipe.shared(url, timeout_ms / 1000)
        # Entries decoded lately, by their stored bytes: a hot entry is decompressed and
        # checked once per process, not once per hit (the bytes are still read from Redis,
        # so an entry replaced or expired there is never served from here).
        self._decoded: collections.OrderedDict[bytes, Entry] = collections.OrderedDict()
        self._decoded_bytes = 0

    def _key(self, route: str, key: str) -> str:
        return f"{self.prefix}:cache:{route}:{key}"

    def fetch(self, route: str, key: str) -> asyncio.Future[Any]:
        """Asks for an entry (no task; written with the next command sent now, e.g. admission's
        script, or at the end of this loop pass); `get` reads the answer."""
        return self.pipe.send(encode(("GET", self._key(route, key))), soon=True)

    async def get(self, route: str, key: str, fetching: asyncio.Future[Any] | None = None) -> Entry | None:
        try:
            data = await (fetching if fetching is not None else self.fetch(route, key))
        except redis_client.errors() as e:
            self.counters.errors += 1
            log.warning("response cache: Redis unavailable (%s); serving a miss", type(e).__name__)
            return None
        if not isinstance(data, bytes):
            return None  # no such key (a reply of another type cannot come from a GET)
        if (entry := self._decoded.get(data)) is not None:
            self._decoded.move_to_end(data)
            return entry
        try:
            entry = Entry.loads(data)
        except ValueError:
            self.counters.corrupt += 1
            log.warning("response cache: a corrupt entry for route %s was ignored", route)
            return None
        self._remember(data, entry)
        return entry

    def _remember(self, data: bytes, entry: Entry) -> None:
        size = len(data) + entry.size()
        if size > DECODED_MAX_BYTES // 16:
            return  # a large entry would crowd out many small hot ones
        self._decoded[data] = entry
        self._decoded_bytes += size
        while self._decoded_bytes > DECODED_MAX_BYTES:
            old, gone = self._decoded.popitem(last=False)
            self._decoded_bytes -= len(old) + gone.size()

    def owned(self, owner: str) -> str:
        return owned_set(self.prefix, owner)

    async def put(
        self, route: str, key: str, entry: Entry, keep_s: float, bounds: tuple[int, int], owner: str | None = None
    ) -> None:
        """Redis bounds the whole cache by its own `maxmemory` policy, not per route."""
        try:
            px = max(1, int(keep_s * 1000))
            if owner is None:
                await self.pipe.call("SET", self._key(route, key), entry.dumps(), "PX", px, soon=True)  # off the path
            else:
                keys = [self._key(route, key), self.owned(owner)]
                await self.pipe.eval(_PUT_OWNED, keys, [entry.dumps(), px, ENTRY + keys[0]], soon=True)
        except redis_client.errors() as e:
            self.counters.errors += 1
            log.warning("response cache: Redis unavailable (%s); answer not stored", type(e).__name__)

    async def forget(self, owners: Collection[str]) -> set[str]:
        """Deletes the entries these keys' requests wrote (their `owned` sets); the exact keys.
        Every instance does it on seeing the revocation: the first deletes, the others find
        nothing left to delete but still learn which keys to drop from memory."""
        dropped: set[str] = set()
        self._decoded.clear()  # a memo of decoded entries: it may hold theirs
        for owner in owners:
            members = await self.pipe.call("ZRANGE", self.owned(owner), 0, -1)
            entries = [m.decode() for m in members or () if isinstance(m, bytes) and m.startswith(ENTRY.encode())]
            names = [m[len(ENTRY) :] for m in entries]
            for i in range(0, len(names), 500):
                await self.pipe.call("DEL", *names[i : i + 500])
            dropped |= {name.rpartition(":")[2] for name in names}
        return dropped

    async def close(self) -> None:
        await self.pipe.close()
