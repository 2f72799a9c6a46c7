"""A budget's `notify` threshold is told when its spend passes it, not a request's worst case.

It was told at admission, when the reservation (a request without `max_tokens` reserves
`reserve_max_tokens` at the dearest deployment it may reach) took the budget past the
threshold: a $1 budget whose requests cost $0.10 each but may cost $0.51 was told "50 %
reached" at the first request, with $0 spent; told once a period, the real crossing, at the
fifth, went untold. Real app, the official SDK, a webhook receiver."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import eventually
from tests.test_cost_support import cost_proxy

# $0.10 a request, plus $100 per million output tokens: a few cents at most for the mock's
# answers, but $0.41 for the 4,096 tokens a request without max_tokens is reserved for.
PRICE = {"input_per_mtok": 0, "output_per_mtok": 100, "per_request": 0.10}


async def test_a_threshold_is_told_when_spend_passes_it_not_a_reservation(
    start_upstream: Any, tmp_path: Path, hook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, told = hook
    up = await start_upstream()
    budget = {
        "name": "team-month",
        "scope": "global",
        "limit_usd": 1.0,
        "actions": [{"at_percent": 50, "action": "notify", "webhook": url}],
    }
    cfg = {
        "providers": {"a": {"base_url": up.base_url, "api_key": "key-a"}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": PRICE}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [budget]},
    }
    async with (
        cost_proxy(cfg) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client,
    ):

        async def ask() -> float:
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
            return float(raw.headers["x-edgeroute-cost-usd"])

        spent = [await ask() for _ in range(4)]
        assert 0.40 <= sum(spent) < 0.5, spent
        await asyncio.sleep(0.5)  # a notification is sent off the request path: time to arrive
        assert told == []  # $0.40 of $1: under 50 %, whatever the requests might have cost

        spent.append(await ask())

        async def arrived() -> bool:
            return len(told) == 1

        await eventually(arrived, "the 50 % notification")
        (event,) = told
        assert event["budget"] == "team-month" and event["threshold_percent"] == 50
        assert event["used_usd"] == pytest.approx(sum(spent), abs=1e-6)  # what was spent, no reservation in it
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await asyncio.sleep(0.3)
        assert len(told) == 1  # once a period
