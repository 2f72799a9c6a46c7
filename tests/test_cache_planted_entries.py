"""Entries planted in or corrupted by the shared cache store (Redis) are misses, never answers.

An entry read from Redis was checked for its format only: one copied under another request's
key (another tenant's, another model's, an embeddings answer under a chat request's key) was
served as that request's answer, one dated in the future was fresh for ever, and its cost and
writer were taken as they came (a saving of 1e300 dollars in the ledger, a megabyte of
"writer" in the request log). Now an entry names the key it was stored under, and a read
checks it, its date, its cost, its writer and that its body is the endpoint's kind of answer:
anything else is a miss, counted in `edgeroute_cache_store_errors_total{kind="invalid"}`.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from edgeroute.cache.entry import Entry
from tests.metrics_support import scrape
from tests.test_cache import MSG, cached, calls, stored
from tests.test_cost_support import REDIS_URL, require_redis

_EMBEDDINGS = orjson.dumps(
    {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.5]}], "model": "e"}
)


def _raw(data: bytes) -> tuple[list[Any], bytes]:
    head, _, body = zlib.decompress(data).partition(b"\n")
    return orjson.loads(head), body


def _pack(head: list[Any], body: bytes) -> bytes:
    return zlib.compress(orjson.dumps(head) + b"\n" + body, 1)


@pytest.fixture
async def redis_prefix() -> AsyncIterator[tuple[aioredis.Redis, str]]:
    r = aioredis.Redis.from_url(require_redis())
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    yield r, prefix
    await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")] or [f"{prefix}:none"])
    await r.aclose()


async def test_a_planted_or_corrupted_entry_is_a_counted_miss(
    start_upstream: Any, start_proxy: Any, redis_prefix: tuple[aioredis.Redis, str]
) -> None:
    r, prefix = redis_prefix
    up = await start_upstream(record=True)
    keys = {
        "alice": {"token": "tok-alice"},
        "bob": {"token": "tok-bob"},
        "root": {"token": "tok-root", "role": "admin"},
    }
    cfg = cached({"a": up}) | {"keys": keys, "shared_state": {"redis_url": REDIS_URL, "prefix": prefix}}
    proxy = await start_proxy(cfg)
    url = proxy.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as s:

        async def ask(token: str, content: str) -> tuple[int, str, bytes]:
            body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0})
            headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
            async with s.post(url, data=body, headers=headers) as got:
                return got.status, got.headers.get("x-edgeroute-cache", ""), await got.read()

        # Alice's answer to her question, and Bob's to his: two entries.
        assert (await ask("tok-alice", "alice's secret question"))[1] == "miss"
        await stored(proxy)
        (alices,) = [k async for k in r.scan_iter(f"{prefix}:cache:m:*")]
        assert (await ask("tok-bob", MSG[0]["content"]))[1] == "miss"
        await stored(proxy)
        (bobs,) = [k async for k in r.scan_iter(f"{prefix}:cache:m:*") if k != alices]
        assert (await ask("tok-bob", MSG[0]["content"]))[1] == "hit", "a real entry is served"
        genuine = await r.get(bobs)
        head, body = _raw(genuine)
        now = time.time()

        alice_head, alice_body = _raw(await r.get(alices))
        planted: dict[str, bytes] = {
            "alice's entry copied under bob's key": await r.get(alices),
            # (what a shared semantic record pointing bob's lookups at alice's entry would find)
            "alice's entry renamed to bob's key": _pack([*alice_head[:7], *head[7:8], *alice_head[8:]], alice_body),
            "an embeddings answer under a chat key": _pack(head, _EMBEDDINGS),
            "dated a day ahead (fresh for ever)": _pack([*head[:2], now + 86_400, *head[3:]], body),
            "a cost of 1e300 dollars saved": _pack([*head[:3], 1e300, *head[4:]], body),
            "a negative cost": _pack([*head[:3], -5.0, *head[4:]], body),
            "a megabyte of writer": _pack([*head[:5], "w" * 1_000_000, *head[6:]], body),
            "a chat completion with no choices": _pack(
                head, orjson.dumps({"object": "chat.completion", "choices": []})
            ),
            "usage that is not an object": _pack(head, body[:-1] + b',"usage":"lots"}'),
            "a truncated one": genuine[: len(genuine) // 2],
            "a version from the future": _pack([99, *head[1:]], body),
            "the writer a number": _pack([*head[:5], 7, *head[6:]], body),
        }
        for name, data in planted.items():
            await r.set(bobs, data, px=60_000)
            paid = calls(up)
            status, label, answer = await ask("tok-bob", MSG[0]["content"])
            assert (status, label) == (200, "miss"), f"{name}: served as {label} ({status})"
            assert calls(up) == paid + 1, name
            assert b"alice" not in answer
            await stored(proxy)  # (the real answer stored over it)
        metrics = await scrape(proxy.url, "tok-root")
        invalid = metrics.value("edgeroute_cache_store_errors_total", kind="invalid") or 0
        corrupt = metrics.value("edgeroute_cache_store_errors_total", kind="corrupt") or 0
        assert (invalid, corrupt) == (len(planted) - 2, 2), "each counted once: the truncated and unknown version"
        # Bob's own answer, stored again over the last planted one, is served.
        assert (await ask("tok-bob", MSG[0]["content"]))[1] == "hit"
        # What is written names its key and its tenant.
        (entry_head, _) = _raw(await r.get(bobs))
        assert entry_head[-2:] == [bobs.decode().rpartition(":")[2], "key:bob"]


def test_an_entry_keeps_its_key_and_tenant_and_refuses_what_edgeroute_does_not_write() -> None:
    from edgeroute.cache.entry import InvalidEntry  # (new with the check)

    body = orjson.dumps(
        {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ]}
    )  # fmt: skip
    entry = Entry(body, "d", time.time(), 0.01, "p/m", "req-1", key="k1", tenant="key:alice")
    assert Entry.loads(entry.dumps()) == entry
    head, _ = _raw(entry.dumps())
    for bad in (
        [*head[:2], 1e300, *head[3:]],  # dated far ahead
        [*head[:3], -0.01, *head[4:]],
        [*head[:3], True, *head[4:]],  # a bool is not a cost
        [*head[:6], "yes", *head[7:]],  # fallback not a bool
        [*head[:7], "k" * 10_000, *head[8:]],
        [*head[:8], None],
    ):
        with pytest.raises(InvalidEntry):
            Entry.loads(_pack(bad, body))
    for broken in (_pack(head[:-1], body), _pack({"v": 5}, body), entry.dumps()[:-3]):  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            Entry.loads(broken)


def test_a_providers_own_usage_words_and_a_clock_a_little_ahead_keep_an_entry() -> None:
    """Perplexity's usage holds `"search_context_size": "low"`: its answers were never cached.
    An entry dated a little ahead (another instance's clock) was fresh for its ttl and the skew."""
    from edgeroute.cache.entry import storable

    answer = {"id": "x", "object": "chat.completion", "created": 1, "model": "sonar", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ]}  # fmt: skip
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "search_context_size": "low"}
    assert storable(answer | {"usage": usage})
    assert not storable(answer | {"usage": usage | {"completion_tokens": "many"}})
    assert not storable(answer | {"usage": "lots"})
    ahead = Entry(orjson.dumps(answer), "d", time.time() + 290, 0.01, "p/m", "req-1", key="k1", tenant="key:a")
    read = Entry.loads(ahead.dumps())
    assert read.created <= time.time(), "counted from now, not fresh for its ttl and the skew"
