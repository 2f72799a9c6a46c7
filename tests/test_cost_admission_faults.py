"""Admission faults: what a request reserves and takes, and what it gives back.

Each test is what a client sees (statuses, error codes, rate-limit headers, spend) when
admission got the amount wrong: `n` choices, prices after a reload, a downgrade with
Redis, refused requests, provider TPM settlement, and a downgrade's target limits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from edgeroute import config as config_mod
from edgeroute.cost import budgets as B
from tests.governance_support import served_file
from tests.test_cost_support import RedisServer, cost_proxy

HI = [{"role": "user", "content": "hi"}]


def _deployment(provider: str, output_per_mtok: float) -> dict[str, Any]:
    return {
        "provider": provider,
        "model": "gpt-4o-mini",
        "price": {"input_per_mtok": 0, "output_per_mtok": output_per_mtok},
    }


def _two_models(base_url: str, smart_price: float, cheap_price: float, **extra: Any) -> dict[str, Any]:
    """Models `smart` (deployment d-big) and `cheap` (d-small) on one upstream."""
    cfg: dict[str, Any] = {
        "providers": {"p": {"base_url": base_url}},
        "deployments": {"d-big": _deployment("p", smart_price), "d-small": _deployment("p", cheap_price)},
        "models": {"smart": {"deployments": ["d-big"]}, "cheap": {"deployments": ["d-small"]}},
    }
    cfg.update(extra)
    return cfg


def _client(url: str, key: str = "x") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


async def _status(client: openai.AsyncOpenAI, model: str, **kw: Any) -> tuple[int, str | None]:
    """(status, error code) of one chat request."""
    try:
        await client.chat.completions.create(model=model, messages=HI, **kw)
        return 200, None
    except openai.APIStatusError as e:
        return e.status_code, e.code


async def test_n_choices_reserve_and_count_n_completions(start_upstream) -> None:
    up = await start_upstream(reply_words=40)
    # One completion of 100 tokens costs $0.10 at most; the budget has room for two and a half.
    cfg = _two_models(
        up.base_url,
        1000.0,
        1000.0,
        budgets={"limits": [{"name": "g", "scope": "global", "limit_usd": 0.25, "period": "day"}]},
        rate_limits={"models": {"cheap": {"tpm": 150}}},
    )
    async with cost_proxy(cfg) as proxy:
        client = _client(proxy.url)
        # Three choices may cost $0.30: more than the whole budget, refused before any spend.
        assert await _status(client, "smart", max_tokens=100, n=3) == (429, "budget_exceeded")
        assert await _status(client, "smart", max_tokens=100, n=1) == (200, None)
        # Two choices of 60 tokens are 120 completion tokens (+ the prompt) against 150 per minute...
        assert await _status(client, "cheap", max_tokens=60, n=2) == (200, None)
        # ...and three can never fit.
        with pytest.raises(openai.RateLimitError) as ei:
            await client.chat.completions.create(model="cheap", messages=HI, max_tokens=60, n=3)
        assert "Request too large for model 'cheap'" in ei.value.message
        await client.close()


async def test_reload_reserves_at_the_new_prices(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream(reply_words=60, record=True)
    budget = {"limits": [{"name": "g", "scope": "global", "limit_usd": 0.5, "period": "day"}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_two_models(up.base_url, 1.0, 1.0, budgets=budget)))
    async with served_file(path) as url:  # `/admin/reload` rereads the file
        client = _client(url)
        assert await _status(client, "smart", max_tokens=1000) == (200, None)
        # At $20,000 per million output tokens, 1000 tokens may cost $20: over the $0.50 budget.
        path.write_text(yaml.safe_dump(_two_models(up.base_url, 20000.0, 1.0, budgets=budget)))
        async with aiohttp.ClientSession() as s, s.post(url + "/admin/reload") as r:
            assert r.status == 200
        assert await _status(client, "smart", max_tokens=1000) == (429, "budget_exceeded")
        assert len(up.options.requests) == 1  # refused at admission, never sent
        assert await _status(client, "cheap", max_tokens=1000) == (200, None)
        await client.close()


async def test_redis_downgrade_reserves_once(start_upstream, tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # skips when redis-server is not installed
    server.start()
    try:
        up = await start_upstream(reply_words=5)
        prefix = f"edgeroute-test-{os.getpid()}-{os.urandom(4).hex()}"
        cfg = _two_models(
            up.base_url,
            400.0,
            100.0,
            shared_state={"redis_url": server.url, "prefix": prefix, "timeout_ms": 2000},
            budgets={"limits": [{"name": "g", "scope": "global", "limit_usd": 1.0, "actions": [
                {"at_percent": 50, "action": "downgrade", "to": "cheap"}, {"at_percent": 100, "action": "block"}]}]},
        )  # fmt: skip
        import redis.asyncio as aioredis

        budget = config_mod.parse(cfg, "test.yaml").budgets.limits[0]
        key = f"{prefix}:b:g:*:{B.period_of(budget, time.time()).id}"
        r = aioredis.Redis.from_url(server.url)
        await r.set(key, round(0.55 * B.NANO))  # 55% spent: smart ($0.40 at most) is downgraded
        async with cost_proxy(cfg) as proxy:
            client = _client(proxy.url)
            raw = await client.chat.completions.with_raw_response.create(model="smart", messages=HI, max_tokens=1000)
            # $0.55 + cheap's $0.10 fits; the smart reservation must be gone before cheap's is made.
            assert raw.headers["x-edgeroute-route"] == "cheap"
            cost = B.to_nano(float(raw.headers["x-edgeroute-cost-usd"]))
            await client.close()
        assert int(await r.get(key) or 0) == round(0.55 * B.NANO) + cost  # settled: no reservation left
        await r.aclose()
    finally:
        server.stop()


async def test_refused_requests_give_back_their_token_estimates(start_upstream) -> None:
    up = await start_upstream(reply_words=5)
    cfg = {
        "providers": {"p": {"base_url": up.base_url}},
        "deployments": {"d1": _deployment("p", 1000.0), "d2": _deployment("p", 1.0), "d3": _deployment("p", 1.0)},
        "models": {"m1": {"deployments": ["d1"]}, "m2": {"deployments": ["d2"]}, "m3": {"deployments": ["d3"]}},
        "keys": {"alice": {"token": "tok-alice", "limits": {"rpm": 10, "tpm": 1000}}},
        "rate_limits": {"deployments": {"d2": {"rpm": 1}}},
        "budgets": {"limits": [{"name": "m1-day", "scope": "model", "match": "m1", "limit_usd": 0.1, "period": "day"}]},
    }
    async with cost_proxy(cfg) as proxy:
        client = _client(proxy.url, "tok-alice")
        # Refused by its budget ($0.90 at most): its 900 tokens go back to alice's 1000 per minute.
        assert await _status(client, "m1", max_tokens=900) == (429, "budget_exceeded")
        assert await _status(client, "m2", max_tokens=900) == (200, None)  # settled to the few it used
        # d2 is at its provider limit: that refusal gives its 900 back too.
        assert await _status(client, "m2", max_tokens=900) == (429, "upstream_rate_limited")
        raw = await client.chat.completions.with_raw_response.create(model="m3", messages=HI, max_tokens=900)
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100
        # The requests still count against alice's requests per minute, as OpenAI counts them.
        assert raw.headers["x-ratelimit-remaining-requests"] == "6"
        await client.close()


async def test_deployment_tpm_settles_to_actual_tokens(start_upstream) -> None:
    up = await start_upstream(reply_words=400)  # ~400 completion tokens each, no max_tokens asked
    cfg = {
        "providers": {"p": {"base_url": up.base_url}},
        "deployments": {"d1": _deployment("p", 1.0)},
        "models": {"m": {"deployments": ["d1"]}},
        "rate_limits": {"deployments": {"d1": {"tpm": 1000}}},
    }
    async with cost_proxy(cfg) as proxy:
        client = _client(proxy.url)
        statuses = [await _status(client, "m") for _ in range(5)]
        await client.close()
    # Each settles to its ~410 tokens (held at its take, the first would refuse the second). Two
    # leave less than a request without max_tokens must find (its prompt and a quarter of the
    # limit for its output): the only deployment then refuses.
    assert statuses[:2] == [(200, None)] * 2
    assert statuses[2:] == [(429, "upstream_rate_limited")] * 3


async def test_downgraded_requests_take_the_target_models_rate_limit(start_upstream) -> None:
    up = await start_upstream(reply_words=40, record=True)
    cfg = _two_models(
        up.base_url,
        2.0,
        0.2,
        rate_limits={"models": {"cheap": {"rpm": 2}}},
        budgets={"limits": [{"name": "g", "scope": "global", "limit_usd": 1.0,
                             "actions": [{"at_percent": 0.0001, "action": "downgrade", "to": "cheap"}]}]},
    )  # fmt: skip
    async with cost_proxy(cfg) as proxy:
        client = _client(proxy.url)
        assert await _status(client, "cheap", max_tokens=5) == (200, None)  # spend > 0: smart is downgraded
        raw = await client.chat.completions.with_raw_response.create(model="smart", messages=HI, max_tokens=5)
        assert raw.headers["x-edgeroute-route"] == "cheap"
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as ei:
            await client.chat.completions.create(model="smart", messages=HI, max_tokens=5)
        assert ei.value.code == "rate_limit_exceeded" and "model 'cheap'" in ei.value.message
        await client.close()
    assert len(up.options.requests) == 2
