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

from tests.conftest import simple_config

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
