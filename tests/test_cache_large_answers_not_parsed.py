"""An answer too large to store is turned away by its size, before it is parsed.

To be stored, an answer is read as JSON and checked (a finished completion, or a list of
embeddings), on the event loop; its size against `max_entry_bytes` was checked after that.
An embeddings answer of 1,000 inputs of 1,536 dimensions (28 MiB, well past the 1 MiB
default) was parsed twice, 0.65 s of the loop that every other request waits on, on each
such request to a caching model, then not stored.
"""

from __future__ import annotations

import random
import time

import orjson

from edgeroute.cache.service import Directive, Plan, ResponseCache
from edgeroute.cache.settings import RouteCache
from edgeroute.cache.stores import CacheCounters, MemoryStore


def _embeddings(inputs: int, dims: int) -> bytes:
    data = [
        {"object": "embedding", "index": i, "embedding": [random.random() for _ in range(dims)]} for i in range(inputs)
    ]
    return orjson.dumps(
        {"object": "list", "data": data, "model": "e", "usage": {"prompt_tokens": 5, "total_tokens": 5}}
    )


async def test_an_answer_past_max_entry_bytes_is_not_parsed_to_be_dropped() -> None:
    counters = CacheCounters()
    cache = ResponseCache(MemoryStore(counters), counters)
    plan = Plan("m", "k" * 40, RouteCache(), Directive(), True, kind="embeddings")
    body = _embeddings(1000, 1536)
    assert len(body) > 20 * plan.settings.max_entry_bytes
    started = time.perf_counter()
    cache.save_json(plan, body, ("d-e", "p/e"), 0.01)
    held = time.perf_counter() - started
    assert counters.too_large == 1 and counters.stores == 0
    assert held < 0.05, f"the event loop was held {held * 1000:.0f} ms for an answer that is not stored"

    small = _embeddings(2, 8)  # one within the bound is still stored
    cache.save_json(plan, small, ("d-e", "p/e"), 0.01)
    await cache.close()
    assert counters.stores == 1 and (await cache.store.get("m", "k" * 40)) is not None
