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


class KeyMemo:
    """The keys of request bodies seen lately, by their exact bytes, route and tenant.

    A hit is a body sent before; parsing, canonicalising and hashing it again cost about as
    much as the rest of the cache's work on a hit. Matching the raw bytes (a hash and a
    compare) gives the same key `cache_key` would, so entries written before and by other
    instances are found alike. Bounded by entries and by the bytes of the bodies it holds;
    a body above `max_body` is keyed afresh every time (it would crowd out many small ones).
    """

    def __init__(self, max_entries: int = 4096, max_bytes: int = 8 * 1024 * 1024, max_body: int = 256 * 1024) -> None:
        self.max_entries, self.max_bytes, self.max_body = max_entries, max_bytes, max_body
        self._keys: collections.OrderedDict[tuple[str, str, bytes], tuple[str, bool]] = collections.OrderedDict()
        self._bytes = 0

    def key(self, body: bytes, route: str, tenant: str) -> tuple[str, bool] | None:
        """(the entry's key, whether the request is deterministic); None when `body` is not a
        JSON object (the core parsed it already: unreachable in practice)."""
        memo = (route, tenant, body)
        if (got := self._keys.get(memo)) is not None:
            self._keys.move_to_end(memo)
            return got
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        got = (cache_key(obj, route, tenant), is_deterministic(obj))
        if len(body) <= self.max_body:
            self._keys[memo] = got
            self._bytes += len(body)
            while len(self._keys) > self.max_entries or self._bytes > self.max_bytes:
                (_, _, old), _ = self._keys.popitem(last=False)
                self._bytes -= len(old)
        return got
