"""Where cached answers live: a bounded in-process LRU, or Redis shared by every instance.

Both keep an entry for its ttl plus its stale-if-error window and no longer. A store never
fails a request: a Redis error or an entry that does not decode is a miss, counted.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from edgeroute import redis_client
from edgeroute.cache.entry import MAX_STORED_BYTES, Entry, InvalidEntry
from edgeroute.cache.settings import MAX_ENTRY_BYTES
from edgeroute.cache.signing import EntrySigner, unsigned
from edgeroute.redis_pipe import RedisPipe, Script, encode

log = logging.getLogger("edgeroute.cache")

DECODED_MAX_BYTES = 4 * 1024 * 1024  # decoded Redis entries kept in process, stored form and body


def value_cap(max_entry_bytes: int) -> int:
    """The longest value edgeroute writes for an answer of at most `max_entry_bytes` (a route's):
    with its header, compressed (deflate adds at most 5 bytes per 16 KiB it cannot shrink) and
    signed. A read asks for no more than one byte past it (`GETRANGE`): a longer value, planted,
    was read whole on the event loop (a second of it for 256 MiB, until the Redis timeout cut the
    pipe every request shares) and left there for the next request to read again."""
    raw = max_entry_bytes + (MAX_STORED_BYTES - MAX_ENTRY_BYTES)
    return raw + (raw >> 10) + 1024


ENTRY = "e "  # a member of an `owned_set` naming an entry
RECORD = "s "  # one naming a shared semantic record: "s <id> <stream>"
# The entry; its name in its tenant's share of the route (scored by when it was last used:
# written, or hit (`_TOUCH`); names unused for longer than the entry is kept go first), of
# which past `max_entries` the least recently used go (at most 64 a write: a lowered bound is
# reached over the next writes); and, for a managed key's request, its name in the key's set
# (scored by when it expires, so that the names of expired entries go at the next write: a
# key that stores all day keeps a set of what is live; its expiry pushed to the entry's if
# later) and the share's name in the key's set of shares (`owner_shares`: where its names are
# struck when it ends). Returns how many live entries went; -1, writing nothing, when the managed
# key has ended already (KEYS[5], `forget_owned`'s claim, exists: another instance saw it end and
# dropped what it had stored, and a request of it in flight then must not store after that).
_PUT = Script.of(
    """
if #KEYS == 5 and redis.call('EXISTS', KEYS[5]) == 1 then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local px = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - px)
redis.call('ZADD', KEYS[2], now, KEYS[1])
local over = math.min(redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3]), 64)
local gone = 0
if over > 0 then
  gone = redis.call('DEL', unpack(redis.call('ZRANGE', KEYS[2], 0, over - 1)))
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
end
redis.call('PEXPIRE', KEYS[2], px)
if #KEYS >= 4 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  redis.call('ZADD', KEYS[3], now + px, ARGV[4])
  if redis.call('PTTL', KEYS[3]) < px then redis.call('PEXPIRE', KEYS[3], px) end
  redis.call('SADD', KEYS[4], KEYS[2])
  if redis.call('PTTL', KEYS[4]) < px then redis.call('PEXPIRE', KEYS[4], px) end
