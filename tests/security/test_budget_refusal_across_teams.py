"""A budget that counts other teams' spend too (global, per model, per user) refuses a team's
key without its figures, as `/admin/budgets` withholds them from the team: the 429 quoted
what every team together had spent and reserved. A budget of the team's own keeps them."""

from __future__ import annotations

from typing import Any

import openai

from tests.test_cost_support import cost_proxy, one_deployment

KEYS = {
    "alpha": {"token": "tok-alpha", "team": "alpha"},
    "beta": {"token": "tok-beta", "team": "beta"},
}
ASK: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}


async def _refusal(up: Any, budget: dict[str, Any]) -> openai.RateLimitError:
    cfg = one_deployment(up.base_url, keys=KEYS, budgets={"limits": [budget]})
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-alpha", max_retries=0) as alpha:
            try:
                await alpha.chat.completions.create(**ASK)  # $0.20 reserved against $0.10
            except openai.RateLimitError as e:
                return e
    raise AssertionError("the request fitted the budget")


async def test_a_budget_other_teams_count_refuses_without_its_figures(start_upstream: Any) -> None:
    up = await start_upstream()
    refused = await _refusal(up, {"name": "everyone", "scope": "global", "limit_usd": 0.1, "period": "day"})
    assert refused.code == "budget_exceeded" and "Budget 'everyone'" in refused.message
    assert "$" not in refused.message and "figures are not shown" in refused.message
    assert refused.response.headers["x-edgeroute-budget"] == "everyone"


async def test_the_teams_own_budget_keeps_its_figures(start_upstream: Any) -> None:
    up = await start_upstream()
    refused = await _refusal(up, {"name": "alpha-day", "scope": "team", "match": "alpha", "limit_usd": 0.1})
    assert "$0.10" in refused.message  # its own budget: what it may spend, and what this one may cost
