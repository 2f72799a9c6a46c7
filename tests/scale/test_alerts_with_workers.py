"""Alerts with `serve --workers 2` and with `shared_state`: one message for one alert, and
budget alerts at all.

Every worker evaluates the alert rules. A deployment's circuit opens in every worker (the
workers share ejections), so each sent its own "firing" message: N messages with N workers.
A `budget_percent` rule read the worker's own counters, which hold nothing when the workers
count budgets in their shared file (or instances in Redis): the alert never fired, however
much was spent, and the `edgeroute_budget_used_usd` gauges said $0.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import openai

from tests.conftest import eventually, simple_config
from tests.metrics_support import scrape
from tests.scale.support import Spawn
from tests.test_cost_support import require_redis
from tests.test_telemetry_alerts import Receiver, receiver

__all__ = ["receiver"]

OUT_PRICE = 1000.0  # USD per million output tokens: each answer of 40 tokens costs $0.04


async def test_one_message_per_alert_and_budget_alerts_fire_whatever_the_workers(
    start_upstream: Any, spawn: Spawn, tmp_path: Path, receiver: Receiver
) -> None:
    down, up = await start_upstream(fail_status=500), await start_upstream(reply_words=40)
    hooks = await receiver.start()
    cfg = simple_config({"a": down, "b": up}, ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.05})
    cfg["deployments"]["d-a"]["weight"] = 1000  # tried first until its circuit opens
    cfg["deployments"]["d-b"]["price"] = {"input_per_mtok": 0, "output_per_mtok": OUT_PRICE}
    cfg["health"] = {"consecutive_failures": 3, "base_ejection_ms": 60_000, "min_requests": 1000}
    cfg["budgets"] = {"limits": [{"name": "month", "scope": "global", "limit_usd": 1.0}]}
    cfg["alerts"] = {
        "interval_s": 1,
        "webhooks": {"ops": {"url": hooks + "/ops"}},
        "rules": [
            {"name": "circuit", "kind": "circuit_open"},
            {"name": "spend", "kind": "budget_percent", "threshold": 10, "budgets": ["month"]},
        ],
    }
    inst = await spawn(cfg, "--workers", "2")
    client = openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key="x", max_retries=0)
    for _ in range(12):  # each served by d-b at $0.04 (d-a fails over while its circuit is closed)
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=40)
    await client.close()

    def sent() -> list[tuple[str, str, str]]:
        return [(b["event"], b["alert"]["rule"], b["alert"]["subject"]) for b in receiver.bodies.get("/ops", [])]

    async def both_fired() -> bool:
        return {("firing", "circuit", "d-a"), ("firing", "spend", "month")} <= set(sent())

    await eventually(both_fired, "the circuit and budget alerts")
    await asyncio.sleep(3)  # three more evaluations by every worker: no duplicate comes
    assert sorted(sent()) == [("firing", "circuit", "d-a"), ("firing", "spend", "month")]
    # The budget gauges (one per worker) read the same store: they said $0.
    m = await scrape(inst.url)
    gauges = {k: v for k, v in m.samples.items() if k[0] == "edgeroute_budget_used_usd"}
    assert sorted(dict(k[1])["worker"] for k in gauges) == ["0", "1"]
    assert all(round(v, 6) == 12 * 0.04 for v in gauges.values()), gauges


async def test_a_budget_alert_fires_where_budgets_are_counted_in_redis(
    start_upstream: Any, spawn: Spawn, receiver: Receiver
) -> None:
    """With `shared_state`, budgets are counted in Redis: the rule read this process's counters,
    empty, and never fired."""
    up = await start_upstream(reply_words=40)
    hooks = await receiver.start()
    cfg = simple_config({"b": up})
    cfg["shared_state"] = {"redis_url": require_redis(), "prefix": f"alerts-{os.getpid()}-{os.urandom(4).hex()}"}
    cfg["deployments"]["d-b"]["price"] = {"input_per_mtok": 0, "output_per_mtok": OUT_PRICE}
    cfg["budgets"] = {"limits": [{"name": "month", "scope": "global", "limit_usd": 1.0}]}
    cfg["alerts"] = {
        "interval_s": 1,
        "webhooks": {"ops": {"url": hooks + "/ops"}},
        "rules": [{"name": "spend", "kind": "budget_percent", "threshold": 10, "budgets": ["month"]}],
    }
    inst = await spawn(cfg)
    client = openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key="x", max_retries=0)
    for _ in range(3):  # $0.12 of $1
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=40)
    await client.close()

    async def fired() -> list[Any]:
        return [b["alert"] for b in receiver.bodies.get("/ops", []) if b["event"] == "firing"]

    (alert,) = await eventually(fired, "the budget alert")
    assert (alert["rule"], alert["subject"], alert["value"]) == ("spend", "month", 12.0)
