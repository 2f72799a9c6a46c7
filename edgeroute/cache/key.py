"""What identifies a cached answer: a canonical hash of everything that determines it.

The key covers the route the request resolved to (not the name the client asked for, so
an alias and its target share answers only when they resolve alike), the messages, tools,
tool choice, response format, sampling parameters and seed, canonicalised (keys sorted,
whitespace gone), and the tenant scope. Fields that cannot change the answer's content
(`stream`, `stream_options`, `user`, `metadata`, `store`) are left out, so a streamed and a
non-streamed request share an entry.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import orjson

_NOT_IN_KEY = frozenset({"model", "stream", "stream_options", "user", "metadata", "store"})


def is_deterministic(body: dict[str, Any]) -> bool:
    """A request whose answer a replay does not change: greedy sampling or a fixed seed."""
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0:
        return True
    return body.get("seed") is not None


def cache_key(body: dict[str, Any], route: str, tenant: str) -> str:
    """The entry's key: a hash of the route, the tenant and the answer-determining fields."""
    fields = {k: v for k, v in body.items() if k not in _NOT_IN_KEY}
    canonical = orjson.dumps([route, tenant, fields], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=20).hexdigest()


_TAIL = 64  # bytes of a body's end that, with its length and middle, find where it is remembered
_MIDDLE = 32
_SHARED = 8  # bodies remembered under one such spot: a ninth sharing it pushes out the oldest


class KeyMemo:
    """The keys of request bodies seen lately, by their exact bytes, route and tenant.

    A hit is a body sent before; parsing, canonicalising and hashing it again cost about as
    much as the rest of the cache's work on a hit. Matching the raw bytes (a compare) gives
    the same key `cache_key` would, so entries written before and by other instances are
    found alike. A body is looked for by its length, its last bytes and a few in its middle
    (a chat body's last turn, and its history), then compared whole: a dictionary keyed by
    the whole body hashed all of it on every hit (SipHash, ~2.8 instructions a byte: 20.7k
    of a hit's ~550k on the event loop for the bench's 7.3 KB body) and compared it twice.
    Bodies sharing a spot (same length, end and middle: a template with one figure changed)
    are compared in turn, at most `_SHARED` of them, so crafted ones make a spot forget
    sooner, never search longer. Bounded by entries and by the bytes of the bodies it
    holds; a body above `max_body` is keyed afresh every time (it would crowd out many
    small ones).
    """

    def __init__(self, max_entries: int = 4096, max_bytes: int = 8 * 1024 * 1024, max_body: int = 256 * 1024) -> None:
        self.max_entries, self.max_bytes, self.max_body = max_entries, max_bytes, max_body
        # (route, tenant, length, end, middle): [(body, key, deterministic), ...], oldest first
        self._spots: collections.OrderedDict[tuple[str, str, int, bytes, bytes], list[tuple[bytes, str, bool]]]
        self._spots = collections.OrderedDict()
        self._entries = self._bytes = 0

    def key(self, body: bytes, route: str, tenant: str) -> tuple[str, bool] | None:
        """(the entry's key, whether the request is deterministic); None when `body` is not a
        JSON object (the core parsed it already: unreachable in practice)."""
        n = len(body)
        half = n // 2
        spot = (route, tenant, n, body[-_TAIL:], body[half : half + _MIDDLE])
        if (shared := self._spots.get(spot)) is not None:
            for seen, key, deterministic in shared:
                if seen == body:
                    self._spots.move_to_end(spot)
                    return key, deterministic
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        key, deterministic = cache_key(obj, route, tenant), is_deterministic(obj)
        if n <= self.max_body:
            self._remember(spot, shared, (body, key, deterministic))
        return key, deterministic

    def _remember(
        self,
        spot: tuple[str, str, int, bytes, bytes],
        shared: list[tuple[bytes, str, bool]] | None,
        got: tuple[bytes, str, bool],
    ) -> None:
        if shared is None:
            shared = self._spots[spot] = []
        else:
            self._spots.move_to_end(spot)
        shared.append(got)
        self._entries += 1
        self._bytes += len(got[0])
        if len(shared) > _SHARED:
            self._forget([shared.pop(0)])
        while self._entries > self.max_entries or self._bytes > self.max_bytes:
            _, oldest = self._spots.popitem(last=False)
            self._forget(oldest)

    def _forget(self, gone: list[tuple[bytes, str, bool]]) -> None:
        self._entries -= len(gone)
        self._bytes -= sum(len(body) for body, _, _ in gone)

    def bodies(self) -> list[bytes]:
        """The bodies remembered now, least recently used spot first (for tests)."""
        return [body for shared in self._spots.values() for body, _, _ in shared]
