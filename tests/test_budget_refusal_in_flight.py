"""A budget whose room is held by requests in flight says so in its 429, and to retry soon.

Admission reserves each request's worst case, and a burst's reservations can fill a budget
that has hardly been spent. The 429 said "$0.10 left ($0.40 ... spent or reserved)" and
Retry-After until the period's end (hours), so a caller could not tell that a retry a second
later, once the requests in flight gave back what they did not spend, would be admitted. It
now tells spent from reserved in flight, says to retry when they finish (Retry-After: 1), and
the retry is answered. The client is the openai SDK, against a real upstream that answers
slowly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai

from tests.test_cost_support import ask_status, cost_proxy, one_deployment

# Output at $2 a million tokens: a request with max_tokens 100,000 reserves $0.20, and spends
# a thousandth of that (the mock's dozen words).
BUDGET = {"limits": [{"name": "day", "scope": "global", "limit_usd": 0.5, "period": "day"}]}
ASK: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}


async def test_a_budget_held_by_requests_in_flight_says_so_and_to_retry_when_they_finish(
    start_upstream: Any,
) -> None:
    up = await start_upstream(latency_ms=1500)
    async with cost_proxy(one_deployment(up.base_url, budgets=BUDGET)) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
            in_flight = [asyncio.create_task(client.chat.completions.create(**ASK)) for _ in range(2)]
            await asyncio.sleep(0.5)  # both admitted, $0.40 of $0.50 reserved, and still running
            try:
                await client.chat.completions.create(**ASK)
                raise AssertionError("a third request fitted the budget")
            except openai.RateLimitError as e:
                refused = e
            assert refused.code == "budget_exceeded"
            assert "$0.00 spent and $0.40 reserved by requests in flight, of $0.50 today" in refused.message
            assert "retry when they finish" in refused.message
            assert refused.response.headers["retry-after"] == "1"
            await asyncio.gather(*in_flight)
            assert await ask_status(client, max_tokens=100_000) == 200  # the retry is answered
