"""Budgets with fallbacks by error class (`fallbacks_on`): a reservation covers every
deployment the request may reach, so a budget is never overshot.

Admission reserves a request's worst case at the highest price of the decision's order,
which holds the route's deployments and its `fallbacks`, not the deployments `fallbacks_on`
adds when an attempt fails (`rate_limited`, `context_window`, `capacity`...). Those are
often the pricier models, so a request reserved at the cheap price was billed at the dear one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.test_cost_support import cost_proxy

MAX_TOKENS = 5
CHEAP = {"input_per_mtok": 0, "output_per_mtok": 2.0}  # 5 tokens: $0.00001
DEAR = {"input_per_mtok": 0, "output_per_mtok": 200.0}  # 5 tokens: $0.001
LIMIT = 5 * 1e-5  # room for five requests at the cheap price, for none at the dear one


@pytest.mark.xfail(
    strict=True,
    reason="cost/control.py (being split by another helper) reserves at `_Prices.top(decision.order)`, "
    "and the deployments of the route's `fallbacks_on` models are not in the order: $0.005 spent "
    "against a $0.00005 budget. Fix there: `top(order, table, route)` keyed by (route, *order), "
    "the ceiling over the order's prices plus those of every deployment of the models in "
    "`self.config.models[route].fallbacks_on` (tried, it passes this test).",
)
async def test_a_fallback_by_error_class_never_overshoots_a_budget(start_upstream: Any, tmp_path: Path) -> None:
    limited = await start_upstream(fail_status=429, fail_message="Rate limit reached")
    dear = await start_upstream(reply_words=40, record=True)
    cfg: dict[str, Any] = {
        "providers": {"cheap": {"base_url": limited.base_url}, "dear": {"base_url": dear.base_url}},
        "deployments": {
            "d-cheap": {"provider": "cheap", "model": "gpt-4o-mini", "price": CHEAP},
            "d-dear": {"provider": "dear", "model": "gpt-4o", "price": DEAR},
        },
        "models": {
            "m": {"deployments": ["d-cheap"], "fallbacks_on": {"rate_limited": ["big"]}},
            "big": {"deployments": ["d-dear"]},
        },
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        "budgets": {"limits": [{"name": "day", "scope": "global", "limit_usd": LIMIT, "period": "day"}]},
    }
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

        async def one() -> int:
            try:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
                )
            except openai.APIStatusError as e:
                return e.status_code
            return 200

        statuses = await asyncio.gather(*(one() for _ in range(5)))
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/budgets") as r:
            spent = (await r.json())["budgets"][0]["spent_usd"]
    assert statuses.count(200) == len(dear.options.requests), "every answer came from the fallback"
    assert spent <= LIMIT, f"${spent} spent against a ${LIMIT} budget ({statuses})"
