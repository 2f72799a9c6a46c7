"""Budgets with a downgrade to a hedged route: the reservation covers the hedge.

Admission reserves twice a request's worst case when its decision hedges (a lost hedge is
billed for its prompt). After a budget's downgrade the reservation for the target route was
made as if it never hedged, so concurrent downgraded requests each reserved one prompt and
spent two, and the budget was overshot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.test_cost_support import cost_proxy

BIG = {"input_per_mtok": 1e6, "output_per_mtok": 0}  # $1 a prompt token: the first request spends past half
SMALL = {"input_per_mtok": 1e5, "output_per_mtok": 0}  # $0.1 a prompt token
LIMIT = 15.0


async def test_a_downgrade_to_a_hedged_route_never_overshoots_the_budget(start_upstream: Any, tmp_path: Path) -> None:
    big, slow, fast = await start_upstream(), await start_upstream(latency_ms=400), await start_upstream()
    cfg: dict[str, Any] = {
        "providers": {n: {"base_url": u.base_url} for n, u in (("big", big), ("slow", slow), ("fast", fast))},
        "deployments": {
            "d-big": {"provider": "big", "model": "gpt-4o", "price": BIG},
            "d-slow": {"provider": "slow", "model": "gpt-4o-mini", "weight": 1000, "price": SMALL},
            "d-fast": {"provider": "fast", "model": "gpt-4o-mini", "weight": 1, "price": SMALL},
        },
        "models": {
            "m": {"deployments": ["d-big"]},
            "small": {"deployments": ["d-slow", "d-fast"], "hedge": {"delay_ms": 50, "budget_percent": 100}},
        },
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        "budgets": {
            "limits": [
                {
                    "name": "month",
                    "scope": "global",
                    "limit_usd": LIMIT,
                    "actions": [
                        {"at_percent": 50, "action": "downgrade", "to": "small"},
                        {"at_percent": 100, "action": "block"},
                    ],
                }
            ]
        },
    }
    messages = [{"role": "user", "content": "hi"}]
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
            first = await client.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=5)
            assert first.headers["x-edgeroute-deployment"] == "d-big"

            async def one() -> str:
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model="m", messages=messages, max_tokens=5
                    )
                except openai.APIStatusError as e:
                    return str(e.status_code)
                return raw.headers.get("x-edgeroute-hedged", "false")

            outcomes = await asyncio.gather(*(one() for _ in range(6)))
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/budgets") as r:
            spent = (await r.json())["budgets"][0]["spent_usd"]
    assert "true" in outcomes, f"no downgraded request hedged: {outcomes}"
    assert "429" in outcomes, f"the budget refused none: {outcomes}"
    assert spent <= LIMIT, f"${spent:.2f} spent against a ${LIMIT} budget ({outcomes})"
