"""Cached embeddings with budgets: as on chat, a hit costs nothing, so a budget without room
for a new request's worst case still lets a hit through (the README's promise).

`/v1/embeddings` asked the budget before the cache: a repeated input whose vectors the cache
held was refused with 429 while the budget had two thirds left, and `only-if-cached` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.test_cost_support import cost_proxy

PRICE = 1000.0  # USD per million input tokens: the input below (4 tokens) costs $0.004
LIMIT = 0.012  # room for the first request's reservation; not, once it is spent, for another's


async def test_a_spent_budget_still_lets_a_cached_embedding_through(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    cfg = {
        "providers": {"oa": {"base_url": up.base_url, "api_key": "k"}},
        "deployments": {
            "emb": {"provider": "oa", "model": "text-embedding-3-small", "price": {"input_per_mtok": PRICE}}
        },
        "models": {"embed": {"deployments": ["emb"], "cache": {"ttl": 60}}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "day", "scope": "global", "limit_usd": LIMIT, "period": "day"}]},
    }
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        seen = []
        for headers in ({}, {}, {"x-edgeroute-cache": "only-if-cached"}):
            raw = await client.embeddings.with_raw_response.create(
                model="embed", input="alpha beta gamma delta", extra_headers=headers
            )
            seen.append((raw.headers["x-edgeroute-cache"], raw.headers["x-edgeroute-cost-usd"]))
        assert seen == [("miss", "0.00400000"), ("hit", "0.00000000"), ("hit", "0.00000000")]
        # The premise: new input, which would cost money, is refused by the budget.
        with pytest.raises(openai.RateLimitError) as refused:
            await client.embeddings.create(model="embed", input="epsilon zeta eta theta")
        assert "Budget 'day'" in refused.value.message
        await client.close()
    assert sum(1 for r in up.options.requests if r.get("path") == "/v1/embeddings") == 1
