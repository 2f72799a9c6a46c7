"""Anthropic clients and deployments with budgets: prompt-cache writes in the worst case.

Anthropic bills a prompt written to its cache above the input price (1.25x for five
minutes, 2x for an hour; `cache_write_per_mtok`). A reservation priced the prompt at the
input price only, so concurrent requests whose prompts were written to the cache overshot
a budget, though budgets promise that concurrent requests cannot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.providers_fixtures import provider_config, start_mock
from tests.test_cost_support import cost_proxy

__all__ = ["start_mock"]

ADMIN, APP = "sk-combos2-admin", "sk-combos2-app"
LIMIT = 0.03


async def test_concurrent_cache_writes_do_not_overshoot_a_budget(start_mock: Any, tmp_path: Path) -> None:
    # Every prompt is written to the cache whole, at ten times the input price.
    up = await start_mock("anthropic", cache_write_tokens=10**6, latency_ms=300)
    cfg = provider_config({"a": up})
    price = {"input_per_mtok": 10, "cache_write_per_mtok": 100, "output_per_mtok": 0}
    cfg["deployments"]["d-a"]["price"] = price
    cfg |= {
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "b", "scope": "team", "match": "t", "limit_usd": LIMIT, "period": "day"}]},
    }
    prompt = [{"role": "user", "content": "word " * 200}]  # ~210 tokens: $0.021 written, two do not fit $0.03
    async with cost_proxy(cfg) as proxy:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=APP, max_retries=0)

        async def one() -> int:
            try:
                msg = await client.messages.create(model="m", max_tokens=5, messages=prompt)  # type: ignore[arg-type]
            except anthropic.APIStatusError as e:
                return e.status_code
            assert msg.usage.cache_creation_input_tokens
            return 200

        statuses = sorted(await asyncio.gather(*(one() for _ in range(3))))
        await client.close()
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/admin/budgets", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                spent = next(b for b in (await r.json())["budgets"] if b["name"] == "b")["spent_usd"]
    assert spent <= LIMIT + 1e-9, f"${spent} spent against a ${LIMIT} budget ({statuses})"
    assert statuses == [200, 429, 429]


async def test_a_request_without_max_tokens_reserves_what_an_anthropic_deployment_may_write(
    start_mock: Any, tmp_path: Path
) -> None:
    """An OpenAI-format request (chat, Responses) sets no `max_tokens`: edgeroute sends an
    Anthropic deployment its provider's `default_max_tokens`, so that is what the answer may
    cost, and what a budget must reserve. It reserved `budgets.reserve_max_tokens` (4,096)
    whatever the default: with `default_max_tokens: 8000`, a $6 budget admitted a request
    reserved at $4.10 that wrote 8,000 tokens and spent $8."""
    up = await start_mock("anthropic", record=True, reply_words=10_000)
    cfg = provider_config({"a": up}, options={"a": {"default_max_tokens": 8000}})
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 0, "output_per_mtok": 1000}  # $0.001 a token
    cfg |= {
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "b", "scope": "team", "match": "t", "limit_usd": 6.0, "period": "day"}]},
    }
    say = [{"role": "user", "content": "Write at length."}]
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as e:
                await client.chat.completions.create(model="m", messages=say)  # type: ignore[arg-type]
            assert e.value.code == "budget_exceeded"
            with pytest.raises(openai.RateLimitError) as e:
                await client.responses.create(model="m", input="Write at length.")
            assert e.value.code == "budget_exceeded"
            assert up.options.requests == []  # refused before anything was spent
            # A request that bounds its answer within the budget is served, and what the
            # deployment got is that bound.
            got = await client.chat.completions.create(model="m", messages=say, max_tokens=3000)  # type: ignore[arg-type]
            assert got.usage is not None and got.usage.completion_tokens == 3000
            assert up.options.requests[-1]["body"]["max_tokens"] == 3000
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/admin/budgets", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                spent = next(b for b in (await r.json())["budgets"] if b["name"] == "b")["spent_usd"]
    assert spent == pytest.approx(3.0) and spent <= 6.0


def downgrading_config(a: Any, o: Any, tmp_path: Path) -> dict[str, Any]:
    """Model `m` on Anthropic mock `a`, downgraded to `cheap` (OpenAI mock `o`) from its first
    request's spend on."""
    cfg = provider_config({"a": a, "o": o})
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 0, "output_per_mtok": 1000}
    cfg["models"] = {"m": {"deployments": ["d-a"]}, "cheap": {"deployments": ["d-o"]}}
    downgrade = {"at_percent": 1, "action": "downgrade", "to": "cheap"}
    return cfg | {
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "g", "scope": "global", "limit_usd": 1.0, "actions": [downgrade]}]},
    }


async def test_a_downgrade_leaves_a_request_its_model_can_serve_where_it_is(start_mock: Any, tmp_path: Path) -> None:
    """A Messages request with Anthropic-only fields (`top_k`, `thinking`, ...) is served only by
    an Anthropic deployment (or one whose provider drops them). A budget's downgrade to a model
    with none turned it into a 400 `invalid_request_error` ("cannot honour top_k"), a client
    error for a valid request; it now stays on its model (the budget's block threshold still
    bounds the spend), while a plain request is downgraded as before."""
    a = await start_mock("anthropic", record=True)
    o = await start_mock("openai", record=True)
    cfg = downgrading_config(a, o, tmp_path)
    say = [{"role": "user", "content": "hi"}]
    async with cost_proxy(cfg) as proxy:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        served = []
        for _ in range(3):  # the first one crosses the threshold
            raw = await client.messages.with_raw_response.create(
                model="m", max_tokens=50, messages=say, extra_body={"top_k": 5}
            )
            assert (await raw.parse()).content[0].type == "text"
            served.append(raw.headers["x-edgeroute-deployment"])
        assert served == ["d-a"] * 3
        assert all(r["body"].get("top_k") == 5 for r in a.options.requests)
        plain = await client.messages.with_raw_response.create(model="m", max_tokens=50, messages=say)
        assert plain.headers["x-edgeroute-deployment"] == "d-o"  # downgraded
        await client.close()
