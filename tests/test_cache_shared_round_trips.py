"""Cache hits with budgets, limits and the cache all in Redis: what admission reserved for a
hit goes back, and the budget is exact, even when Redis goes away mid-sequence and comes back
empty, or an entry is corrupt."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import openai
import redis.asyncio as aioredis

from edgeroute.cache.service import CACHE
from edgeroute.cost.budgets import to_nano
from tests.conftest import simple_config
from tests.test_cost_support import REDIS_URL, RedisServer, require_redis

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def _config(upstream: Any, redis_url: str, prefix: str) -> dict[str, Any]:
    cfg = simple_config(
        {"a": upstream},
        budgets={"limits": [{"name": "all", "scope": "global", "limit_usd": 100, "period": "month"}]},
        rate_limits={"per_key": {"rpm": 10_000, "tpm": 10_000_000}},
    )
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    cfg["shared_state"] = {"redis_url": redis_url, "prefix": prefix, "timeout_ms": 300, "on_unavailable": "open"}
    return cfg


async def _spent(r: aioredis.Redis, prefix: str) -> int:
    """What the budget's counters in Redis hold (nano-USD)."""
    keys = [k async for k in r.scan_iter(f"{prefix}:b:*")]
    return sum(int(v) for v in await r.mget(keys) if v is not None) if keys else 0


async def _ask(client: openai.AsyncOpenAI) -> str:
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert raw.parse().choices[0].message.content
    return raw.headers["x-edgeroute-cache"]


async def test_give_backs_waiting_when_redis_goes_away_never_undercount(start_upstream, start_proxy, tmp_path) -> None:
    """Redis is killed while a hit's give-back waits for its batch and comes back empty: the
    give-back was of a reservation the restart lost, so it is not applied to the new counters."""
    redis = RedisServer(tmp_path)
    redis.start()
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config(up, redis.url, prefix))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        assert await _ask(client) == "miss"
        await asyncio.sleep(0.3)
        assert await _ask(client) == "hit"
        redis.stop()  # the hit's give-back still waits for company
        before = len(proxy.recorder.records)
        # Redis down: served all the same (on_unavailable: open), the lookup a counted miss.
        assert await _ask(client) == "miss"
        assert proxy.app[CACHE].counters.errors >= 1
        redis.start()  # empty
        await asyncio.sleep(0.3)  # past the retry pause of a failed connect
        assert await _ask(client) == "miss"  # the entry went with Redis
        await asyncio.sleep(1.5)  # outage spend and settlements resent
        records = list(proxy.recorder.records)[before:]
        assert len(records) == 2 and all(rec.cost_usd > 0 for rec in records)
        r = aioredis.Redis.from_url(redis.url)
        # Both requests since Redis went away, counted once each, and nothing given back twice.
        assert await _spent(r, prefix) == sum(to_nano(rec.cost_usd) for rec in records)
        await r.aclose()
    finally:
        await client.close()
        redis.stop()


async def test_a_corrupt_entry_is_a_counted_miss_and_its_budget_exact(start_upstream, start_proxy) -> None:
    """The lookup that goes out with the admission script finds bytes that do not decode: the
    request is answered from upstream (a miss, counted as corrupt), and the budget holds what
    the two answers cost, the reservations given back."""
    r = aioredis.Redis.from_url(require_redis())
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config(up, REDIS_URL, prefix))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    assert await _ask(client) == "miss"
    await asyncio.sleep(0.3)
    keys = [k async for k in r.scan_iter(f"{prefix}:cache:*")]
    assert len(keys) == 1
    await r.set(keys[0], b"\x78\x9cnot an entry")
    assert await _ask(client) == "miss"
    assert proxy.app[CACHE].counters.corrupt == 1 and len(up.options.requests) == 2
    await asyncio.sleep(0.4)  # stored again, and the give-backs sent
    assert await _ask(client) == "hit"
    await asyncio.sleep(0.4)
    costs = [rec.cost_usd for rec in proxy.recorder.records]
    assert costs[0] > 0 and costs[1] > 0 and costs[2] == 0
    assert await _spent(r, prefix) == sum(to_nano(c) for c in costs)
    await client.close()
    await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")])
    await r.aclose()
