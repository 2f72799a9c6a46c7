"""Uptime behaviour seen through the openai SDK: failover, rate limits, hedging,
shedding, client disconnects, active health checks, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import pytest

from tests.conftest import eventually, simple_config
from tests.metrics_support import scrape

MSG = [{"role": "user", "content": "hello"}]


async def test_failover_to_healthy_deployment(start_upstream, start_proxy) -> None:
    bad = await start_upstream(fail_status=503)
    good = await start_upstream()
    proxy = await start_proxy(simple_config({"bad": bad, "good": good}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(6):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG)
        assert raw.headers["x-edgeroute-deployment"] == "d-good"
        assert raw.parse().choices[0].message.content
    await client.close()


async def test_failover_chain_to_another_model(start_upstream, start_proxy) -> None:
    bad, good = await start_upstream(fail_status=500), await start_upstream()
    cfg = simple_config({"bad": bad, "good": good})
    cfg["models"] = {
        "primary": {"deployments": ["d-bad"], "fallbacks": ["backup"]},
        "backup": {"deployments": ["d-good"]},
    }
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="primary", messages=MSG)
    assert raw.headers["x-edgeroute-deployment"] == "d-good"
    assert raw.headers["x-edgeroute-attempts"] == "2"
    await client.close()


async def test_rate_limited_deployment_cools_down_until_retry_after(start_upstream, start_proxy) -> None:
    limited = await start_upstream(fail_status=429, record=True)
    ok = await start_upstream()
    cfg = simple_config({"limited": limited, "ok": ok})
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(10):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG)
        assert raw.headers["x-edgeroute-deployment"] == "d-ok"
    # Without Retry-After the core cools the deployment for a second: it saw one request, not five.
    assert len(limited.options.requests) == 1
    await client.close()


async def test_all_rate_limited_is_429_with_retry_after(start_upstream, start_proxy) -> None:
    a = await start_upstream(fail_status=429)
    proxy = await start_proxy(simple_config({"a": a}, retry={"max_retry_after_s": 0}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        await client.chat.completions.create(model="m", messages=MSG)
    assert e.value.status_code == 429
    await client.close()


async def test_client_error_is_returned_not_retried(start_upstream, start_proxy) -> None:
    a = await start_upstream(fail_status=400, record=True)
    b = await start_upstream(record=True)
    proxy = await start_proxy(
        simple_config({"a": a, "b": b}, models={"m": {"deployments": ["d-a", "d-b"], "strategy": "weighted"}})
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    statuses = []
    for _ in range(2):
        try:
            await client.chat.completions.create(model="m", messages=MSG)
            statuses.append(200)
        except openai.BadRequestError as e:
            statuses.append(e.status_code)
    # One of the two requests went to `a` first and got its 400 back, without a retry at `b`.
    assert sorted(statuses) == [200, 400]
    assert len(a.options.requests) + len(b.options.requests) == 2
    await client.close()


async def _is(read: Callable[[], Awaitable[str]], want: str) -> bool:
    return await read() == want


async def test_hedge_answers_from_the_fast_deployment(start_upstream, start_proxy) -> None:
    # The slow one answers long after any hedge could (its handler is not awaited at teardown).
    slow = await start_upstream(latency_ms=5000, record=True)
    fast = await start_upstream(record=True)
    cfg = simple_config({"slow": slow, "fast": fast})
    cfg["models"] = {
        "m": {
            "deployments": ["d-slow", "d-fast"],
            "strategy": "weighted",
            "hedge": {"delay_ms": 100, "budget_percent": 100},
        }
    }
    cfg["deployments"]["d-slow"]["weight"] = 1000  # the slow one is always the first choice
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    t0 = time.perf_counter()
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG)
    elapsed = time.perf_counter() - t0
    assert raw.headers["x-edgeroute-deployment"] == "d-fast"
    assert raw.headers["x-edgeroute-hedged"] == "true"
    assert elapsed < 4.0  # answered by the hedge at 100 ms, not after the slow one's 5 s
    rec = proxy.recorder.records[-1]
    outcomes = sorted((a.deployment, a.outcome, a.hedge) for a in rec.attempts)
    assert outcomes == [("d-fast", "success", True), ("d-slow", "cancelled", False)]
    # Both attempts are costed: the loser at its prompt tokens, the winner at its usage.
    assert all(a.cost_usd > 0 for a in rec.attempts)
    assert rec.cost_usd == pytest.approx(sum(a.cost_usd for a in rec.attempts))
    m = await scrape(proxy.url)
    assert m.value("edgeroute_hedges_total", route="m") == 1
    assert m.value("edgeroute_hedge_wins_total", route="m") == 1
    await client.close()


async def test_load_shedding_answers_503_at_once(start_upstream, start_proxy) -> None:
    slow = await start_upstream(latency_ms=500)
    proxy = await start_proxy(simple_config({"a": slow}, server={"max_in_flight": 2}))
    async with aiohttp.ClientSession() as s:
        body = {"model": "m", "messages": MSG}

        async def post() -> tuple[int, str | None, float]:
            async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status, r.headers.get("Retry-After"), time.monotonic()

        results = await asyncio.gather(*[post() for _ in range(6)])
    shed = [r for r in results if r[0] == 503]
    served = [r for r in results if r[0] == 200]
    assert len(served) == 2
    assert len(shed) == 4
    assert all(r[1] == "1" for r in shed)
    # At once: each refusal came before either admitted request's 0.5 s upstream answer, not
    # after a slot freed (judged by order, which a stall of the host delays alike).
    assert max(r[2] for r in shed) < min(r[2] for r in served)


async def test_client_disconnect_cancels_upstream(start_upstream, start_proxy) -> None:
    slow = await start_upstream(latency_ms=3000)
    proxy = await start_proxy(simple_config({"a": slow}))
    async with aiohttp.ClientSession() as s:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await s.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": MSG})
    # Recorded once the proxy has seen the client go (cancelled at once; not served after 3 s).
    records = await eventually(lambda: asyncio.sleep(0, proxy.recorder.records), "the request's record", within=10)
    rec = records[-1]
    assert rec.attempts[0].outcome == "cancelled"
    assert rec.outcome == "client_gone"
    live = proxy.app[__import__("edgeroute.state", fromlist=["STATE"]).STATE].live
    assert live.router.health(0)["in_flight"] == 0


async def test_active_health_check_ejects_and_restores(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    other = await start_upstream()
    cfg = simple_config({"a": up, "b": other}, health={"base_ejection_ms": 600_000})
    cfg["providers"]["a"]["health_check"] = {"interval": 0.05, "timeout": 1}
    proxy = await start_proxy(cfg)

    async def circuit() -> str:
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
            deps = {d["name"]: d for d in (await r.json())["deployments"]}
            return str(deps["d-a"]["circuit"])

    up.options.fail_status = 503  # an outage: the probe sees it before any user request does
    await eventually(lambda: _is(circuit, "open"), "the probe's ejection", within=10)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(4):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG)
        assert raw.headers["x-edgeroute-deployment"] == "d-b"
    up.options.fail_status = None  # back: restored long before the 10-minute ejection would end
    await eventually(lambda: _is(circuit, "closed"), "the probe's restoration", within=10)
    served = set()
    for _ in range(4):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG)
        served.add(raw.headers["x-edgeroute-deployment"])
    assert served == {"d-a", "d-b"}
    await client.close()


async def test_metrics_exposition(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    await client.chat.completions.create(model="m", messages=MSG)
    m = await scrape(proxy.url)
    assert m.value("edgeroute_requests_total", route="m", status="200", outcome="ok") == 1
    assert m.value("edgeroute_attempts_total", deployment="d-a", outcome="success", kind="first") == 1
    assert m.value("edgeroute_deployment_circuit_state", deployment="d-a") == 0
    await client.close()


async def test_context_window_error_goes_to_larger_model(start_upstream, start_proxy) -> None:
    small = await start_upstream(fail_status=400, record=True)
    large = await start_upstream(record=True)
    # The mock's 400 body is generic; make it a context-length error the way OpenAI words it.
    cfg = simple_config({"small": small, "large": large})
    cfg["deployments"]["d-small"]["context_window"] = 8000
    cfg["deployments"]["d-large"]["context_window"] = 128000
    cfg["models"] = {
        "m": {"deployments": ["d-small"], "fallbacks_on": {"context_window": ["big"]}},
        "big": {"deployments": ["d-large"]},
    }
    proxy = await start_proxy(cfg)
    small.options.fail_message = "This model's maximum context length is 8000 tokens."
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG)
    assert raw.headers["x-edgeroute-deployment"] == "d-large"
    # Without a larger model configured, the client gets the upstream's 400, not a 502.
    cfg["models"]["m"]["fallbacks_on"] = {}
    proxy2 = await start_proxy(cfg)
    client2 = openai.AsyncOpenAI(base_url=proxy2.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client2.chat.completions.create(model="m", messages=MSG)
    assert "maximum context length" in e.value.message
    await client.close()
    await client2.close()
