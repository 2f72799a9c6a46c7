"""The response cache with budgets: a hit costs nothing and, as the README says, reserves no
budget, so a budget with room left does not refuse a request the cache answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.test_cost_support import cost_proxy, one_deployment

MSG: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
COST = 5 * 2.0 / 1e6  # max_tokens 5 at $2 per million output tokens (input is free here)


@pytest.mark.xfail(
    strict=True,
    reason="admission (cost/control.py, being split by another helper) reserves the request's "
    "worst-case cost before the cache is looked up, so a hit is refused when that reservation "
    "does not fit what is left. Fix there: let the endpoint admit a request it can answer from "
    "the cache (the plan's entry, prefetched or looked up first) with rate limits only, no "
    "budget reservation; or look up before admission and pass `free=True` to `admit`.",
)
async def test_a_budget_with_room_left_does_not_refuse_a_cache_hit(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True, reply_words=40)
    cfg = one_deployment(
        up.base_url,
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        budgets={"limits": [{"name": "day", "scope": "global", "limit_usd": COST * 1.5, "period": "day"}]},
    )
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        labels = []
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=MSG, temperature=0, max_tokens=5
            )
            labels.append(raw.headers["x-edgeroute-cache"])
        assert labels == ["miss", "hit", "hit"]
        assert len(up.options.requests) == 1
        # A new question would cost more than the budget has left: refused, as it should be.
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "And of Spain?"}], temperature=0, max_tokens=5
            )
