"""One client cannot open a deployment's circuit for everyone (red team D, session 28, F1).

Key A sends prompts deployment d1 fails (503), key B's requests keep being served by d1: A's
failures alone eject d1 for A only (session 31: counted, and logged with A's team), and leave
its circuit closed for B; A's requests then skip d1. An outage that fails both keys still opens it, and so do one
keyless client's failures, as before. Seen through the openai SDK, `/admin/deployments`
and `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.dispatch import senders
from edgeroute.health_share import HEALTH_SHARE
from edgeroute.mock.openai import completion_body, openai_error
from tests.conftest import simple_config
from tests.metrics_support import scrape
from tests.test_cost_support import require_redis

A, B, OPS = "sk-team-a-key", "sk-team-b-key", "sk-ops-key"
BOOM = "BOOM: a prompt d1 cannot serve"


class D1:
    """Deployment d1's upstream: 503 for a prompt with the marker, or for all in an outage."""

    def __init__(self) -> None:
        self.outage = False

    async def chat(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if self.outage or BOOM in orjson.dumps(body["messages"]).decode():
            return openai_error(503, "The server is overloaded.")
        data = completion_body("chatcmpl-d1", int(time.time()), body["model"], "from d1", "stop", 5, 2)
        return web.Response(body=data, content_type="application/json")


async def _setup(start_upstream: Any, start_proxy: Any, serve_routes: Any, keys: bool) -> tuple[Any, D1]:
    d1 = D1()
    up1 = await serve_routes(web.post("/v1/chat/completions", d1.chat))
    d2 = await start_upstream()
    cfg = simple_config(
        {"d1": d2, "d2": d2},
        health={"consecutive_failures": 3, "min_requests": 6, "base_ejection_ms": 600_000},
    )
    cfg["providers"]["d1"]["base_url"] = up1.url + "/v1"
    # lowest_cost: d1 (cheaper) serves every request its circuit lets through; d2 is the fallback.
    cfg["deployments"]["d-d2"]["price"] = {"input_per_mtok": 5.0, "output_per_mtok": 10.0}
    cfg["models"]["m"]["strategy"] = "lowest_cost"
    if keys:
        cfg["keys"] = {
            "a": {"token": A, "team": "team-a"},
            "b": {"token": B, "team": "team-b"},
            "ops": {"token": OPS, "role": "admin"},
        }
    return await start_proxy(cfg), d1


async def _chat(proxy: Any, key: str, text: str) -> str:
    """The deployment that served a chat request (it is always served: d2 takes d1's failures)."""
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": text}]
        )
    assert raw.parse().choices[0].message.content
    return raw.headers["x-edgeroute-deployment"]


