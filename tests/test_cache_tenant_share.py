"""The response cache's bound is shared fairly by the tenants of a model, and every hit names its writer.

The exact store kept one least-recently-used order per model for every tenant: a team sending
many distinct prompts pushed every other team's answers out, and their repeats became paid
misses (a cost attack on the others, and their hit rate gone). Past the bound, the oldest
entry of the tenant holding the most now goes; a tenant alone still has the whole bound. With
Redis, a tenant holds at most `max_entries` of a model. And an embeddings hit did not say
whose answer it served, as a chat hit does.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import redis.asyncio as aioredis

from edgeroute.cache.entry import Entry
from edgeroute.cache.stores import CacheCounters, MemoryStore, _Largest
from tests.metrics_support import scrape
from tests.test_cache import cached, calls, stored
from tests.test_cache_semantic_tenants import KEYS, _client, _record
from tests.test_cost_support import REDIS_URL, cost_proxy, require_redis

BOUND = 4


async def _ask(client: openai.AsyncOpenAI, text: str) -> tuple[str, float]:
    """(`x-edgeroute-cache`, `x-edgeroute-cost-usd`) of one deterministic question."""
    msgs: Any = [{"role": "user", "content": text}]
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=msgs, temperature=0)
    assert raw.parse().choices[0].message.content
    return raw.headers["x-edgeroute-cache"], float(raw.headers["x-edgeroute-cost-usd"])


async def _ask_all(proxy: Any, client: openai.AsyncOpenAI, texts: list[str]) -> list[str]:
    """Each question in turn, each answer stored before the next is asked; the cache labels."""
    labels = []
    for text in texts:
        labels.append((await _ask(client, text))[0])
        await stored(proxy)
    return labels


async def test_a_team_flooding_the_cache_does_not_push_out_another_teams_answers(
    start_upstream: Any, start_proxy: Any
) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}, scope="team", max_entries=BOUND) | {"keys": KEYS})
    a, b = _client(proxy.url, "tok-a"), _client(proxy.url, "tok-b")
    # Team red alone has the whole bound.
    mine = [f"red question {i}" for i in range(BOUND)]
    assert await _ask_all(proxy, a, mine) == ["miss"] * BOUND
    assert await _ask_all(proxy, a, mine) == ["hit"] * BOUND and calls(up) == BOUND
    # Team blue stores two answers (red, holding the most, gives up two), then red floods.
    theirs = ["blue question 1", "blue question 2"]
    assert await _ask_all(proxy, b, theirs) == ["miss", "miss"]
    flood = [f"red flood {i}" for i in range(20)]
    assert await _ask_all(proxy, a, flood) == ["miss"] * 20
    paid = calls(up)
    for text in theirs:
        assert await _ask(b, text) == ("hit", 0.0), "team red's flood pushed out team blue's answers"
    assert calls(up) == paid
    # Red's share is what blue leaves: its latest answers are still there.
    assert await _ask_all(proxy, a, flood[-2:]) == ["hit", "hit"]
    metrics = await scrape(proxy.url, "tok-root")
    assert metrics.value("edgeroute_cache_evictions_total", reason="tenant_share") == 2
    assert metrics.value("edgeroute_cache_evictions_total", reason="lru") == 20
    assert metrics.value("edgeroute_cache_evictions_total", reason="tenant_cap") == 0
    await a.close()
    await b.close()


async def test_under_global_scope_a_flood_evicts_its_own_teams_entries(start_upstream: Any, start_proxy: Any) -> None:
    """Under `scope: global` every entry is everyone's; what one writes counts against its
    team's share, so one team still cannot flush what the others stored."""
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}, scope="global", max_entries=BOUND) | {"keys": KEYS})
    a, b = _client(proxy.url, "tok-a"), _client(proxy.url, "tok-b")
    assert await _ask_all(proxy, b, ["blue question"]) == ["miss"]
    assert await _ask_all(proxy, a, [f"red flood {i}" for i in range(10)]) == ["miss"] * 10
    assert await _ask(a, "blue question") == ("hit", 0.0), "shared, and not pushed out by the flood"
    await a.close()
    await b.close()


