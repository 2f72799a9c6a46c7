"""Where cached answers live: a bounded in-process LRU, or Redis shared by every instance.

Both keep an entry for its ttl plus its stale-if-error window and no longer. A store never
fails a request: a Redis error or an entry that does not decode is a miss, counted.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Protocol

from edgeroute import redis_client
from edgeroute.cache.entry import Entry

log = logging.getLogger("edgeroute.cache")


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

    async def put(self, route: str, key: str, entry: Entry, keep_s: float, bounds: tuple[int, int]) -> None:
        """`bounds`: the route's (max entries, max bytes), for stores that enforce them."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """One LRU per route, bounded by entries and by bytes (each entry's body plus a fixed
    overhead); a JSON hit sends the stored body as it is."""

    def __init__(self, counters: CacheCounters) -> None:
        self.counters = counters
        # route -> key -> (seconds kept, the entry, its size)
        self._lrus: dict[str, collections.OrderedDict[str, tuple[float, Entry, int]]] = {}
        self._bytes: dict[str, int] = {}

    async def get(self, route: str, key: str) -> Entry | None:
        return self.get_now(route, key)

    def get_now(self, route: str, key: str, now: float | None = None) -> Entry | None:
        lru = self._lrus.get(route)
        item = lru.get(key) if lru is not None else None
        if item is None or lru is None:
            return None
        keep_s, entry, _ = item
        if entry.age(now) > keep_s:
            self._drop(route, key)
            return None
        lru.move_to_end(key)
        return entry

    async def put(self, route: str, key: str, entry: Entry, keep_s: float, bounds: tuple[int, int]) -> None:
        max_entries, max_bytes = bounds
        size = entry.size()
        if size > max_bytes:
            self.counters.too_large += 1
            return
        lru = self._lrus.setdefault(route, collections.OrderedDict())
        if key in lru:
            self._drop(route, key)
        lru[key] = (keep_s, entry, size)
        self._bytes[route] = self._bytes.get(route, 0) + size
        while len(lru) > max_entries or self._bytes[route] > max_bytes:
            oldest = next(iter(lru))
            self._drop(route, oldest)
            self.counters.evictions += 1

    def _drop(self, route: str, key: str) -> None:
        _, _, size = self._lrus[route].pop(key)
        self._bytes[route] -= size

    def totals(self) -> tuple[int, int]:
        """(entries, bytes) held over all routes."""
        return sum(len(lru) for lru in self._lrus.values()), sum(self._bytes.values())

    def size(self, route: str) -> tuple[int, int]:
        """(entries, bytes) held for a route."""
        return len(self._lrus.get(route, ())), self._bytes.get(route, 0)

    async def close(self) -> None:
        return None


class RedisStore:
    """Entries as compressed values under `{prefix}:cache:{route}:{key}`, expired by Redis."""

    def __init__(self, counters: CacheCounters, url: str, prefix: str, timeout_ms: int) -> None:
        self.counters = counters
        self.prefix = prefix
        timeout = timeout_ms / 1000
        self.client = redis_client.connect(
            url, no_retry=True, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0
        )

    def _key(self, route: str, key: str) -> str:
        return f"{self.prefix}:cache:{route}:{key}"

    async def get(self, route: str, key: str) -> Entry | None:
        try:
            data = await self.client.get(self._key(route, key))
        except redis_client.errors() as e:
            self.counters.errors += 1
            log.warning("response cache: Redis unavailable (%s); serving a miss", type(e).__name__)
            return None
        if data is None:
            return None
        try:
            return Entry.loads(data if isinstance(data, bytes) else data.encode())
        except ValueError:
            self.counters.corrupt += 1
            log.warning("response cache: a corrupt entry for route %s was ignored", route)
            return None

    async def put(self, route: str, key: str, entry: Entry, keep_s: float, bounds: tuple[int, int]) -> None:
        """Redis bounds the whole cache by its own `maxmemory` policy, not per route."""
        try:
            await self.client.set(self._key(route, key), entry.dumps(), px=max(1, int(keep_s * 1000)))
        except redis_client.errors() as e:
            self.counters.errors += 1
            log.warning("response cache: Redis unavailable (%s); answer not stored", type(e).__name__)

    async def close(self) -> None:
        await self.client.aclose()
