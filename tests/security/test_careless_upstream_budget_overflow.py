"""A charge past what a Redis budget counter holds: the spend escaped the budget.

Budgets in Redis count nano-USD in 64-bit integers (`INCRBY`). A count of tokens within the
2^40 accepted, at a price of thousands of dollars a million tokens, made one request's charge
larger than 2^63 nano-USD (about $9.2 billion): the settlement script failed, and the budget
kept only the request's reservation while the ledger held the whole cost. The next requests
were admitted against a budget already spent. A charge is now counted at most 2^60 nano-USD
(about $1.15 billion): far past any limit, so the budget is exhausted and says so.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import openai
import pytest

from tests.conftest import eventually
from tests.security.conftest import priced_config, usage_upstream
from tests.test_cost_support import cost_proxy, require_redis

TOKENS = 2**40 - 1  # the largest count accepted as a count
PRICE = 10_000.0  # USD a million output tokens: 1.1e10 USD for the answer, 1.1e19 nano-USD


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with usage_upstream({"prompt_tokens": 5, "completion_tokens": TOKENS}) as url:
        yield url


async def test_a_charge_past_a_redis_counter_still_exhausts_the_budget(upstream: str) -> None:
    cfg = priced_config(upstream, output_per_mtok=PRICE) | {
        "budgets": {"limits": [{"name": "month", "scope": "global", "limit_usd": 100}]},
        "shared_state": {"redis_url": require_redis(), "prefix": "edgeroute-test-" + os.urandom(4).hex()},
    }
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        said = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert said.usage is not None and said.usage.completion_tokens == TOKENS

        async def refused() -> bool:
            try:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            except openai.RateLimitError as e:
                return "exhausted" in e.message
            return False

        await eventually(refused, "the spent budget refusing the next request", within=5)