async def test_with_redis_a_team_holds_at_most_max_entries_of_a_model(start_upstream: Any, start_proxy: Any) -> None:
    r = aioredis.Redis.from_url(require_redis())
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream(record=True)
    cfg = cached({"a": up}, scope="team", max_entries=BOUND) | {"keys": KEYS}
    proxy = await start_proxy(cfg | {"shared_state": {"redis_url": REDIS_URL, "prefix": prefix}})
    a, b = _client(proxy.url, "tok-a"), _client(proxy.url, "tok-b")
    try:
        theirs = ["blue question 1", "blue question 2"]
        assert await _ask_all(proxy, b, theirs) == ["miss", "miss"]
        flood = [f"red flood {i}" for i in range(20)]
        assert await _ask_all(proxy, a, flood) == ["miss"] * 20
        entries = [k async for k in r.scan_iter(f"{prefix}:cache:*")]
        assert len(entries) == BOUND + 2, "team red's flood grew the shared cache past its bound"
        for text in theirs:
            assert await _ask(b, text) == ("hit", 0.0)
        assert await _ask_all(proxy, a, [flood[0], flood[-1]]) == ["miss", "hit"], "its oldest went first"
        metrics = await scrape(proxy.url, "tok-root")
        assert metrics.value("edgeroute_cache_evictions_total", reason="tenant_cap") == 20 - BOUND + 1
    finally:
        await a.close()
        await b.close()
        await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")])
        await r.aclose()


def _embeddings_config(base_url: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "providers": {"oa": {"base_url": base_url, "api_key": "k"}},
        "deployments": {
            "emb": {"provider": "oa", "model": "text-embedding-3-small", "price": {"input_per_mtok": 0.02}}
        },
        "models": {"embed": {"deployments": ["emb"], "cache": {"ttl": 60, "scope": "global"}}},
        "keys": KEYS,
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "request_log": {},
    }


async def test_an_embeddings_hit_names_its_writer_to_those_who_may_read_it(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    async with cost_proxy(_embeddings_config(up.base_url, tmp_path)) as proxy:
        a, b = _client(proxy.url, "tok-a"), _client(proxy.url, "tok-b")

        async def embed(client: openai.AsyncOpenAI) -> tuple[str, str]:
            raw = await client.embeddings.with_raw_response.create(model="embed", input=["alpha beta", "gamma"])
            return raw.headers["x-edgeroute-cache"], raw.headers["x-request-id"]

        label, wrote = await embed(a)
        assert label == "miss"
        await stored(proxy)
        (own, own_id), (other, other_id) = await embed(a), await embed(b)
        assert (own, other) == ("hit", "hit")
        await a.close()
        await b.close()
        async with aiohttp.ClientSession() as s:
            assert (await _record(s, proxy.url, own_id, "tok-a-admin"))["cache_writer"] == wrote
            assert (await _record(s, proxy.url, other_id, "tok-root"))["cache_writer"] == wrote
            assert (await _record(s, proxy.url, wrote, "tok-root"))["cache_writer"] is None, "a miss wrote it"
            # Team blue's admin is not shown the id of team red's request whose answer it got.
            blue = await _record(s, proxy.url, other_id, "tok-b-admin")
            assert blue["cache"] == "hit" and blue["cache_writer"] is None


async def test_past_max_bytes_the_tenant_holding_the_most_bytes_gives_way() -> None:
    counters = CacheCounters()
    store = MemoryStore(counters)
    small, large = _entry(100), _entry(2000)
    bounds = (1000, 2 * large.size() + 3 * small.size())
    for i in range(3):
        await store.put("r", f"s{i}", small, 60, bounds, tenant="key:small")
    for i in range(10):  # fewer entries, more bytes: its own go
        await store.put("r", f"l{i}", large, 60, bounds, tenant="key:large")
    assert store.size("r", "key:small") == (3, 3 * small.size())
    assert store.size("r", "key:large") == (2, 2 * large.size())
    assert [store.get_now("r", k) is not None for k in ("l7", "l8", "l9")] == [False, True, True]
    # Many small ones: the large tenant gives way, oldest first, while it holds the most bytes;
    # then the small one's own go, and the large one keeps its latest.
    for i in range(3, 40):
        await store.put("r", f"s{i}", small, 60, bounds, tenant="key:small")
        assert store.size("r")[1] <= bounds[1]
    assert store.size("r", "key:large") == (1, large.size()) and store.get_now("r", "l9") is not None
    assert store.get_now("r", "s39") is not None and store.get_now("r", "s3") is None
    assert counters.evicted_share == 1 and counters.evictions == 50 - store.size("r")[0]


def _entry(n: int) -> Entry:
    body = orjson.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "x" * n}}]})  # fmt: skip
    return Entry(body, "d-a", time.time(), 0.0)


def test_the_largest_tenant_is_found_as_sizes_grow_and_shrink() -> None:
    rng = random.Random(5)
    largest, sizes = _Largest(), dict.fromkeys("abcdefg", 0)
    for _ in range(20_000):
        tenant = rng.choice("abcdefg")
        delta = rng.randint(-sizes[tenant], 50) or 1
        sizes[tenant] += delta
        largest.add(tenant, delta)
        if any(sizes.values()):
            prefer = rng.choice("abcdefg")
            most = max(sizes.values())
            expected = prefer if sizes[prefer] == most else None
            got = largest.largest(prefer)
            assert sizes[got] == most and (expected is None or got == expected)
    assert len(largest._heap) <= 4 * 7 + 64 + 1