end
return gone
"""
)
# Hits: each entry's name (ARGV[i]) moved to now in its tenant's share (KEYS[i]), if still
# there (XX: an entry evicted or expired meanwhile is not named again).
_TOUCH = Script.of(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], 'XX', now, ARGV[i]) end
return #KEYS
"""
)
# A managed key ended: one page of what its requests stored (its `owned_set`, ranks ARGV[2]
# to ARGV[3]) of one kind (ARGV[1]: ENTRY or RECORD) goes, and those names are struck from
# every share it counted against (`owner_shares`), so that they no longer take up its tenant's
# `max_entries`. Returns {how many were still there, the page's size, the names}. One page a
# script (`FORGET_PAGE`): a key that wrote 100,000 entries must not hold Redis for a second.
# The last page (shorter than asked) cuts both sets' life to ARGV[4] ms (`FORGOTTEN_KEEP_MS`).
FORGET = Script.of(
    """
local names, gone = {}, 0
local page = redis.call('ZRANGE', KEYS[1], ARGV[2], ARGV[3])
for _, m in ipairs(page) do
  if string.sub(m, 1, 2) == ARGV[1] then
    local name = string.sub(m, 3)
    if ARGV[1] == 'e ' then
      gone = gone + redis.call('UNLINK', name)
    else
      local sp = string.find(name, ' ', 1, true)
      local stream = string.sub(name, sp + 1)
      name = string.sub(name, 1, sp - 1)
      gone = gone + redis.call('XDEL', stream, name)
    end
    names[#names + 1] = name
  end
end
if #names > 0 then
  for _, share in ipairs(redis.call('SMEMBERS', KEYS[2])) do redis.call('ZREM', share, unpack(names)) end
end
if #page <= tonumber(ARGV[3]) - tonumber(ARGV[2]) then
  for i = 1, 2 do
    local left = redis.call('PTTL', KEYS[i])
    if left == -1 or left > tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
  end
end
return {gone, #page, names}
"""
)
FORGET_PAGE = 500  # members of a key's `owned_set` a FORGET script reads (about a millisecond of Redis)
# Once an instance has forgotten a key, its sets stay this long at most (the others, seeing the
# key end within their governance poll, read them to drop what they hold in memory).
FORGOTTEN_KEEP_MS = 600_000
TOUCH_EVERY_S = 0.1  # hits' touches are sent together at most this late
TOUCH_MAX = 1024  # or once this many are pending (the pending touches' bound)
TOUCH_SENDING_MAX = 4  # batches awaiting Redis at once; past it, new ones are dropped


def share_set(prefix: str, route: str, tenant: str) -> str:
    """The sorted set of a tenant's entries of a route, by when each was written: what bounds
    the tenant to `max_entries` there (entry names only, no content)."""
    return f"{prefix}:cache-share:{route}:{tenant}"


def owned_set(prefix: str, owner: str) -> str:
    """The sorted set of the entries (and semantic records) a managed key's requests wrote,
    scored by their expiry (ms): hashes and stream ids, no content. Kept as long as its
    longest-kept entry; once the key has ended, `FORGOTTEN_KEEP_MS` at most (every instance
    reads it to drop what it holds in memory)."""
    return f"{prefix}:cache-owner:{owner}"


def owner_shares(prefix: str, owner: str) -> str:
    """The set of the shares (`share_set`, the semantic index's) a managed key's requests
    stored in: where their names are struck when it ends. Kept as long as its `owned_set`."""
    return f"{prefix}:cache-owner-shares:{owner}"


def forgot_claim(prefix: str, owner: str, kind: str) -> str:
    """Set (for `FORGOTTEN_KEEP_MS`) by the instance that drops what an ended key stored of
    `kind` (`forget_owned`): while it is there, the key's requests store no entry (`_PUT`)."""
    return f"{prefix}:cache-owner-forgot:{owner}:{kind.strip()}"


@dataclass(slots=True)
class CacheCounters:
    hits: int = 0
    semantic_hits: int = 0  # of the hits, those matched by meaning
    misses: int = 0
    stale: int = 0
    bypass: int = 0
    stores: int = 0
    evictions: int = 0  # entries evicted to stay within bounds, of which:
    evicted_share: int = 0  # another tenant's, which held the most (in memory; see `_Route`)
    evicted_capped: int = 0  # the writing tenant's least recently used, past its `max_entries` (Redis; `_PUT`)
    evicted_revoked: int = 0  # entries of a managed key that ended (not in `evictions`: no bound asked it)
    too_large: int = 0
    errors: int = 0  # the store was unreachable: served as misses
    corrupt: int = 0  # an entry that did not decode: a miss, never a bad answer
    # One that decoded to what edgeroute does not write, or that belongs to another request's
    # key, tenant or endpoint (planted in or copied within the shared store): a miss too.
    invalid: int = 0
    embedding_errors: int = 0  # a configured embedder failed: a miss, never an error
    embedding_skipped: int = 0  # a turn the embedding thread could not take in time: matched exactly only


