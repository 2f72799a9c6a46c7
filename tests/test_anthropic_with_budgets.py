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
