"""The semantic cache shared by instances through Redis: a paraphrase asked of instance B is
answered from what instance A stored; near misses still miss; Redis down is a miss."""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from typing import Any

import numpy as np
import openai
import orjson
import pytest

from edgeroute.cache.semantic import guards
from edgeroute.cache.service import CACHE
from edgeroute.cache.shared_index import OtherVersion, decode, encode
from tests.conftest import simple_config
from tests.test_cost_support import RedisServer

SYSTEM = {"role": "system", "content": "You are a support assistant."}


def _config(up: Any, url: str, prefix: str) -> dict[str, Any]:
    cfg = simple_config({"a": up})
    cfg["models"]["m"]["cache"] = {"ttl": 60, "mode": "semantic"}
    cfg["shared_state"] = {"redis_url": url, "prefix": prefix, "timeout_ms": 1000}
    return cfg


async def _two_instances(start_upstream, start_proxy, redis_server: RedisServer) -> Any:  # type: ignore[no-untyped-def]
    """A recording upstream, a key prefix, and two proxies (each with its SDK client) sharing a Redis."""
    up = await start_upstream(record=True)
    prefix = f"edgeroute-sem-{os.urandom(4).hex()}"
    instances = []
    for _ in range(2):
        proxy = await start_proxy(_config(up, redis_server.url, prefix))
        instances.append((proxy, openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)))
    return up, prefix, *instances


async def _ask(client: openai.AsyncOpenAI, text: str) -> Any:
    msgs: Any = [SYSTEM, {"role": "user", "content": text}]
    return await client.chat.completions.with_raw_response.create(model="m", messages=msgs, temperature=0)


async def _until(check: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def _records(url: str, prefix: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        return sum([await client.xlen(k) async for k in client.scan_iter(match=f"{prefix}:cache:sem:*")])
    finally:
        await client.aclose()


async def test_a_paraphrase_on_one_instance_hits_what_another_stored(
    start_upstream, start_proxy, redis_server: RedisServer
) -> None:  # type: ignore[no-untyped-def]
    up, prefix, (a, ca), (b, cb) = await _two_instances(start_upstream, start_proxy, redis_server)

    first = await _ask(ca, "How do I reset my password?")
    assert first.headers["x-edgeroute-cache"] == "miss"

    async def shared() -> bool:
        return await _records(redis_server.url, prefix) == 1

    await _until(shared, "A's entry was shared")
    # B has never seen the question: its first lookup reads the shared records, then matches.
    para = await _ask(cb, "How can I reset my password?")
    assert para.headers["x-edgeroute-cache"] == "hit"
    assert para.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert len(up.options.requests) == 1
    # Near misses stay misses on B too (another number; a negation).
    for text in ("How do I reset my 2 passwords?", "How do I not reset my password?"):
        assert (await _ask(cb, text)).headers["x-edgeroute-cache"] == "miss", text
    calls = len(up.options.requests)
    assert calls == 3

    # B follows the stream now: a question A answers later reaches B's index as it is stored.
    index_b = b.app[CACHE]._indexes[("m", None)]

    async def own_indexed() -> bool:  # B indexes its two misses when their answers are stored,
        return len(index_b) == 3  # after they were sent: under load, later than the answers

    await _until(own_indexed, "B indexed its own two misses")
    before = len(index_b)
    second = await _ask(ca, "What are your opening hours on weekends?")
    assert second.headers["x-edgeroute-cache"] == "miss"

    async def followed() -> bool:
        return len(index_b) > before

    await _until(followed, "B indexed A's new entry")
    hit = await _ask(cb, "What are your opening hours at weekends?")
    # What B held and counted, should it miss: the cause of a miss under load is in these.
    seen = (b.app[CACHE].counters, list(index_b._meta.values()))
    assert hit.headers["x-edgeroute-cache"] == "hit" and len(up.options.requests) == calls + 1, seen
    # Each instance indexes every shared record once: its own when storing, the others' from the stream.
    index_a = a.app[CACHE]._indexes[("m", None)]

    async def settled() -> bool:
        return await _records(redis_server.url, prefix) == 4 and len(index_a) == len(index_b) == 4

    await _until(settled, "both instances hold the four shared records")
    await asyncio.sleep(0.3)
    assert len(index_a) == len(index_b) == 4


async def test_redis_down_makes_shared_semantic_lookups_misses_not_errors(
    start_upstream, start_proxy, redis_server: RedisServer
) -> None:  # type: ignore[no-untyped-def]
    _, prefix, (_, ca), (b, cb) = await _two_instances(start_upstream, start_proxy, redis_server)
    await _ask(ca, "How do I reset my password?")

    async def shared() -> bool:
        return await _records(redis_server.url, prefix) == 1

    await _until(shared, "A's entry was shared")
    assert (await _ask(cb, "How can I reset my password?")).headers["x-edgeroute-cache"] == "hit"
    redis_server.stop()
    # B still holds the record in its index, but the answer lives in Redis: a miss, answered upstream.
    raw = await _ask(cb, "How could I reset my password?")
    assert raw.headers["x-edgeroute-cache"] == "miss" and raw.http_response.status_code == 200
    assert b.app[CACHE].counters.errors >= 1


def test_records_round_trip_and_anything_else_is_refused() -> None:
    g = guards("How do I reset the password of Alice's 2 accounts?")
    vector = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    vector /= np.linalg.norm(vector)
    origin, key, context, got, back, tenant = decode(encode("o", "k", "c", g, vector, "team:a"))
    assert (origin, key, context, got, tenant) == ("o", "k", "c", g, "team:a")
    assert np.allclose(back, vector, atol=1e-3)
    good = encode("o", "k", "c", g, vector, "team:a")
    head, _, vec = zlib.decompress(good).partition(b"\n")
    fields = orjson.loads(head)
    bad_records = [
        b"",
        b"not compressed",
        zlib.compress(b"[1]\n"),
        zlib.compress(head + b"\n" + vec[:-2]),  # a vector shorter than it says
        zlib.compress(orjson.dumps([1, *fields[1:]]) + b"\n" + vec),  # another version
        zlib.compress(orjson.dumps([*fields[:4], "zz", *fields[5:]]) + b"\n" + vec),  # a digest not in hex
        zlib.compress(orjson.dumps([*fields[:4], "ab", *fields[5:]]) + b"\n" + vec),  # a digest too short
        zlib.compress(orjson.dumps([*fields[:6], "ff" * 33, *fields[7:]]) + b"\n" + vec),  # no connector 255
        zlib.compress(orjson.dumps([*fields[:6], "00" * 34, *fields[7:]]) + b"\n" + vec),  # not whole spans
        zlib.compress(head + b"\n" + np.full(256, np.inf, dtype=np.float16).tobytes()),
        zlib.compress(orjson.dumps([*fields[:8], "zz", *fields[9:]]) + b"\n" + vec),  # a shape not in hex
        zlib.compress(orjson.dumps([*fields[:9], 7]) + b"\n" + vec),  # a tenant that is not a string
        zlib.compress(orjson.dumps(fields[:9]) + b"\n" + vec),  # no tenant
    ]
    for bad in bad_records:
        with pytest.raises(ValueError):
            decode(bad)
    # A rolling upgrade: a record of the release before is another version, not a corrupt one.
    with pytest.raises(OtherVersion):
        decode(zlib.compress(orjson.dumps([1, *fields[1:]]) + b"\n" + vec))
