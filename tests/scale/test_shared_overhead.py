"""What sharing state through Redis adds per request: budgets + rate limits + the cache lookup.

The same proxy config twice in one sitting, interleaved in rounds: once with its state in
process, once with `shared_state` on a loopback Redis. Requests are sequential and each
one is new (a cache miss: a lookup, then a store), so every request pays each check once.
Reported, not asserted: the machine this runs on is shared.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import aiohttp
import pytest

from tests.perf import Perf
from tests.test_cost_support import RedisServer

ROUNDS, PER_ROUND = 5, 60


def _config(base_url: str, shared: dict[str, Any] | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": base_url, "api_key": "k"}},
        "deployments": {
            "d-a": {"provider": "a", "model": "x", "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
        },
        "models": {"m": {"deployments": ["d-a"], "cache": {"ttl": 60}}},
        "budgets": {"limits": [{"name": "g", "scope": "global", "limit_usd": 1000.0}]},
        "rate_limits": {"per_key": {"rpm": 1_000_000, "tpm": 1_000_000_000}},
    }
    if shared is not None:
        cfg["shared_state"] = shared
    return cfg


async def _timings(url: str, tag: str, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            body = {"model": "m", "messages": [{"role": "user", "content": f"{tag} {i}"}], "temperature": 0}
            t0 = time.perf_counter()
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                await r.read()
                assert r.status == 200
            out.append((time.perf_counter() - t0) * 1000)
    return out


@pytest.mark.perf
async def test_redis_shared_state_overhead(start_upstream, start_proxy, perf: Perf, tmp_path) -> None:  # type: ignore[no-untyped-def]
    redis_server = RedisServer(tmp_path)  # its own, so that its command count is this test's alone
    redis_server.start()
    try:
        await _measure(start_upstream, start_proxy, perf, redis_server.url)
    finally:
        redis_server.stop()


async def _commands(url: str) -> tuple[int, int]:
    """(commands Redis executed, those inside scripts included; scripts run) so far."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        total = int((await client.info("stats"))["total_commands_processed"])
        scripts = int((await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0))
        return total, scripts
    finally:
        await client.aclose()


async def _measure(start_upstream, start_proxy, perf: Perf, url: str) -> None:  # type: ignore[no-untyped-def]
    up = await start_upstream()
    prefix = f"edgeroute-ovh-{os.getpid()}-{os.urandom(4).hex()}"
    local = await start_proxy(_config(up.base_url, None))
    shared = await start_proxy(_config(up.base_url, {"redis_url": url, "prefix": prefix, "timeout_ms": 2000}))
    await _timings(local.url, "warm-local", 20)
    await _timings(shared.url, "warm-shared", 20)
    a: list[float] = []
    b: list[float] = []
    commands = scripts = 0
    for r in range(ROUNDS):
        a += await _timings(local.url, f"local-{r}", PER_ROUND)
        before = await _commands(url)
        b += await _timings(shared.url, f"shared-{r}", PER_ROUND)
        after = await _commands(url)
        commands += after[0] - before[0] - 2  # less the two INFOs
        scripts += after[1] - before[1]
    added = statistics.median(b) - statistics.median(a)
    perf.report("Redis shared state added per request (budgets + limits + cache), p50", added, "ms", "< 0.3")
    n = len(b)
    perf.report("Redis scripts per request (admission, settlement)", scripts / n, "scripts", "< 2.5")
    perf.report("Redis commands per request, those inside scripts included", commands / n, "commands", "< 25")
    # Each request really went through Redis: the budget and the bucket are there.
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    await client.delete(*keys)
    await client.aclose()
    assert any(b":b:g:" in k for k in keys) and any(b":rl:" in k for k in keys)