class Store(Protocol):
    async def get(self, route: str, key: str, max_entry_bytes: int = MAX_ENTRY_BYTES) -> Entry | None:
        """The entry, if any; `max_entry_bytes`: the route's (a larger one is none it wrote)."""

    async def put(
        self,
        route: str,
        key: str,
        entry: Entry,
        keep_s: float,
        bounds: tuple[int, int],
        owner: str | None = None,
        tenant: str = "",
    ) -> bool:
        """`bounds`: the route's (max entries, max bytes), for stores that enforce them. `owner`:
        the managed key whose request wrote it, whose revocation drops it (`forget`). `tenant`:
        whose share of the bounds it counts against (`service.share_of`). Whether it was stored."""
        ...

    async def forget(self, owners: Collection[str]) -> set[str]:
        """Drops every entry these keys' requests wrote; the exact keys dropped. A `put` for
        one of them after this writes nothing (Redis: `_PUT`; in memory: the caller's check)."""
        ...

    async def close(self) -> None: ...


class _Largest:
    """Tenants by a size that changes (entries held, bytes held), the largest found without a
    scan: a max-heap holding, for each tenant, a size at or above what it holds now. A growth
    is pushed; a shrink is not (the larger size stands for it until it surfaces, and is then
    replaced by the size held). Rebuilt when it is four times as long as there are tenants."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def add(self, tenant: str, delta: int) -> None:
        size = self.sizes.get(tenant, 0) + delta
        if size <= 0:
            self.sizes.pop(tenant, None)
            return
        self.sizes[tenant] = size
        if delta > 0:
            heapq.heappush(self._heap, (-size, tenant))
            if len(self._heap) > 4 * len(self.sizes) + 64:
                self._heap = [(-n, t) for t, n in self.sizes.items()]
                heapq.heapify(self._heap)

    def largest(self, prefer: str) -> str:
        """The tenant holding the most (`prefer` among equals). Only while some tenant holds any."""
        heap, sizes = self._heap, self.sizes
        while True:
            most, tenant = heap[0]
            held = sizes.get(tenant, 0)
            if held == -most:
                return prefer if sizes.get(prefer) == held else tenant
            if held:
                heapq.heapreplace(heap, (-held, tenant))
            else:
                heapq.heappop(heap)


@dataclass(slots=True)
class _Held:
    keep_s: float  # seconds kept: ttl plus stale-if-error
    entry: Entry
    size: int
    owner: str | None  # the managed key whose request wrote it (dropped when it is revoked)
    tenant: str  # whose share of the route's bounds it counts against


class _Route:
    """One route's entries, each in its tenant's least-recently-used order. Past a bound, the
    oldest entry of the tenant holding the most (entries past `max_entries`, bytes past
    `max_bytes`) goes: a tenant alone has the whole bound, and one that writes many distinct
    answers pushes out its own older ones once it holds the most, not every other tenant's."""

    __slots__ = ("bytes", "bytes_of", "entries_of", "held", "orders")

    def __init__(self) -> None:
        self.held: dict[str, _Held] = {}
        self.orders: dict[str, collections.OrderedDict[str, None]] = {}  # tenant -> its keys, oldest first
        self.bytes = 0
        self.entries_of, self.bytes_of = _Largest(), _Largest()

    def add(self, key: str, item: _Held) -> None:
        self.held[key] = item
        self.orders.setdefault(item.tenant, collections.OrderedDict())[key] = None
        self.bytes += item.size
        self.entries_of.add(item.tenant, 1)
        self.bytes_of.add(item.tenant, item.size)

    def drop(self, key: str) -> _Held:
        item = self.held.pop(key)
        order = self.orders[item.tenant]
        del order[key]
        if not order:
            del self.orders[item.tenant]
        self.bytes -= item.size
        self.entries_of.add(item.tenant, -1)
        self.bytes_of.add(item.tenant, -item.size)
        return item

    def victim(self, bounds: tuple[int, int], writer: str) -> str | None:
        """The key to evict to stay within `bounds` (None: within them)."""
        if len(self.held) > bounds[0]:
            tenant = self.entries_of.largest(writer)
        elif self.bytes > bounds[1]:
            tenant = self.bytes_of.largest(writer)
        else:
            return None
        return next(iter(self.orders[tenant]))


