"""The response cache and shadow traffic on models that choose among routes: an A/B
experiment or a policy route with `cache:` (or `shadow:`).

The request is served by the route the model chose, whose own settings applied: the
chooser's `cache` and `shadow` were accepted by the config and silently ignored (every
request went upstream; nothing was mirrored). They apply to the routes it chooses, each
route's answers cached apart (a variant never gets another variant's answer).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai

from tests.conftest import eventually, simple_config
from tests.test_selection import config as policy_config

MSG: Any = [{"role": "user", "content": "What is the capital of France?"}]


async def _variant_of(url: str, user: str) -> str:
    body = {"model": "chat", "messages": MSG, "user": user}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/route/explain", json=body) as r:
        route: str = (await r.json())["route"]
        return route


async def test_an_experiment_with_a_cache_caches_each_variant_apart(start_upstream: Any, start_proxy: Any) -> None:
    a, b = await start_upstream(record=True), await start_upstream(record=True)
    cfg = simple_config({"a": a, "b": b})
    variants = [{"route": "x", "percent": 50}, {"route": "y", "percent": 50}]
    cfg["models"] = {
        "x": {"deployments": ["d-a"]},
        "y": {"deployments": ["d-b"]},
        "chat": {"experiment": {"sticky": "user", "variants": variants}, "cache": {"ttl": 60}},
    }
    proxy = await start_proxy(cfg)
    first = await _variant_of(proxy.url, "u0")
    other = ""
    for i in range(1, 64):  # a user the experiment puts on the other variant
        if await _variant_of(proxy.url, f"u{i}") != first:
            other = f"u{i}"
            break
    assert other
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    seen = []
    for user in ("u0", "u0", other, other):
        raw = await client.chat.completions.with_raw_response.create(
            model="chat", messages=MSG, temperature=0, user=user
        )
        seen.append((raw.headers["x-edgeroute-route"], raw.headers["x-edgeroute-cache"]))
    second = "y" if first == "x" else "x"
    assert seen == [(first, "miss"), (first, "hit"), (second, "miss"), (second, "hit")]
    assert len(a.options.requests) == len(b.options.requests) == 1
    await client.close()


async def test_a_policy_route_with_a_cache_and_a_shadow(start_upstream: Any, start_proxy: Any) -> None:
    strong, weak = await start_upstream(record=True), await start_upstream(record=True)
    cfg = policy_config(strong, weak, threshold=0.0)  # the cheapest candidate, weak, always suffices
    cfg["models"]["auto"] |= {"cache": {"ttl": 60}, "shadow": {"model": "strong", "percent": 100}}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    labels = []
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG, temperature=0)
        assert raw.headers["x-edgeroute-route"] == "weak"
        labels.append(raw.headers["x-edgeroute-cache"])
    assert labels == ["miss", "hit"] and len(weak.options.requests) == 1

    async def mirrored() -> bool:
        return len(strong.options.requests) == 1

    await eventually(mirrored, "the answered request mirrored to the shadow model")
    await asyncio.sleep(0.1)
    assert len(strong.options.requests) == 1, "a cache hit is not mirrored"
    await client.close()
