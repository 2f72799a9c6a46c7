"""Config reload with time-of-day prices: lowest-cost routing follows a window's edge.

The core is told the price multiplier in force at each minute's edge. That follower was
started only when the config the server started with had windows: a reload that added one
priced the requests by it (the ledger reads the window) while routing stayed on the price
at the moment of the reload, sending traffic to a deployment that had become the dearest.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import yaml

from edgeroute import config as config_mod
from edgeroute.reload import apply_config
from tests.conftest import eventually, simple_config

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def _first_choice(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/route/explain", json=BODY) as r:
        assert r.status == 200
        got: str = (await r.json())["deployment"]
        return got


def _hhmm(t: float) -> str:
    return time.strftime("%H:%M", time.gmtime(t))


async def test_a_window_a_reload_added_steers_routing_at_its_edge(start_upstream: Any, start_proxy: Any) -> None:
    a, b = await start_upstream(), await start_upstream()
    cfg = simple_config({"a": a, "b": b})
    cfg["deployments"]["d-b"]["price"] = {"input_per_mtok": 2, "output_per_mtok": 4}  # d-a: 1 and 2
    cfg["models"]["m"]["strategy"] = "lowest_cost"
    proxy = await start_proxy(cfg)  # no windows: nothing to follow at start
    assert await _first_choice(proxy.url) == "d-a"

    if 60 - time.time() % 60 < 5:  # too close to the edge to reload before it
        await asyncio.sleep(60 - time.time() % 60 + 0.2)
    edge = time.time() // 60 * 60 + 60
    # From the next minute on, d-a costs ten times its price: d-b is the cheaper one.
    window = {"start": _hhmm(edge), "end": _hhmm(edge + 180), "multiplier": 10}
    cfg["deployments"]["d-a"]["price"]["windows"] = [window]
    text = yaml.safe_dump(cfg)
    await apply_config(proxy.app, config_mod.loads(text, "test.yaml"), text, "api", None)
    assert await _first_choice(proxy.url) == "d-a", "the window is not in force yet"

    async def moved() -> bool:
        return time.time() > edge and await _first_choice(proxy.url) == "d-b"

    await eventually(moved, "lowest-cost routing moved off d-a at the window's start", within=75, every=0.5)