class MemoryStore:
    """Per route, entries bounded by count and by bytes (each entry's body plus a fixed
    overhead), shared fairly by the tenants writing them (`_Route`); a JSON hit sends the
    stored body as it is."""

    def __init__(self, counters: CacheCounters) -> None:
        self.counters = counters
        self._routes: dict[str, _Route] = {}

    async def get(self, route: str, key: str, max_entry_bytes: int = MAX_ENTRY_BYTES) -> Entry | None:
        return self.get_now(route, key)

    def get_now(self, route: str, key: str, now: float | None = None) -> Entry | None:
        lru = self._routes.get(route)
        item = lru.held.get(key) if lru is not None else None
        if item is None or lru is None:
            return None
        if item.entry.age(now) > item.keep_s:
            lru.drop(key)
            return None
        lru.orders[item.tenant].move_to_end(key)
        return item.entry

    async def put(
        self,
        route: str,
        key: str,
        entry: Entry,
        keep_s: float,
        bounds: tuple[int, int],
        owner: str | None = None,
        tenant: str = "",
    ) -> bool:
        size = entry.size()
        if size > bounds[1]:
            self.counters.too_large += 1
            return False
        lru = self._routes.get(route)
        if lru is None:
            lru = self._routes[route] = _Route()
        if key in lru.held:
            lru.drop(key)
        lru.add(key, _Held(keep_s, entry, size, owner, tenant))
        while (old := lru.victim(bounds, tenant)) is not None:
            if lru.drop(old).tenant != tenant:
                self.counters.evicted_share += 1
            self.counters.evictions += 1
        return True

    async def forget(self, owners: Collection[str]) -> set[str]:
        """A scan of every entry (bounded by the routes' `max_entries`; revocations are rare)."""
        wanted = set(owners)
        gone = [(r, key) for r, lru in self._routes.items() for key, item in lru.held.items() if item.owner in wanted]
        for r, key in gone:
            self._routes[r].drop(key)
        self.counters.evicted_revoked += len(gone)
        return {key for _, key in gone}

    def totals(self) -> tuple[int, int]:
        """(entries, bytes) held over all routes."""
        return sum(len(lru.held) for lru in self._routes.values()), sum(lru.bytes for lru in self._routes.values())

    def size(self, route: str, tenant: str | None = None) -> tuple[int, int]:
        """(entries, bytes) held for a route (of them, `tenant`'s)."""
        lru = self._routes.get(route)
        if lru is None:
            return 0, 0
        if tenant is None:
            return len(lru.held), lru.bytes
        return lru.entries_of.sizes.get(tenant, 0), lru.bytes_of.sizes.get(tenant, 0)

    async def close(self) -> None:
        return None


