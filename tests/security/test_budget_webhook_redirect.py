"""A budget's `notify` webhook that redirects does not carry the event to another host.

Alert webhooks stopped following redirects (`test_alert_webhook_redirect.py`); a budget's
`notify` action posts through its own session, which followed them: a 307 from the
receiver (a moved endpoint, a compromised or typo-squatted host) sent the event, with the
team's name and spend, on to a host the config never named.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai

from tests.security.test_alert_webhook_redirect import Hosts, hosts
from tests.test_cost_support import cost_proxy, one_deployment

__all__ = ["hosts"]


async def test_a_redirecting_budget_webhook_sends_nothing_to_the_other_host(start_upstream: Any, hosts: Hosts) -> None:
    up = await start_upstream(reply_words=40)
    url = await hosts.start()
    notify = {"at_percent": 1, "action": "notify", "webhook": url}
    budget = {"name": "team-day", "scope": "team", "limit_usd": 1.0, "period": "day", "actions": [notify]}
    cfg = one_deployment(
        up.base_url,
        keys={"alice": {"token": "sk-combos2-alice", "team": "research"}},
        budgets={"limits": [budget]},
    )
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.02}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-combos2-alice", max_retries=0)
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        await client.close()
        for _ in range(100):  # sent in the background
            if hosts.moved:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # time for a redirect to be followed
    assert len(hosts.moved) == 1
    assert hosts.elsewhere == [], "the budget event went to a host the config did not name"
