"""Rate limits: RPM/TPM per key and model with OpenAI's headers; provider limits per deployment."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from edgeroute.cost.limits import LocalLimiter, Take, duration
from tests.test_cost_support import cost_proxy, one_deployment

HELLO = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


async def test_key_rpm_429_with_openai_headers(start_upstream) -> None:
    up = await start_upstream()
    cfg = one_deployment(
        up.base_url,
        keys={"k1": {"token": "tok-1", "limits": {"rpm": 3}}, "k2": {"token": "tok-2"}},
        rate_limits={"per_key": {"rpm": 100, "tpm": 1_000_000}},
    )
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        url = proxy.url + "/v1/chat/completions"
        seen = []
        for _ in range(4):
            async with s.post(url, json=HELLO, headers={"Authorization": "Bearer tok-1"}) as r:
                seen.append((r.status, dict(r.headers), await r.json()))
        assert [x[0] for x in seen] == [200, 200, 200, 429]
        h = seen[0][1]
        assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "2"
        assert h["x-ratelimit-reset-requests"].endswith("s")
        _, h, body = seen[3]
        assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_error"
        assert "key 'k1'" in body["error"]["message"] and "tok-1" not in str(body)
        assert int(h["Retry-After"]) >= 1
        assert h["x-ratelimit-remaining-requests"] == "0"
        # Another key has its own bucket (the per_key default).
        async with s.post(url, json=HELLO, headers={"Authorization": "Bearer tok-2"}) as r:
            assert r.status == 200
            assert r.headers["x-ratelimit-limit-requests"] == "100"
            assert r.headers["x-ratelimit-limit-tokens"] == "1000000"


async def test_model_tpm_counts_prompt_and_max_tokens(start_upstream) -> None:
    up = await start_upstream(latency_ms=300)
    cfg = one_deployment(up.base_url, rate_limits={"models": {"m": {"tpm": 1000}}})
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

        def ask(max_tokens: int) -> Any:
            return client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens
            )

        # While the first is in flight its estimate (prompt + 600) is held: a second 600 does not fit.
        slow = asyncio.ensure_future(ask(600))
        await asyncio.sleep(0.1)
        with pytest.raises(openai.RateLimitError) as ei:
            await ask(600)
        assert "tokens per minute on model 'm'" in ei.value.message
        raw = await slow
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 400
        # Settlement gave back what the first did not use.
        raw = await ask(600)
        assert raw.parse().choices
        with pytest.raises(openai.RateLimitError) as ei:
            await ask(5000)
        assert "Request too large" in ei.value.message
        await client.close()


def _preferred_and_spare(a_url: str, b_url: str, limits: dict[str, Any]) -> dict[str, Any]:
    """Model `m` on d-a (weighted to take nearly everything) and d-b, with provider limits."""
    return {
        "providers": {"a": {"base_url": a_url}, "b": {"base_url": b_url}},
        "deployments": {
            "d-a": {"provider": "a", "model": "gpt-4o-mini", "weight": 100},
            "d-b": {"provider": "b", "model": "gpt-4o-mini", "weight": 1},
        },
        "models": {"m": {"deployments": ["d-a", "d-b"]}},
        "rate_limits": {"deployments": limits},
    }


async def test_deployment_limit_routes_around_it(start_upstream) -> None:
    a = await start_upstream(record=True)
    b = await start_upstream(record=True)
    cfg = _preferred_and_spare(a.base_url, b.base_url, {"d-a": {"rpm": 5}})
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        served = []
        for _ in range(20):
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
            served.append(raw.headers["x-edgeroute-deployment"])
        await client.close()
    # d-a takes at most its 5 per minute (plus what refills in the test's second); the rest go to d-b.
    assert served.count("d-a") <= 6
    assert len(a.options.requests) == served.count("d-a")
    assert served.count("d-b") >= 14


async def test_the_deployment_rerouted_to_takes_its_own_limit(start_upstream) -> None:
    a = await start_upstream(record=True)
    b = await start_upstream(record=True)
    cfg = _preferred_and_spare(a.base_url, b.base_url, {"d-a": {"rpm": 5}, "d-b": {"rpm": 5}})
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        refused = 0
        for _ in range(20):
            try:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            except openai.RateLimitError as e:
                assert e.code == "upstream_rate_limited"
                refused += 1
        await client.close()
    # Each provider sees at most its 5 per minute (plus what refills in the test's second).
    assert len(a.options.requests) <= 6 and len(b.options.requests) <= 6
    assert refused >= 8


def test_bucket_refill_and_debt() -> None:
    lim = LocalLimiter()
    t = [Take("key:x", "requests", 60, 1)]
    for _ in range(60):
        assert lim.take(t, now=100.0)[0]
    ok, states = lim.take(t, now=100.0)
    assert not ok and states[0].wait_s == pytest.approx(1.0)
    assert lim.take(t, now=101.0)[0]  # one per second comes back
    lim.adjust("key:x", "requests", 5, now=101.0)  # settlement found more was used: debt
    ok, states = lim.take(t, now=101.5)
    assert not ok and states[0].wait_s > 5
    assert duration(0.25) == "250ms" and duration(1.2) == "2s" and duration(360) == "6m0s"


def test_refilled_buckets_can_be_forgotten_and_start_full_again() -> None:
    """Per-address buckets are dropped once refilled (bounded memory); one still in use is kept."""
    lim = LocalLimiter()
    assert lim.take([Take("addr:a", "requests", 60, 1)], now=0.0)[0]
    assert lim.take([Take("addr:b", "requests", 60, 60)], now=0.0)[0]  # b empties its bucket
    lim.forget_full(now=1.5)  # a has refilled (1 a second); b is still short of 58.5
    assert len(lim) == 1
    assert not lim.take([Take("addr:b", "requests", 60, 2)], now=1.5)[0]  # b's debt survived
    assert lim.take([Take("addr:a", "requests", 60, 60)], now=1.5)[0]  # a starts full again