class RedisStore:
    """Entries as compressed values under `{prefix}:cache:{route}:{key}`, expired by Redis,
    over the request path's pipelined connection (`redis_pipe`), signed when `signer` is
    given (`signing.py`). A value read that is not a servable entry for its name (corrupt,
    planted, unsigned or badly signed, stored under another key) is a miss and is deleted."""

    def __init__(
        self, counters: CacheCounters, url: str, prefix: str, timeout_ms: int, signer: EntrySigner | None = None
    ) -> None:
        self.counters = counters
        self.prefix = prefix
        self.pipe = RedisPipe.shared(url, timeout_ms / 1000)
        self.signer = signer
        # Entries decoded lately, by their stored bytes, with the name they were read under: a
        # hot entry is decompressed and checked once per process, not once per hit (the bytes
        # are still read from Redis, so an entry replaced or expired there is never served
        # from here; the same bytes under another name are checked again).
        self._decoded: collections.OrderedDict[bytes, tuple[str, Entry]] = collections.OrderedDict()
        self._decoded_bytes = 0
        # Hits not yet told to their tenants' shares: (share, entry name), sent together (`touch`).
        self._touches: dict[tuple[str, str], None] = {}
        self._touching: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def _key(self, route: str, key: str) -> str:
        return f"{self.prefix}:cache:{route}:{key}"

    def fetch(self, route: str, key: str, max_entry_bytes: int = MAX_ENTRY_BYTES) -> asyncio.Future[Any]:
        """Asks for an entry, at most one byte more than its route's could be (`value_cap`) (no
        task; written with the next command sent now, e.g. admission's script, or at the end of
        this loop pass); `get` reads the answer."""
        cap = str(value_cap(max_entry_bytes))
        return self.pipe.send(encode(("GETRANGE", self._key(route, key), "0", cap)), soon=True)

    async def get(
        self, route: str, key: str, max_entry_bytes: int = MAX_ENTRY_BYTES, fetching: asyncio.Future[Any] | None = None
    ) -> Entry | None:
        try:
            data = await (fetching if fetching is not None else self.fetch(route, key, max_entry_bytes))
        except redis_client.errors() as e:
            self.counters.errors += 1
            log.warning("response cache: Redis unavailable (%s); serving a miss", type(e).__name__)
            return None
        if not isinstance(data, bytes) or not data:
            return None  # no such key (`GETRANGE` answers it empty; a reply of another type cannot come)
        name = self._key(route, key)
        if len(data) > value_cap(max_entry_bytes):  # (only its first bytes were read)
            self.counters.invalid += 1
            log.warning("response cache: a value larger than its route's entries for %s was ignored and deleted", route)
            self._delete(name)
            return None
        if (known := self._decoded.get(data)) is not None and known[0] == name:
            self._decoded.move_to_end(data)
            return known[1]
        try:
            if self.signer is None:
                entry = Entry.loads(unsigned(data))
            elif (signed := self.signer.check(name, data)) is None:
                raise InvalidEntry("cache entry: unsigned or badly signed")
            else:
                entry = Entry.loads(signed)
            if entry.key != key:
                raise InvalidEntry("cache entry: stored for another key")
        except InvalidEntry as e:
            self.counters.invalid += 1
            log.warning("response cache: an invalid entry for route %s was ignored and deleted (%s)", route, e)
            self._delete(name)
            return None
        except ValueError:
            self.counters.corrupt += 1
            log.warning("response cache: a corrupt entry for route %s was ignored and deleted", route)
            self._delete(name)
            return None
        self._remember(data, name, entry)
        return entry

    def _delete(self, name: str) -> None:
        """Deletes a value that is no entry (off the request path). One written over it since
        the read may go with it: a miss more, never a wrong answer."""
        self.pipe.send(encode(("UNLINK", name)), soon=True).add_done_callback(_retrieved)

    def _remember(self, data: bytes, name: str, entry: Entry) -> None:
        size = len(data) + entry.size()
        if size > DECODED_MAX_BYTES // 16:
            return  # a large entry would crowd out many small hot ones
        self._decoded[data] = (name, entry)
        self._decoded_bytes += size
        while self._decoded_bytes > DECODED_MAX_BYTES:
            old, (_, gone) = self._decoded.popitem(last=False)
            self._decoded_bytes -= len(old) + gone.size()

    def owned(self, owner: str) -> str:
        return owned_set(self.prefix, owner)

    def touch(self, route: str, key: str, tenant: str) -> None:
        """A hit: the entry becomes its tenant's most recently used, so that past `max_entries`
        the tenant's unused entries go before it. Not on the request path: touches are sent
        together, one script for up to `TOUCH_MAX` of them, within `TOUCH_EVERY_S`."""
        if not tenant:
            return  # written without a share (no keys): nothing bounds it but Redis's memory
        self._touches[(share_set(self.prefix, route, tenant), self._key(route, key))] = None
        if len(self._touches) >= TOUCH_MAX:
            self._send_touches()
        elif self._touching is None:
            self._touching = asyncio.get_running_loop().call_later(TOUCH_EVERY_S, self._send_touches)

    def _send_touches(self) -> None:
        if self._touching is not None:
            self._touching.cancel()
            self._touching = None
        pending, self._touches = list(self._touches), {}
        if not pending or len(self._sending) >= TOUCH_SENDING_MAX:
            return  # Redis is slow: these entries keep their older place, memory stays bounded
        task = asyncio.get_running_loop().create_task(self._touch([s for s, _ in pending], [n for _, n in pending]))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _touch(self, shares: list[str], names: list[str]) -> None:
        try:
            await self.pipe.eval(_TOUCH, shares, names, soon=True)
        except redis_client.errors() as e:  # lost: those entries keep their older place
            self.counters.errors += 1
            log.warning("response cache: Redis unavailable (%s); hits not recorded", type(e).__name__)

    async def put(
        self,
        route: str,
        key: str,
        entry: Entry,
        keep_s: float,
        bounds: tuple[int, int],
        owner: str | None = None,
        tenant: str = "",
    ) -> bool:
        """A tenant holds at most `max_entries` of a route (its least recently used go first; without
        keys, one tenant: the entry is just written); the bytes of the whole cache are bounded
        by Redis's own `maxmemory` policy."""
        try:
            px = max(1, int(keep_s * 1000))
            name = self._key(route, key)
            value = entry.dumps() if self.signer is None else self.signer.sign(name, entry.dumps())
            if not tenant:  # (a request without a key has no managed `owner` either)
                await self.pipe.call("SET", name, value, "PX", px, soon=True)  # off the path
                return True
            keys = [name, share_set(self.prefix, route, tenant)]
            args: list[Any] = [value, px, bounds[0]]
            if owner is not None:
                keys += [self.owned(owner), owner_shares(self.prefix, owner), forgot_claim(self.prefix, owner, ENTRY)]
                args.append(ENTRY + keys[0])
            evicted = await self.pipe.eval(_PUT, keys, args, soon=True)  # off the path
        except redis_client.errors() as e:
            self.counters.errors += 1
            log.warning("response cache: Redis unavailable (%s); answer not stored", type(e).__name__)
            return False
        if isinstance(evicted, int) and evicted > 0:
            self.counters.evictions += evicted
            self.counters.evicted_capped += evicted
        return bool(evicted != -1)

    async def forget(self, owners: Collection[str]) -> set[str]:
        """Deletes the entries these keys' requests wrote (their `owned` sets) and strikes their
        names from the shares they counted against; the exact keys. Every instance calls it on
        seeing the key end: the first to claim the key deletes (and counts), page by page; the
        others only read the names, to drop what they hold in memory (`forget_owned`)."""
        dropped: set[str] = set()
        self._decoded.clear()  # a memo of decoded entries: it may hold theirs
        for owner in owners:
            async for gone, names in forget_owned(self.pipe, self.prefix, owner, ENTRY):
                self.counters.evicted_revoked += gone
                dropped.update(n.decode().rpartition(":")[2] for n in names)
        return dropped

    async def close(self) -> None:
        self._send_touches()
        if self._sending:
            await asyncio.wait(self._sending, timeout=2)
        await self.pipe.close()


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """A reply nobody waits for: its error (Redis unreachable) read, so never logged as lost."""
    if not fut.cancelled():
        fut.exception()


