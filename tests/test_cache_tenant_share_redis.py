"""A tenant's share of the response cache, finished: used entries stay on Redis, an ended key's
entries leave its tenant's share, and the shared semantic stream is shared fairly.

Session 30 bounded each tenant to `max_entries` of a model on Redis, but evicted its oldest
*written* entry (a hit did not count: its most used answer went first once it was the oldest
write); a revoked key's entries were deleted, but their names stayed in its tenant's share
and took up its `max_entries` until they aged out (the tenant's live answers went early); and
the shared semantic index's stream was trimmed across tenants, so one tenant's flood of
prompts pushed every other tenant's records out of it (an instance reading it later missed
their paraphrases).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.metrics_support import scrape
from tests.security.governed import ROOT, call
from tests.test_cache import cached, calls
from tests.test_cache_semantic_tenants import KEYS, _client
from tests.test_cache_tenant_share import BOUND, _ask, _ask_all
from tests.test_cost_support import REDIS_URL, RedisServer, require_redis


async def _within(check: Any, seconds: float) -> None:
    """Waits until `check()` holds or `seconds` pass (the assertions after it say what failed)."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.02)):
        if await check() or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)


async def _clean(r: aioredis.Redis, prefix: str) -> None:
    await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")] or [f"{prefix}:none"])
    await r.aclose()


async def test_with_redis_a_teams_most_used_answer_outlives_its_later_writes(
    start_upstream: Any, start_proxy: Any
) -> None:
    r = aioredis.Redis.from_url(require_redis())
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream(record=True)
    cfg = cached({"a": up}, scope="team", max_entries=BOUND) | {"keys": KEYS}
    proxy = await start_proxy(cfg | {"shared_state": {"redis_url": REDIS_URL, "prefix": prefix}})
    a = _client(proxy.url, "tok-a")
    share = f"{prefix}:cache-share:m:team:red"
    try:
        assert await _ask_all(proxy, a, ["the team's everyday question"]) == ["miss"]
        (everyday,) = [k async for k in r.scan_iter(f"{prefix}:cache:m:*")]
        others = [f"red question {i}" for i in range(BOUND - 1)]
        assert await _ask_all(proxy, a, others) == ["miss"] * (BOUND - 1)
        assert await _ask(a, "the team's everyday question") == ("hit", 0.0)

        async def used() -> bool:  # the hit reached Redis, off the request path
            return await r.zrange(share, 0, 0) != [everyday]

        await _within(used, 5)
        # Two new answers: the team's two least used go, not the one it keeps asking.
        assert await _ask_all(proxy, a, ["red later 1", "red later 2"]) == ["miss", "miss"]
        paid = calls(up)
        assert await _ask(a, "the team's everyday question") == ("hit", 0.0), "its most used answer was evicted"
        assert calls(up) == paid
        metrics = await scrape(proxy.url, "tok-root")
        assert metrics.value("edgeroute_cache_evictions_total", reason="tenant_cap") == 2
        assert (await _ask(a, others[0]))[0] == "miss", "its least used went first"
    finally:
        await a.close()
        await _clean(r, prefix)


def _governed(up: Any, tmp_path: Path, **cache: Any) -> dict[str, Any]:
    cfg = cached({"a": up}, scope="team", max_entries=BOUND) | cache
    return cfg | {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db")},
    }


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_a_revoked_keys_entries_no_longer_take_up_its_teams_share(
    start_upstream: Any, start_proxy: Any, tmp_path: Path, backend: str
) -> None:
    r = aioredis.Redis.from_url(require_redis())
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream(record=True)
    cfg = _governed(up, tmp_path)
    if backend == "redis":
        cfg["shared_state"] = {"redis_url": REDIS_URL, "prefix": prefix}
    proxy = await start_proxy(cfg)
    share = f"{prefix}:cache-share:m:team:red"
    async with aiohttp.ClientSession() as s:
        made = []
        for name in ("staying", "leaving"):
            status, key = await call(s, "POST", proxy.url + "/admin/keys", ROOT, {"name": name, "team": "red"})
            assert status == 201
            made.append(key)
    staying, leaving = (_client(proxy.url, k["secret"]) for k in made)
    try:
        mine = ["staying question 1", "staying question 2"]
        assert await _ask_all(proxy, staying, mine) == ["miss", "miss"]
        assert await _ask_all(proxy, leaving, ["leaving question 1", "leaving question 2"]) == ["miss", "miss"]
        async with aiohttp.ClientSession() as s:
            status, _ = await call(s, "DELETE", proxy.url + f"/admin/keys/{made[1]['id']}", ROOT)
            assert status == 200
        # The team's share is its live entries': two more answers fit beside the first two.
        assert await _ask_all(proxy, staying, ["staying question 3", "staying question 4"]) == ["miss", "miss"]
        paid = calls(up)
        for text in mine:
            assert await _ask(staying, text) == ("hit", 0.0), "pushed out by the revoked key's dead entries"
        assert calls(up) == paid
        if backend == "redis":
            names = await r.zrange(share, 0, -1)
            assert len(names) == BOUND and await r.exists(*names) == BOUND, "the revoked key's names stayed"
        metrics = await scrape(proxy.url, ROOT)
        assert metrics.value("edgeroute_cache_evictions_total", reason="revoked") == 2
        assert metrics.value("edgeroute_cache_evictions_total", reason="tenant_cap") == 0
    finally:
        await staying.close()
        await leaving.close()
        await _clean(r, prefix)


async def test_a_teams_semantic_flood_leaves_another_teams_records_in_the_shared_stream(
    start_upstream: Any, start_proxy: Any, tmp_path: Path
) -> None:
    """Two instances: B reads the shared stream only after team red's flood, and still matches
    team blue's paraphrase with what blue stored on A."""
    server = RedisServer(tmp_path)  # its own: its streams' node size is set small below
    server.start()
    r = aioredis.Redis.from_url(server.url)
    # Redis trims an approximate MAXLEN by whole nodes (100 records by default): small nodes
    # make a trim past `max_entries` as exact as a busy stream's.
    await r.config_set("stream-node-max-entries", 2)
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream(record=True)
    cfg = cached({"a": up}, mode="semantic", scope="team", max_entries=BOUND) | {"keys": KEYS}
    cfg["shared_state"] = {"redis_url": server.url, "prefix": prefix}
    first = await start_proxy(cfg)
    blue, red = _client(first.url, "tok-b"), _client(first.url, "tok-a")
    try:
        assert await _ask_all(first, blue, ["How do I reset my password?"]) == ["miss"]
        flood = [f"Tell me fact number {i} about {w}" for i, w in enumerate("owls rivers tea maps glass jazz".split())]
        assert await _ask_all(first, red, flood) == ["miss"] * len(flood)
        stream = f"{prefix}:cache:sem:-:m"
        assert await r.xlen(stream) == 1 + BOUND, "each team holds at most max_entries records of the stream"
        second = await start_proxy(cfg)
        blue_on_b = _client(second.url, "tok-b")
        try:
            assert (await _ask(blue_on_b, "How can I reset my password?"))[0] == "hit", (
                "red's flood trimmed blue's record"
            )
        finally:
            await blue_on_b.close()
    finally:
        await blue.close()
        await red.close()
        await r.aclose()
        server.stop()
