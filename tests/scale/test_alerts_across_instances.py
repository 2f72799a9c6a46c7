"""Alerts across `edgeroute serve` instances that share Redis: one message per transition.

A circuit that opens on one instance opens on the others too (health sharing), and each
instance's rules see it: each sent its own "firing" message, then its own "resolved" (three
instances, three of each). Now the transition is claimed in Redis and sent once; an
instance killed while sending it leaves a claim that expires, and another instance sends it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.conftest import RoutesServer, eventually, simple_config, start_routes
from tests.scale.support import Instance, Spawn, metric
from tests.test_cost_support import RedisServer, require_redis

EJECTION_MS = 4000


class Hooks:
    """A webhook receiver: every POST, and those it answered; it can hold the first of an event."""

    def __init__(self, hold: str | None = None) -> None:
        self.received: list[dict[str, Any]] = []
        self.answered: list[dict[str, Any]] = []
        self.hold = hold  # this event's first message is never answered
        self.held = asyncio.Event()
        self.server: RoutesServer | None = None

    async def start(self) -> str:
        async def hook(request: web.Request) -> web.Response:
            body = await request.json()
            self.received.append(body)
            if body["event"] == self.hold and not self.held.is_set():
                self.held.set()
                await asyncio.Event().wait()  # the sender is killed meanwhile
            self.answered.append(body)
            return web.Response(status=204)

        self.server = await start_routes(web.post("/ops", hook))
        return self.server.url + "/ops"

    def events(self, bodies: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        return [(b["event"], b["alert"]["rule"], b["alert"]["subject"]) for b in bodies]


@pytest.fixture
async def hooks() -> Any:
    made: list[Hooks] = []

    def make(hold: str | None = None) -> Hooks:
        made.append(Hooks(hold))
        return made[-1]

    yield make
    for h in made:
        if h.server is not None:
            await h.server.close()


def _config(
    down: Any, up: Any, url: str, redis_url: str | None = None, traffic: bool = False, ejection_ms: int = EJECTION_MS
) -> dict[str, Any]:
    cfg = simple_config({"a": down, "b": up}, ledger={"backend": "memory"})
    cfg["deployments"]["d-a"]["weight"] = 1000  # tried first until its circuit opens
    cfg["health"] = {"consecutive_failures": 3, "base_ejection_ms": ejection_ms, "min_requests": 1000}
    prefix = f"alerts-x-{os.getpid()}-{os.urandom(4).hex()}"
    cfg["shared_state"] = {"redis_url": redis_url or require_redis(), "prefix": prefix, "timeout_ms": 1000}
    cfg["alerts"] = {
        "interval_s": 1,
        "webhooks": {"ops": {"url": url, "timeout_s": 1}},
        "rules": [{"name": "circuit", "kind": "circuit_open", "severity": "critical"}],
    }
    if traffic:  # a traffic kind: each instance's own window, and its messages say whose
        rule = {"name": "dep-errors", "kind": "error_rate", "threshold": 0.5, "window_s": 60, "min_requests": 3}
        cfg["alerts"]["rules"].append(rule)
    return cfg


async def _open_circuit(inst: Instance) -> None:
    client = openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key="x", max_retries=0)
    for _ in range(4):  # d-a fails (each request fails over to d-b) until its circuit opens
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    await client.close()


async def _all_saw_it(instances: list[Instance]) -> None:
    async def fired() -> bool:
        return [await metric(i.url, "edgeroute_alerts_firing", {"severity": "critical"}) for i in instances] == [1] * 3

    await eventually(fired, "the circuit alert firing in every instance")


async def test_three_instances_send_one_firing_and_one_resolved(start_upstream: Any, spawn: Spawn, hooks: Any) -> None:
    down, up = await start_upstream(fail_status=500), await start_upstream()
    rx = hooks()
    cfg = _config(down, up, await rx.start(), traffic=True)
    instances = [await spawn(cfg, name=f"i{n}") for n in range(3)]
    await _open_circuit(instances[0])  # the others learn it through Redis
    await _all_saw_it(instances)

    async def resolved() -> bool:
        return ("resolved", "circuit", "d-a") in rx.events(rx.answered)

    await eventually(resolved, "the resolved message")  # the ejection runs out in every instance

    async def all_resolved() -> bool:
        return [await metric(i.url, "edgeroute_alerts_firing", {"severity": "critical"}) for i in instances] == [0] * 3

    await eventually(all_resolved, "every instance resolving it")
    await asyncio.sleep(3)  # three more evaluations by every instance: no duplicate comes
    circuit = [b for b in rx.received if b["alert"]["rule"] == "circuit"]
    assert rx.events(circuit) == [("firing", "circuit", "d-a"), ("resolved", "circuit", "d-a")]
    # The error rate, seen by the instance that served the traffic alone, and named in its message.
    (errors,) = [b["alert"] for b in rx.received if b["alert"]["rule"] == "dep-errors"]
    assert errors["subject"] == "d-a" and _pid({"alert": errors}) == instances[0].proc.pid
    assert errors["message"].startswith(f"dep-errors: d-a on {errors['instance']}: error rate 100.0%")
    skipped = [await metric(i.url, "edgeroute_alert_claims_total", {"result": "skipped"}) for i in instances]
    assert sum(s or 0 for s in skipped) == 4  # two transitions, each skipped by two instances


async def test_an_instance_killed_while_sending_leaves_it_to_another(
    start_upstream: Any, spawn: Spawn, hooks: Any
) -> None:
    down, up = await start_upstream(fail_status=500), await start_upstream()
    rx = hooks(hold="firing")
    # The others take over only a transition they saw: the circuit stays open long enough for
    # every instance to see it on a stalled CI host (at 4 s, once, they had not).
    cfg = _config(down, up, await rx.start(), ejection_ms=15_000)
    instances = [await spawn(cfg, name=f"i{n}") for n in range(3)]
    await _open_circuit(instances[0])
    await asyncio.wait_for(rx.held.wait(), 30)  # one instance is sending the firing message
    await _all_saw_it(instances)  # and the two others wait on its claim
    sender = _pid(rx.received[0])
    (victim,) = [i for i in instances if i.proc.pid == sender]
    os.kill(sender, signal.SIGKILL)
    await victim.proc.wait()

    async def delivered() -> list[dict[str, Any]]:
        return [b for b in rx.answered if b["event"] == "firing"]

    (firing,) = await eventually(delivered, "the firing message from another instance")
    assert firing["alert"]["instance"] != rx.received[0]["alert"]["instance"]

    async def resolved() -> bool:
        return ("resolved", "circuit", "d-a") in rx.events(rx.answered)

    await eventually(resolved, "the resolved message")
    await asyncio.sleep(3)  # more evaluations by the two left: no duplicate comes
    assert rx.events(rx.answered) == [("firing", "circuit", "d-a"), ("resolved", "circuit", "d-a")]
    assert rx.events(rx.received) == [("firing", "circuit", "d-a")] * 2 + [("resolved", "circuit", "d-a")]
    survivors = [i for i in instances if i is not victim]
    retried = [await metric(i.url, "edgeroute_alert_claims_total", {"result": "retried"}) for i in survivors]
    assert sum(r or 0 for r in retried) == 1


async def test_redis_down_each_instance_notifies_alone_and_says_so(
    start_upstream: Any, spawn: Spawn, hooks: Any, redis_server: RedisServer
) -> None:
    """Alerting fails open: a claim that cannot be made is no reason to stay silent."""
    down, up = await start_upstream(fail_status=500), await start_upstream()
    rx = hooks()
    cfg = _config(down, up, await rx.start(), redis_server.url)
    instances = [await spawn(cfg, name=f"i{n}") for n in range(2)]
    redis_server.stop()
    for inst in instances:  # nothing is shared now: each opens d-a's circuit by its own failures
        await _open_circuit(inst)

    async def both() -> list[dict[str, Any]]:
        fired = [b for b in rx.answered if b["event"] == "firing"]
        return fired if len(fired) == 2 else []

    fired = await eventually(both, "a firing message from each instance")
    assert sorted(_pid(b) for b in fired) == sorted(i.proc.pid for i in instances)
    for inst in instances:
        assert await metric(inst.url, "edgeroute_alert_claims_total", {"result": "unavailable"}) == 1
        assert "notifying from this instance alone" in inst.output()


def _pid(body: dict[str, Any]) -> int:
    return int(str(body["alert"]["instance"]).rpartition(":")[2])


async def test_the_cooldown_is_shared_with_an_instance_that_never_saw_the_first_alert(
    start_upstream: Any, spawn: Spawn, hooks: Any
) -> None:
    """`cooldown_s` (300 s here): a circuit that opens again soon after is not notified again,
    not even by an instance started since, which has no notification of its own to count from."""
    down, up = await start_upstream(fail_status=500), await start_upstream()
    rx = hooks()
    cfg = _config(down, up, await rx.start())
    first = [await spawn(cfg, name=f"i{n}") for n in range(2)]
    await _open_circuit(first[0])

    async def resolved() -> bool:
        return ("resolved", "circuit", "d-a") in rx.events(rx.answered)

    await eventually(resolved, "the first alert's resolved message")
    late = await spawn(cfg, name="late")
    await _open_circuit(late)  # the circuit opens again, everywhere
    await _all_saw_it([*first, late])

    async def silenced() -> float | None:
        return await metric(late.url, "edgeroute_alert_claims_total", {"result": "silenced"})

    assert await eventually(silenced, "the late instance finding the alert in its cooldown") == 1
    assert rx.events(rx.received) == [("firing", "circuit", "d-a"), ("resolved", "circuit", "d-a")]
