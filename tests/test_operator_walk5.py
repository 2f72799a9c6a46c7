"""A fifth new operator's walk through the README, adopting edgeroute for a company: two
providers (OpenAI and Anthropic) tried on mock upstreams, managed keys for two teams, team
budgets with actions, a rule, the request log, alerts, the cache and the console. Each test
drives the real parts (the openai SDK against the proxy, the CLI in a subprocess) and asserts
what the operator or the client sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.test_cost_support import cost_proxy, one_deployment

# -- a budget that refuses a request for its worst case -------------------------------------------

# Output at $2 per million tokens (input free): a request that sets no max_tokens reserves
# `budgets.reserve_max_tokens` (4,096) output tokens, $0.008192; the budget is half that.
LIMIT = 0.004


async def test_a_budget_with_room_left_says_why_it_refused_and_what_reserves_less(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A team budget at 0 % spent refused every request that set no max_tokens with "Budget
    'b' for all requests is exhausted: $0.00 of $0.00400 spent or reserved": the caller saw a
    budget called exhausted that had spent nothing, and nothing it could change. It says what
    is left, what the request may cost and that a lower max_tokens reserves less; a request
    with one is then served."""
    up = await start_upstream()
    cfg = one_deployment(
        up.base_url,
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        budgets={"limits": [{"name": "b", "scope": "global", "limit_usd": LIMIT, "period": "day"}]},
    )
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        msg: list[Any] = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="m", messages=msg)
        said = refused.value.message
        assert "exhausted" not in said, said
        assert "Budget 'b' for all requests has $0.00400 left ($0.00 of $0.00400 spent" in said, said
        assert "up to $0.00819 for its prompt and 4,096 output tokens (it set no max_tokens)" in said, said
        assert "A lower max_tokens reserves less." in said, said
        answer = await client.chat.completions.create(model="m", messages=msg, max_tokens=20)
        assert answer.choices[0].message.content
        await client.close()