async def _d1(proxy: Any, token: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments", headers=headers) as r:
        assert r.status == 200
        return next(d for d in (await r.json())["deployments"] if d["name"] == "d-d1")


async def test_one_keys_failing_prompts_eject_the_deployment_for_it_alone(
    start_upstream: Any,
    start_proxy: Any,
    serve_routes: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(senders, "_logged", {})  # logged once a minute per deployment: not by an earlier test
    proxy, _ = await _setup(start_upstream, start_proxy, serve_routes, keys=True)
    for _ in range(4):
        assert await _chat(proxy, B, "hello") == "d-d1"
    caplog.set_level(logging.WARNING, logger="edgeroute.health")
    # A's failing prompts between B's requests, then a burst of them in a row.
    for _ in range(8):
        assert await _chat(proxy, A, BOOM) == "d-d2"
        assert await _chat(proxy, B, "hello") == "d-d1"
    for _ in range(8):
        assert await _chat(proxy, A, BOOM) == "d-d2"
    for _ in range(3):
        assert await _chat(proxy, B, "hello") == "d-d1"
    d1 = await _d1(proxy, OPS)
    assert d1["circuit"] == "closed", d1
    # A's 8 failures between B's successes trip nothing; its third in a row then ejected d1 for
    # A alone: its 5 later prompts never reached d1.
    assert d1["failures"] == 11 and d1["sender_ejections"] == 1 and d1["senders_ejected"] == 1, d1
    m = await scrape(proxy.url, OPS)
    assert m.value("edgeroute_circuit_sender_ejections_total", deployment="d-d1") == 1
    assert m.value("edgeroute_circuit_trips_withheld_total", deployment="d-d1") == 1  # deprecated alias
    assert d1["trips_withheld"] == 1, d1
    assert m.value("edgeroute_circuit_sender_ejections_total", deployment="d-d2") == 0
    # The operator is told whose failures they were (the team, never a key's secret), once.
    said = [r.getMessage() for r in caplog.records if "ejected for" in r.getMessage()]
    assert len(said) == 1 and "d-d1" in said[0] and "team team-a" in said[0], said
    assert A not in caplog.text


async def test_an_outage_both_keys_see_still_opens_the_circuit(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    proxy, d1 = await _setup(start_upstream, start_proxy, serve_routes, keys=True)
    for _ in range(4):
        assert await _chat(proxy, A, "hello") == "d-d1"
        assert await _chat(proxy, B, "hello") == "d-d1"
    d1.outage = True
    for key in (A, B, A):
        assert await _chat(proxy, key, "hello") == "d-d2"
    state = await _d1(proxy, OPS)
    assert state["circuit"] == "open" and state["sender_ejections"] == 0, state


async def test_one_keyless_client_still_opens_the_circuit(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    proxy, _ = await _setup(start_upstream, start_proxy, serve_routes, keys=False)
    for _ in range(4):
        assert await _chat(proxy, "x", "hello") == "d-d1"
    for _ in range(3):
        assert await _chat(proxy, "x", BOOM) == "d-d2"
    state = await _d1(proxy, None)
    assert state["circuit"] == "open", state
    assert await _chat(proxy, "x", "hello") == "d-d2"


async def test_an_instance_serving_others_well_does_not_take_an_ejection_one_key_caused_elsewhere(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    """Red team P2 (B1): key A sent its failing prompts to a second instance that no one else
    used; there A was the only sender, so d1 opened, and health sharing opened it on the first
    instance too, where B was served by d1 all along. A received ejection is not applied by an
    instance whose own traffic the deployment serves well, the most failing sender's (A's, which
    failed there too) set aside; one with no traffic of its own applies it."""
    url = require_redis()
    d1 = D1()
    up1 = await serve_routes(web.post("/v1/chat/completions", d1.chat))
    d2 = await start_upstream()
    cfg = simple_config(
        {"d1": d2, "d2": d2}, health={"consecutive_failures": 3, "min_requests": 6, "base_ejection_ms": 600_000}
    )
    cfg["providers"]["d1"]["base_url"] = up1.url + "/v1"
    cfg["deployments"]["d-d2"]["price"] = {"input_per_mtok": 5.0, "output_per_mtok": 10.0}
    cfg["models"]["m"]["strategy"] = "lowest_cost"
    cfg["keys"] = {"a": {"token": A, "team": "team-a"}, "b": {"token": B, "team": "team-b"}}
    prefix = f"edgeroute-one-sender-{os.getpid()}-{os.urandom(4).hex()}"
    cfg["shared_state"] = {"redis_url": url, "prefix": prefix, "timeout_ms": 2000}
    first, second, idle = await start_proxy(cfg), await start_proxy(cfg), await start_proxy(cfg)
    for _ in range(6):
        assert await _chat(first, B, "hello") == "d-d1"
    for _ in range(2):  # A fails here too, a quarter of this instance's recent requests to d1
        assert await _chat(first, A, BOOM) == "d-d2"
    for _ in range(3):  # A alone on the second instance: d1 opens there, and is shared
        assert await _chat(second, A, BOOM) == "d-d2"
    share, idle_share = first.app[HEALTH_SHARE], idle.app[HEALTH_SHARE]
    t0 = time.monotonic()
    while share.not_applied == 0 or idle_share.received == 0:
        assert time.monotonic() - t0 < 10, (share.not_applied, share.received, idle_share.received)
        await asyncio.sleep(0.05)
    assert share.received == 0
    for _ in range(3):
        assert await _chat(first, B, "hello") == "d-d1"  # still served by d1
    assert await _chat(idle, B, "hello") == "d-d2"  # no traffic of its own: it took the ejection
