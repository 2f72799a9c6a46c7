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
import numpy as np
import pytest
import redis.asyncio as aioredis

from edgeroute.cache.entry import Entry
from edgeroute.cache.semantic import Guards
from edgeroute.cache.shared_index import STREAM_TENANTS, SharedIndexes, encode
from edgeroute.cache.stores import FORGET, CacheCounters, RedisStore
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


# Round 2 (redM2 #5, #6, #7): an ended key's entries go a page at a time, by one instance; the
# shared stream has a bound whatever the number of tenants; child keys share their root's share.


async def test_an_ended_keys_many_entries_go_a_page_at_a_time_and_once() -> None:
    """5,000 entries of one managed key: the instance that claims the key deletes them in short
    scripts (Redis serves others between them), and a second instance deletes nothing more but
    still learns which entries to drop from its memory."""
    url, prefix = require_redis(), "edgeroute-test-" + os.urandom(4).hex()
    first, second = RedisStore(CacheCounters(), url, prefix, 2000), RedisStore(CacheCounters(), url, prefix, 2001)
    scripts: list[int] = []  # names each FORGET script returned, per instance
    for store in (first, second):
        store.pipe.eval = _counting(store.pipe.eval, scripts)  # type: ignore[method-assign]
    n, body = 5_000, Entry(b'{"id": "x"}', "a", time.time(), 0.0)
    r = aioredis.Redis.from_url(url)
    try:
        for at in range(0, n, 500):
            keys = [f"{i:040x}" for i in range(at, at + 500)]
            await asyncio.gather(*(first.put("m", k, body, 600, (n, 1 << 30), "leaker", "team:red") for k in keys))
        share = f"{prefix}:cache-share:m:team:red"
        assert await r.zcard(share) == n
        scripts.clear()
        dropped = await first.forget(["leaker"])
        assert len(dropped) == n and first.counters.evicted_revoked == n
        assert len(scripts) >= n // 1000 and max(scripts) <= 1000, f"one long script: {scripts}"
        assert await r.zcard(share) == 0 and not [k async for k in r.scan_iter(f"{prefix}:cache:m:*")]
        assert 0 < await r.pttl(f"{prefix}:cache-owner:leaker") <= 600_000, "the names are kept only a while"
        scripts.clear()
        assert await second.forget(["leaker"]) == dropped, "the other instance must drop them from memory too"
        assert second.counters.evicted_revoked == 0 and scripts == [], "a second instance deleted again"
    finally:
        await first.close()
        await second.close()
        await _clean(r, prefix)


def _counting(run: Any, seen: list[int]) -> Any:
    async def counted(script: Any, keys: list[str], args: list[Any], **kw: Any) -> Any:
        got = await run(script, keys, args, **kw)
        if script.sha == FORGET.sha:
            seen.append(len(got[-1]))
        return got

    return counted


async def test_the_shared_semantic_stream_has_a_bound_whatever_the_number_of_tenants() -> None:
    """60 tenants each publish their `max_entries` (20) records: the stream holds about
    `STREAM_TENANTS` shares (Redis trims whole nodes of up to 100 records), not 60."""
    url, prefix = require_redis(), "edgeroute-test-" + os.urandom(4).hex()
    shared = SharedIndexes(url, prefix, 2000, CacheCounters())
    vector, g = np.ones(8, dtype=np.float32), Guards(b"x" * 16, None)
    r = aioredis.Redis.from_url(url)
    try:
        for t in range(60):
            for i in range(20):
                record = encode("o", f"k{t}-{i}", "ctx", g, vector, f"key:t{t}")
                await shared.publish("m", None, record, 600, 20, None, f"key:t{t}")
        assert await r.xlen(shared.stream("m", None)) <= 20 * STREAM_TENANTS + 100, "it grew with the tenants"
    finally:
        await shared.close()
        await _clean(r, prefix)


@pytest.mark.parametrize("backend", ["memory", "redis", "semantic"])
async def test_child_keys_of_one_holder_count_as_one_tenant(
    start_upstream: Any, start_proxy: Any, tmp_path: Path, backend: str
) -> None:
    """Under `scope: key`, a team admin key makes 20 keys and writes one answer with each: they
    share its one share, so another key's answers stay (in memory, where tenants share the
    route's bound) and Redis holds one share of theirs, not 20 (of entries; and of semantic
    records, whose per-tenant shares bound the shared stream)."""
    r = aioredis.Redis.from_url(require_redis())
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream(record=True)
    cfg = _governed(up, tmp_path)
    cfg["models"]["m"]["cache"]["scope"] = "key"
    if backend == "semantic":
        cfg["models"]["m"]["cache"]["mode"] = "semantic"
    if backend != "memory":
        cfg["shared_state"] = {"redis_url": REDIS_URL, "prefix": prefix}
    proxy = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        _, holder = await call(s, "POST", proxy.url + "/admin/keys", ROOT, {"team": "red", "role": "admin"})
        _, victim = await call(s, "POST", proxy.url + "/admin/keys", ROOT, {"team": "blue"})
        children = [(await call(s, "POST", proxy.url + "/admin/keys", holder["secret"], {}))[1] for _ in range(20)]
    assert all("secret" in c for c in children), children[0]
    mine = ["blue question 1", "blue question 2"]
    clients = [_client(proxy.url, k["secret"]) for k in (victim, *children)]
    try:
        assert await _ask_all(proxy, clients[0], mine) == ["miss", "miss"]
        for i, child in enumerate(clients[1:]):
            assert await _ask_all(proxy, child, [f"red question {i}"]) == ["miss"]
        paid = calls(up)
        for text in mine:
            assert await _ask(clients[0], text) == ("hit", 0.0), "20 child keys took 20 shares"
        assert calls(up) == paid
        for kind in ("cache-share:", "cache-sem-share:-:")[: {"memory": 0, "redis": 1, "semantic": 2}[backend]]:
            shares = [k async for k in r.scan_iter(f"{prefix}:{kind}m:*")]
            assert sorted(shares) == sorted(f"{prefix}:{kind}m:key:{k['id']}".encode() for k in (holder, victim))
            assert await r.zcard(f"{prefix}:{kind}m:key:{holder['id']}") == BOUND
    finally:
        for c in clients:
            await c.close()
        await _clean(r, prefix)
