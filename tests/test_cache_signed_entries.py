"""Entries in the shared cache store (Redis) are signed, and a value that is no entry is deleted.

The read checks (test_cache_planted_entries.py) catch an entry copied under another key or
with odd fields, but a forged entry whose fields agree (the request's key and tenant, a
well-formed completion saying what its writer wants) was served to the client as its answer.
With `cache.signing_key` (or `learning.experiment_salt`), each value carries an HMAC of its
name and bytes; an unsigned or badly signed one is a miss. A value that is no entry was left
in Redis to be read (and warned about) again on every request; it is now deleted.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Any

import numpy as np
import openai
import orjson
import redis.asyncio as aioredis

from edgeroute.cache.semantic import guards
from edgeroute.cache.shared_index import SharedIndexes, encode
from edgeroute.cache.signing import MAGIC, signer
from edgeroute.cache.stores import CacheCounters
from tests.conftest import eventually
from tests.metrics_support import scrape
from tests.test_cache import MSG, cached, calls, stored
from tests.test_cache_planted_entries import redis_prefix  # noqa: F401 (the fixture)
from tests.test_cost_support import REDIS_URL, require_redis

SIGNING_KEY = "cache-signing-secret-0123456789"
FORGED = "FORGED ANSWER from whoever can write to Redis"
_SIGNATURE = len(MAGIC) + 32
ONLY_CACHED = {"x-edgeroute-cache": "only-if-cached"}


def _forged(genuine: bytes) -> bytes:
    """The genuine entry's header (its key, tenant, date and cost, all consistent) with a
    completion of the forger's, packed as edgeroute packs an entry, without a signature."""
    data = genuine[_SIGNATURE:] if genuine.startswith(MAGIC) else genuine
    head, _, body = zlib.decompress(data).partition(b"\n")
    completion = orjson.loads(body)
    completion["choices"][0]["message"]["content"] = FORGED
    return zlib.compress(head + b"\n" + orjson.dumps(completion), 1)


async def _answered(
    start_upstream: Any,
    start_proxy: Any,
    redis: tuple[aioredis.Redis, str],
    **extra: Any,
) -> tuple[Any, Any, bytes, bytes]:
    """A proxy sharing its cache through Redis, once it has stored bob's answer: (upstream,
    proxy, the entry's name in Redis, what is stored there)."""
    r, prefix = redis
    up = await start_upstream(record=True)
    keys = {"bob": {"token": "tok-bob"}, "root": {"token": "tok-root", "role": "admin"}}
    cfg = cached({"a": up}) | {"keys": keys, "shared_state": {"redis_url": REDIS_URL, "prefix": prefix}} | extra
    proxy = await start_proxy(cfg)
    assert (await _ask(proxy))[:2] == (200, "miss")
    await stored(proxy)
    (name,) = [k async for k in r.scan_iter(f"{prefix}:cache:m:*")]
    return up, proxy, name, await r.get(name)


async def _ask(proxy: Any, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, x-edgeroute-cache, the answer's text) as the openai SDK gets them."""
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-bob", max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, temperature=0, extra_headers=headers
        )
    except openai.APIStatusError as e:
        return e.status_code, e.response.headers.get("x-edgeroute-cache", ""), ""
    finally:
        await client.close()
    return raw.status_code, raw.headers.get("x-edgeroute-cache", ""), raw.parse().choices[0].message.content or ""


