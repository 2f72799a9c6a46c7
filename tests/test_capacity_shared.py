"""Capacity shared between instances over a real Redis, end to end with the OpenAI SDK: two
proxies never have more than `max_concurrency` in flight at the upstream together (measured
at the upstream), spill over and queue as one, get back the slots of an instance that died,
and fail open (on their own counts) when Redis is down."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute.capacity_share import SHARED_SLOTS
from edgeroute.config import SharedState
from edgeroute.leases import RedisLeases
from edgeroute.server import create_app
from edgeroute.state import STATE
from tests.conftest import Proxy, ProxyTestServer, eventually
from tests.dispatch_support import StartProxy, answer
from tests.dispatch_support import upstreams as upstreams  # a fixture
from tests.scale.support import metric
from tests.serve_support import free_port
from tests.test_cost_support import require_redis


class Gauge:
    """Requests in flight at one upstream, as it sees them."""

    def __init__(self) -> None:
        self.now = self.peak = self.served = 0

    def handler(self, seconds: float) -> Any:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                await asyncio.sleep(seconds)
            finally:
                self.now -= 1
            self.served += 1
            return answer()

        return handle


@pytest.fixture
async def shared() -> AsyncIterator[SharedState]:
    """`shared_state` on the test Redis under a prefix of this test's own (removed afterwards)."""
    url = require_redis()
    cfg = SharedState(redis_url=url, prefix=f"edgeroute-cap-{os.getpid()}-{os.urandom(4).hex()}", timeout_ms=2000)
    yield cfg
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    async for key in client.scan_iter(match=cfg.prefix + ":*"):
        await client.delete(key)
    await client.aclose()


async def _ask(proxy: Proxy | str) -> Any:
    url = proxy if isinstance(proxy, str) else proxy.url
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    return await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "q"}]
    )


async def _leases(cfg: SharedState, deployment: str) -> int:
    store = RedisLeases(cfg)
    try:
        return await store.count(deployment)
    finally:
        await store.close()


async def _until_no_leases(cfg: SharedState, deployment: str) -> None:
    async def none_left() -> bool:  # the releases go out off the request path
        return await _leases(cfg, deployment) == 0

    await eventually(none_left, "leases left behind")


async def _through_two(
    start_proxy: StartProxy, cfg: dict[str, Any], shared: SharedState, each: int
) -> tuple[Proxy, Proxy, list[Any]]:
    """Two proxies on one Redis; `each` concurrent requests through each, all at once."""
    cfg["shared_state"] = shared.model_dump()
    p1, p2 = await start_proxy(cfg), await start_proxy(cfg)
    return p1, p2, await asyncio.gather(*(_ask(p) for _ in range(each) for p in (p1, p2)))


async def test_two_instances_never_exceed_the_capacity_together_and_spill_over(
    upstreams: Any, start_proxy: StartProxy, shared: SharedState
) -> None:
    primary, secondary = Gauge(), Gauge()
    cfg = await upstreams(primary.handler(0.2), secondary.handler(0.05))
    cfg["deployments"]["d-a"].update(max_concurrency=3, weight=1000)
    p1, p2, raws = await _through_two(start_proxy, cfg, shared, 12)
    assert all(r.http_response.status_code == 200 for r in raws)
    assert primary.peak <= 3  # each proxy alone would have let 3 in: 6 together
    assert primary.served >= 3 and secondary.served > 0 and primary.served + secondary.served == 24
    spilled = [r for r in raws if r.headers["x-edgeroute-deployment"] == "d-b"]
    assert all("spillover: d-a at capacity for class default" in r.headers["x-edgeroute-explain"] for r in spilled)
    taken = p1.app[SHARED_SLOTS].results["taken"] + p2.app[SHARED_SLOTS].results["taken"]
    assert taken == primary.served
    await _until_no_leases(shared, "d-a")
    assert [p.app[STATE].live.capacity.active(0) for p in (p1, p2)] == [0, 0]


async def test_the_queue_holds_across_instances(upstreams: Any, start_proxy: StartProxy, shared: SharedState) -> None:
    only = Gauge()
    cfg = await upstreams(only.handler(0.1))
    cfg["deployments"]["d-a"].update(max_concurrency=2, max_queue=20, queue_timeout_ms=30_000)
    p1, p2, raws = await _through_two(start_proxy, cfg, shared, 5)
    assert [r.http_response.status_code for r in raws] == [200] * 10
    assert only.peak <= 2 and only.served == 10
    # Those that waited for a slot freed in the other instance found it by asking again.
    assert sum(r.queue_ms > 0 for p in (p1, p2) for r in p.recorder.records) >= 6
    await _until_no_leases(shared, "d-a")


