"""What funds the hedge budget (`hedge.budget_percent`): the requests sent lately, not every
decision since the start. Found by a red team (session 35, redH F1): 400 `/v1/route/explain`
calls (no upstream call, no spend) funded hedging every one of 20 slow requests that followed
at a 5 % budget, doubling their upstream calls; a quiet hour's requests did the same (the
window itself is the core's `hedge::tests::budget_forgets_requests_past_its_window`)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import simple_config
from tests.test_cache import stored

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def test_explanations_fund_no_hedges(start_upstream: Any, start_proxy: Any) -> None:
    slow, fast = await start_upstream(latency_ms=400), await start_upstream()
    cfg = simple_config({"slow": slow, "fast": fast})
    cfg["deployments"]["d-slow"]["weight"], cfg["deployments"]["d-fast"]["weight"] = 1000, 1
    cfg["models"]["m"]["hedge"] = {"delay_ms": 50, "budget_percent": 5}
    proxy = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for _ in range(400):
            async with s.post(proxy.url + "/v1/route/explain", json=BODY) as r:
                assert r.status == 200
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    async def hedged() -> bool:
        raw = await client.chat.completions.with_raw_response.create(**BODY)
        return raw.headers.get("x-edgeroute-hedged") == "true"

    got = await asyncio.gather(*(hedged() for _ in range(20)))
    assert sum(got) <= 1, f"{sum(got)} of 20 hedged at a 5 % budget"  # 5 % of the 20 sent


async def test_a_primary_that_hangs_while_its_hedges_win_loses_its_place_in_fastest(
    start_upstream: Any, start_proxy: Any
) -> None:
    """Found by a red team (session 35, redH F2): an attempt cancelled because its hedge won was
    reported as a client's cancellation, which says nothing of latency: a `fastest` primary that
    hung stayed first for all 40 requests, each paying for its cancelled attempt."""
    a, b = await start_upstream(record=True), await start_upstream(latency_ms=30)
    cfg = simple_config({"a": a, "b": b})
    cfg["models"]["m"]["strategy"] = "fastest"
    cfg["models"]["m"]["hedge"] = {"delay_ms": 100, "budget_percent": 100}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(10):  # both measured
        await client.chat.completions.create(**BODY)
    raw = await client.chat.completions.with_raw_response.create(**BODY)
    assert raw.headers["x-edgeroute-deployment"] == "d-a"  # the fastest
    a.options.latency_ms = 5000  # it hangs
    a.options.requests.clear()
    served = []
    for _ in range(5):
        raw = await client.chat.completions.with_raw_response.create(**BODY)
        served.append((raw.headers["x-edgeroute-deployment"], raw.headers.get("x-edgeroute-hedged") == "true"))
    assert served[0] == ("d-b", True)  # hedged once, to the deployment that answers
    assert served[1:] == [("d-b", False)] * 4  # then first, unhedged: a lost race is at least that slow
    assert len(a.options.requests) == 1


def _slow_hedged_route(slow: Any, fast: Any, **extra: Any) -> dict[str, Any]:
    """Model `m` over a slow deployment drawn first and a fast one, hedged after 50 ms at a 5 % budget."""
    cfg = simple_config({"slow": slow, "fast": fast}, **extra)
    cfg["deployments"]["d-slow"]["weight"], cfg["deployments"]["d-fast"]["weight"] = 1000, 1
    cfg["models"]["m"]["hedge"] = {"delay_ms": 50, "budget_percent": 5}
    return cfg


async def _hedged_of(client: openai.AsyncOpenAI, n: int, model: str = "m") -> int:
    """How many of `n` concurrent requests (each its own prompt: no cache hit) were hedged."""

    async def one(i: int) -> bool:
        body = BODY | {"model": model, "messages": [{"role": "user", "content": f"slow {i}"}]}
        raw = await client.chat.completions.with_raw_response.create(**body)
        return raw.headers.get("x-edgeroute-hedged") == "true"

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


@pytest.mark.parametrize("free", ["refused", "cache_hits"])
async def test_refusals_and_cache_hits_fund_no_hedges(free: str, start_upstream: Any, start_proxy: Any) -> None:
    """Found by a red team (session 35, redH F1's rest): every decision funded the hedge budget,
    a request refused at admission or answered from the cache too, so a client could bank hedges
    for free (refused requests, or one cached prompt asked again and again) and spend them on a
    slowdown: 20 of 20 slow requests hedged at a 5 % budget."""
    slow, fast = await start_upstream(latency_ms=400), await start_upstream()
    cfg = _slow_hedged_route(slow, fast, rate_limits={"models": {"m": {"rpm": 100_000, "tpm": 9_000}}})
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    await free_decisions(free, proxy, client)
    hedged = await _hedged_of(client, 20)
    assert hedged <= 1, f"{hedged} of 20 hedged at a 5 % budget"  # 5 % of the 20 (or 21) sent upstream


async def test_a_busy_route_funds_no_hedges_of_a_quiet_one(start_upstream: Any, start_proxy: Any) -> None:
    """Found by a red team (session 35, redH F1's rest): one hedge budget served every route, so
    a busy route's requests let a quiet route hedge every one of its requests (each route's
    `budget_percent` of the other's traffic)."""
    slow, fast, other = await start_upstream(latency_ms=400), await start_upstream(), await start_upstream()
    cfg = _slow_hedged_route(slow, fast)
    cfg["providers"]["other"] = {"base_url": other.base_url, "api_key": "key-other"}
    cfg["deployments"]["d-other"] = cfg["deployments"]["d-fast"] | {"provider": "other"}
    cfg["models"]["busy"] = {"deployments": ["d-fast", "d-other"], "hedge": {"delay_ms": 50, "budget_percent": 5}}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(10):  # 200 requests of the busy route (funding 10 hedges of its own)
        await _hedged_of(client, 20, "busy")
    hedged = await _hedged_of(client, 20)
    assert hedged <= 1, f"{hedged} of the quiet route's 20 hedged at a 5 % budget"


async def free_decisions(free: str, proxy: Any, client: openai.AsyncOpenAI) -> None:
    """400 decisions that send nothing upstream: requests over the model's TPM refused at
    admission (`free == "refused"`), or hits of one cached prompt (the route caches)."""
    if free == "refused":
        async with aiohttp.ClientSession() as s:
            for _ in range(400):  # each over the model's TPM: refused at admission, after its decision
                async with s.post(proxy.url + "/v1/chat/completions", json=BODY | {"max_tokens": 10_000}) as r:
                    assert r.status == 429, await r.text()
    else:
        cached = BODY | {
            "messages": [{"role": "user", "content": "the same question"}],
            "temperature": 0,
            "max_tokens": 100,
        }
        await client.chat.completions.create(**cached)  # stored (whole: not cut by its max_tokens)
        await stored(proxy)
        for _ in range(400):
            raw = await client.chat.completions.with_raw_response.create(**cached)
            assert raw.headers["x-edgeroute-cache"] == "hit"