async def test_a_forged_consistent_entry_is_a_miss_when_entries_are_signed(
    start_upstream: Any,
    start_proxy: Any,
    redis_prefix: tuple[aioredis.Redis, str],  # noqa: F811
    caplog: Any,
) -> None:
    r = redis_prefix[0]
    up, proxy, name, genuine = await _answered(
        start_upstream, start_proxy, redis_prefix, cache={"signing_key": SIGNING_KEY}
    )
    assert (await _ask(proxy))[:2] == (200, "hit"), "a signed entry is served"

    forged = _forged(genuine)
    planted = {
        "a forged entry, unsigned": forged,
        "a forged entry with a made-up signature": MAGIC + os.urandom(32) + forged,
        "a forged entry under the genuine one's signature": genuine[:_SIGNATURE] + forged,
    }
    caplog.set_level(logging.WARNING, logger="edgeroute.cache")
    for what, value in planted.items():
        await r.set(name, value, px=60_000)
        paid = calls(up)
        status, label, text = await _ask(proxy)
        assert (status, label) == (200, "miss"), f"{what}: served as {label}"
        assert FORGED not in text and calls(up) == paid + 1, what
        await stored(proxy)  # the real answer stored over it
    assert genuine.startswith(MAGIC), "what is stored is signed"
    metrics = await scrape(proxy.url, "tok-root")
    assert metrics.value("edgeroute_cache_store_errors_total", kind="invalid") == len(planted)
    assert (await _ask(proxy))[:2] == (200, "hit"), "the real answer, stored again signed, is served"
    assert "unsigned or badly signed" in caplog.text and FORGED not in caplog.text, "warned, without the entry"

    # A forged entry read with only-if-cached (nothing asked upstream, nothing stored) is gone after.
    await r.set(name, forged, px=60_000)
    assert (await _ask(proxy, ONLY_CACHED))[0] == 504

    async def deleted() -> bool:
        return not await r.exists(name)

    await eventually(deleted, "the forged entry deleted from Redis")


async def test_without_a_secret_a_malformed_entry_is_a_miss_and_is_deleted(
    start_upstream: Any,
    start_proxy: Any,
    redis_prefix: tuple[aioredis.Redis, str],  # noqa: F811
) -> None:
    r = redis_prefix[0]
    _, proxy, name, genuine = await _answered(start_upstream, start_proxy, redis_prefix)
    assert not genuine.startswith(MAGIC), "no secret configured: not signed"
    for value in (b"garbage, not an entry", genuine[: len(genuine) // 2]):
        await r.set(name, value, px=60_000)
        assert (await _ask(proxy, ONLY_CACHED))[0] == 504

        async def deleted() -> bool:
            return not await r.exists(name)

        await eventually(deleted, "the malformed entry deleted from Redis")


async def test_the_experiment_salt_signs_entries_when_no_signing_key_is_set(
    start_upstream: Any,
    start_proxy: Any,
    redis_prefix: tuple[aioredis.Redis, str],  # noqa: F811
) -> None:
    r = redis_prefix[0]
    salted = {"experiment_salt": "salt-0123456789abcdef"}
    _, proxy, name, genuine = await _answered(start_upstream, start_proxy, redis_prefix, learning=salted)
    assert genuine.startswith(MAGIC)
    await r.set(name, _forged(genuine), px=60_000)
    status, label, text = await _ask(proxy)
    assert (status, label) == (200, "miss") and FORGED not in text


async def test_a_planted_semantic_record_is_skipped_when_records_are_signed() -> None:
    """A record of the shared semantic index points paraphrases at an exact entry: a forged one
    (unsigned, or signed for another route's stream) could send a tenant's lookups to another of
    its own answers. Only records signed for their stream are indexed; the others are counted."""
    url, prefix = require_redis(), "edgeroute-test-" + os.urandom(4).hex()
    sign = signer(SIGNING_KEY, None)
    counters = CacheCounters()
    writer, reader = (
        SharedIndexes(url, prefix, 2000, CacheCounters(), sign),
        SharedIndexes(url, prefix, 2000, counters, sign),
    )
    r = aioredis.Redis.from_url(url)
    vector, g = np.ones(8, dtype=np.float32), guards(MSG[0]["content"])
    indexed: list[str] = []
    try:
        await writer.publish("m", None, encode("o", "genuine", "ctx", g, vector, "key:bob"), 600, 20, None, "key:bob")
        forged = encode("o", "forged", "ctx", g, vector, "key:bob")
        await r.xadd(reader.stream("m", None), {"r": forged})
        assert sign is not None
        await r.xadd(reader.stream("m", None), {"r": sign.sign(reader.stream("other", None), forged)})

        async def run(fn: Any, arg: Any) -> None:
            fn(arg)

        await reader.follow("m", None, lambda records: indexed.extend(k for _, _, _, k, _ in records), run)
        assert indexed == ["genuine"] and counters.invalid == 2
    finally:
        await writer.close()
        await reader.close()
        await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")] or [f"{prefix}:none"])
        await r.aclose()
