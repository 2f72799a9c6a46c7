"""The response cache with budgets: a hit costs nothing and, as the README says, reserves no
budget, so a budget with room left does not refuse a request the cache answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.test_cost_support import cost_proxy, one_deployment

MSG: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 20
RESERVED = MAX_TOKENS * 2.0 / 1e6  # the worst case at $2 per million output tokens (input is free here)
LIMIT = RESERVED * 1.5  # room for one reservation; after one answer of 10+ tokens, not for another


async def test_a_budget_with_room_left_does_not_refuse_a_cache_hit(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    cfg = one_deployment(
        up.base_url,
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        budgets={"limits": [{"name": "day", "scope": "global", "limit_usd": LIMIT, "period": "day"}]},
    )
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        labels = []
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=MSG, temperature=0, max_tokens=MAX_TOKENS
            )
            labels.append(raw.headers["x-edgeroute-cache"])
            answer = raw.parse()
            # The premise: a whole answer (so it is stored) whose cost leaves no room for a reservation.
            assert answer.choices[0].finish_reason == "stop"
            assert answer.usage is not None and 10 <= answer.usage.completion_tokens < MAX_TOKENS
        assert labels == ["miss", "hit", "hit"]
        assert len(up.options.requests) == 1
        # A new question would cost more than the budget has left: refused, as it should be.
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "And of Spain?"}], temperature=0, max_tokens=MAX_TOKENS
            )
        # Amounts below a cent keep three significant digits (they read "$0.0000 of $0.00").
        message = refused.value.message
        assert "of $0.0000600 spent or reserved" in message, message
        assert "$0.0000 " not in message