async def test_the_slots_of_a_dead_instance_come_back(
    upstreams: Any, start_proxy: StartProxy, shared: SharedState
) -> None:
    primary, secondary = Gauge(), Gauge()
    cfg = await upstreams(primary.handler(0.0), secondary.handler(0.0))
    cfg["deployments"]["d-a"].update(max_concurrency=2, weight=1000)
    cfg["shared_state"] = shared.model_dump()
    proxy = await start_proxy(cfg)
    # An instance killed with -9 while it held both slots: its leases are left, with their expiry.
    dead = RedisLeases(shared)
    assert await dead.take_lease("d-a", 2, "dead:1", ttl_s=0.5) and await dead.take_lease("d-a", 2, "dead:2", ttl_s=0.5)
    await dead.close()
    started = time.monotonic()
    raw = await _ask(proxy)
    assert raw.headers["x-edgeroute-deployment"] == "d-b" or time.monotonic() - started > 0.5
    await asyncio.sleep(max(0.0, 0.6 - (time.monotonic() - started)))
    assert (await _ask(proxy)).headers["x-edgeroute-deployment"] == "d-a"


async def test_admin_deployments_shows_the_fleets_in_flight_beside_its_own(
    upstreams: Any, start_proxy: StartProxy, shared: SharedState
) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return answer()

    cfg = await upstreams(held, Gauge().handler(0.0))
    cfg["deployments"]["d-a"].update(max_concurrency=5, weight=1000)
    cfg["shared_state"] = shared.model_dump()
    p1, p2 = await start_proxy(cfg), await start_proxy(cfg)
    asks = [asyncio.ensure_future(_ask(p)) for p in (p1, p2, p2)]

    async def three_leases() -> bool:
        return await _leases(shared, "d-a") == 3

    await eventually(three_leases, "the 3 requests holding their leases")
    async with aiohttp.ClientSession() as http, http.get(p1.url + "/admin/deployments") as resp:
        rows = {d["name"]: d for d in (await resp.json())["deployments"]}
    assert (rows["d-a"]["active"], rows["d-a"]["fleet_active"], rows["d-a"]["max_concurrency"]) == (1, 3, 5)
    assert "fleet_active" not in rows["d-b"]  # no limit, nothing shared
    release.set()
    assert [r.http_response.status_code for r in await asyncio.gather(*asks)] == [200] * 3
    await _until_no_leases(shared, "d-a")


async def test_redis_down_fails_open_on_the_instance_count(upstreams: Any, start_proxy: StartProxy) -> None:
    primary, secondary = Gauge(), Gauge()
    cfg = await upstreams(primary.handler(0.0), secondary.handler(0.0))
    cfg["deployments"]["d-a"].update(max_concurrency=1, weight=1000)
    cfg["shared_state"] = {"redis_url": f"redis://127.0.0.1:{free_port()}/0", "timeout_ms": 200}
    proxy = await start_proxy(cfg)
    assert (await _ask(proxy)).headers["x-edgeroute-deployment"] == "d-a"  # admitted on this instance's count
    proxy.app[STATE].live.router.acquire(0)  # this instance's own limit still holds
    assert (await _ask(proxy)).headers["x-edgeroute-deployment"] == "d-b"
    proxy.app[STATE].live.router.release(0)
    assert await metric(proxy.url, "edgeroute_shared_capacity_total", {"result": "unavailable"}) == 1.0
    assert not proxy.app[SHARED_SLOTS].held.get("d-a")  # the unleased slot was given back


async def test_the_lease_bench_measures_and_leaves_nothing(shared: SharedState) -> None:
    from edgeroute.bench.shared_capacity import measure

    out = await measure(shared.redis_url, 20)
    assert 0 < out["take_p50_ms"] <= out["take_p99_ms"]


async def test_a_capacity_that_a_reload_sets_is_shared(upstreams: Any, shared: SharedState, tmp_path: Path) -> None:
    only = Gauge()
    cfg = await upstreams(only.handler(0.1))
    cfg["shared_state"] = shared.model_dump()
    cfg["ledger"] = {"backend": "memory"}
    path = tmp_path / "edgeroute.yaml"
    path.write_text(yaml.safe_dump(cfg))  # no capacity yet
    servers = [ProxyTestServer(create_app(config_mod.load(path), str(path)), host="127.0.0.1") for _ in range(2)]
    for s in servers:
        await s.start_server()
    try:
        cfg["deployments"]["d-a"].update(max_concurrency=2, max_queue=20, queue_timeout_ms=30_000)
        path.write_text(yaml.safe_dump(cfg))
        async with aiohttp.ClientSession() as session:
            for s in servers:
                async with session.post(f"http://127.0.0.1:{s.port}/admin/reload") as r:
                    assert r.status == 200, await r.text()
        urls = [f"http://127.0.0.1:{s.port}" for s in servers]
        raws = await asyncio.gather(*(_ask(u) for _ in range(5) for u in urls))
        assert [r.http_response.status_code for r in raws] == [200] * 10
        assert only.peak <= 2 and only.served == 10
        await _until_no_leases(shared, "d-a")
    finally:
        for s in servers:
            await s.close()