async def forget_owned(pipe: RedisPipe, prefix: str, owner: str, kind: str) -> AsyncIterator[tuple[int, list[bytes]]]:
    """What an ended key's requests stored of `kind` (ENTRY or RECORD), a page at a time: (how
    many this call deleted, their names). One instance deletes: the first whose `SET NX`
    claims the key runs `FORGET` a page at a time, Redis serving others between pages; every
    other instance (each sees the key end) reads the same pages with plain `ZRANGE`s and
    deletes nothing. An instance that stops mid-way leaves the rest to expire with their ttl."""
    owned, shares, claim = owned_set(prefix, owner), owner_shares(prefix, owner), forgot_claim(prefix, owner, kind)
    mine = await pipe.call("SET", claim, b"1", "NX", "PX", FORGOTTEN_KEEP_MS) is not None
    start = 0
    while True:
        stop = start + FORGET_PAGE - 1
        if mine:
            deleted, size, page = await pipe.eval(FORGET, [owned, shares], [kind, start, stop, FORGOTTEN_KEEP_MS])
            yield int(deleted), [n for n in page if isinstance(n, bytes)]
        else:
            members = await pipe.call("ZRANGE", owned, start, stop)
            size = len(members)
            yield 0, [m[2:] for m in members if isinstance(m, bytes) and m.startswith(kind.encode())]
        if size < FORGET_PAGE:
            return
        start += FORGET_PAGE
