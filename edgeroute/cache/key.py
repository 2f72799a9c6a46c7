"""What identifies a cached answer: a canonical hash of everything that determines it.

The key covers the route the request resolved to (not the name the client asked for, so
an alias and its target share answers only when they resolve alike), the messages, tools,
tool choice, response format, sampling parameters and seed, canonicalised (keys sorted,
whitespace gone), and the tenant scope. Fields that cannot change the answer's content
(`stream`, `stream_options`, `user`, `metadata`, `store`) are left out, so a streamed and a
non-streamed request share an entry.
"""

from __future__ import annotations

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
