"""A shared alert (budget, circuit, secret) firing when its instance is killed, and clear by
the time it is back, with `shared_state`: the restarted instance sends its "resolved", once,
under the alert's id. Real servers, a private Redis.

The alert's state lived in the killed process alone. The restarted one, finding the budget
within bounds (raised in the config while the server was down), had nothing to resolve: the
"firing" stayed the last word the webhook had, and the on-call's incident stayed open."""

from __future__ import annotations

import asyncio
from typing import Any

import openai

from tests.conftest import eventually, simple_config
from tests.scale.support import Spawn, kill_tree
from tests.test_cost_support import RedisServer
from tests.test_telemetry_alerts import Receiver, receiver

__all__ = ["receiver"]


async def test_a_budget_alert_firing_at_a_kill_is_resolved_by_the_restarted_instance(
    start_upstream: Any, spawn: Spawn, receiver: Receiver, redis_server: RedisServer
) -> None:
    up = await start_upstream(reply_words=40)
    hooks = await receiver.start()
    cfg = simple_config({"b": up})
    cfg["shared_state"] = {"redis_url": redis_server.url}
    cfg["deployments"]["d-b"]["price"] = {"input_per_mtok": 0, "output_per_mtok": 1000.0}  # $0.04 an answer
    cfg["budgets"] = {"limits": [{"name": "month", "scope": "global", "limit_usd": 1.0}]}
    cfg["alerts"] = {
        "interval_s": 1,
        "webhooks": {"ops": {"url": hooks + "/ops"}},
        "rules": [{"name": "spend", "kind": "budget_percent", "threshold": 10, "budgets": ["month"]}],
    }
    first = await spawn(cfg, name="first")
    client = openai.AsyncOpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0)
    for _ in range(3):  # $0.12 of $1: past 10 %
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=40)
    await client.close()

    def sent() -> list[tuple[str, str]]:
        return [(b["event"], b["alert"]["id"]) for b in receiver.bodies.get("/ops", [])]

    await eventually(lambda: asyncio.sleep(0, sent()), "the budget alert firing")
    ((_, alert_id),) = sent()
    kill_tree(first.proc.pid)
    await first.proc.wait()

    cfg["budgets"]["limits"][0]["limit_usd"] = 10.0  # raised while the server was down: 1.2 %
    await spawn(cfg, name="second")

    async def resolved() -> bool:
        return ("resolved", alert_id) in sent()

    await eventually(resolved, "the resolved message, under the alert's id", 10)
    await asyncio.sleep(2)  # two more evaluations: nothing more comes
    assert sent() == [("firing", alert_id), ("resolved", alert_id)]
