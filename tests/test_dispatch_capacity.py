"""Capacity-aware routing end to end: a full deployment spills over to the next one, then to
`fallbacks_on: capacity`; when everything is full a request waits in a bounded queue up to
its deadline, then gets 429 with Retry-After; a full deployment's health is untouched."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from edgeroute.config import ConfigError, parse
from edgeroute.state import STATE
from tests.dispatch_support import HELLO, StartProxy, answer
from tests.dispatch_support import upstreams as upstreams  # a fixture


def slow(seconds: float, calls: list[str] | None = None, name: str = "") -> Any:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        if calls is not None:
            calls.append(name)
        await asyncio.sleep(seconds)
        return answer()

    return handler


async def test_a_full_deployment_spills_over_and_keeps_its_health(upstreams: Any, start_proxy: StartProxy) -> None:
    cfg = await upstreams(slow(0.5), slow(0.0))
    cfg["deployments"]["d-a"].update(weight=1000, max_concurrency=2)
    cfg["deployments"]["d-b"]["weight"] = 1
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raws = await asyncio.gather(
        *(client.chat.completions.with_raw_response.create(model="m", messages=HELLO) for _ in range(5))
    )
    served = sorted(r.headers["x-edgeroute-deployment"] for r in raws)
    assert served == ["d-a", "d-a", "d-b", "d-b", "d-b"]
    spilled = [r.headers["x-edgeroute-explain"] for r in raws if r.headers["x-edgeroute-deployment"] == "d-b"]
    assert all("spillover: d-a at capacity" in e for e in spilled)
    live = proxy.app[STATE].live
    health = live.router.health(live.index_of["d-a"])
    assert (health["failures"], health["circuit"]) == (0, "closed")
    assert [live.capacity.active(i) for i in (0, 1)] == [0, 0]  # every slot given back
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
        deps = {d["name"]: d for d in (await r.json())["deployments"]}
    assert (deps["d-a"]["max_concurrency"], deps["d-a"]["active"], deps["d-b"]["max_concurrency"]) == (2, 0, None)


async def test_then_to_the_capacity_fallback_model_within_the_rule(upstreams: Any, start_proxy: StartProxy) -> None:
    calls: list[str] = []
    cfg = await upstreams(slow(0.5, calls, "a"), slow(0.0, calls, "b"), slow(0.0, calls, "c"))
    cfg["deployments"]["d-a"]["max_concurrency"] = 1
    cfg["deployments"]["d-a"]["tags"] = ["eu"]
    cfg["deployments"]["d-c"]["tags"] = ["eu"]
    cfg["models"] = {
        "m": {"deployments": ["d-a"], "fallbacks_on": {"capacity": ["spill"]}},
        "spill": {"deployments": ["d-b", "d-c"]},
    }
    cfg["rules"] = [{"name": "eu", "when": {"models": ["m"]}, "then": {"require_tags": ["eu"]}}]
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raws = await asyncio.gather(
        *(client.chat.completions.with_raw_response.create(model="m", messages=HELLO) for _ in range(3))
    )
    assert sorted(r.headers["x-edgeroute-deployment"] for r in raws) == ["d-a", "d-c", "d-c"]
    assert "b" not in calls  # the fallback model's deployment without the rule's tag is never used


async def test_everything_full_waits_in_a_bounded_queue_then_429(upstreams: Any, start_proxy: StartProxy) -> None:
    release = asyncio.Event()  # the upstream answers when the test says: load cannot reorder

    async def held(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.wait_for(release.wait(), 10)
        await asyncio.sleep(0.1)  # the waiter's queue time is at least this
        return answer()

    cfg = await upstreams(held)
    cfg["deployments"]["d-a"].update(max_concurrency=1, max_queue=1, queue_timeout_ms=30000)
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    async def one() -> int:
        try:
            await client.chat.completions.create(model="m", messages=HELLO)
            return 200
        except openai.APIStatusError as e:
            assert e.response.headers["retry-after"] == "1"
            assert "at capacity" in e.message
            return e.status_code

    cap = proxy.app[STATE].live.capacity

    async def until(cond: Any) -> None:  # bounded: conditions, not sleeps, so a slow machine cannot reorder
        for _ in range(500):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached")

    first = asyncio.ensure_future(one())
    await until(lambda: cap.active(0) == 1)
    second = asyncio.ensure_future(one())  # waits in the queue for the first's slot
    await until(lambda: cap.waiting(0) == 1)
    third = await one()  # the queue (one place) is taken: refused at once
    assert third == 429
    release.set()
    assert [await first, await second] == [200, 200]
    queued = [r for r in proxy.recorder.records if r.status == 200 and r.queue_ms > 0]
    assert len(queued) == 1 and queued[0].queue_ms >= 100
    refused = [r for r in proxy.recorder.records if r.status == 429]
    assert [(r.error_class, r.attempts) for r in refused] == [("capacity", [])]
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        assert 'edgeroute_queue_seconds_count{class="default",route="m"} 2.0' in await r.text()  # waiter, refused


async def test_the_queue_deadline_bounds_the_wait(upstreams: Any, start_proxy: StartProxy) -> None:
    cfg = await upstreams(slow(2.0))
    cfg["deployments"]["d-a"].update(max_concurrency=1, max_queue=5, queue_timeout_ms=200)
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    busy = asyncio.ensure_future(client.chat.completions.create(model="m", messages=HELLO))
    await asyncio.sleep(0.1)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="m", messages=HELLO)
    rec = proxy.recorder.records[-1]
    assert (rec.status, rec.error_class, rec.attempts) == (429, "capacity", [])
    assert 150 <= rec.queue_ms < 1500
    await busy


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": -3}, "max_concurrency"),
        ({"max_concurrency": 2, "max_queue": 4}, "queue_timeout_ms"),
        ({"max_queue": 4, "queue_timeout_ms": 100}, "max_concurrency"),
    ],
)
def test_bad_capacity_settings_are_config_errors_naming_the_path(fields: dict[str, Any], message: str) -> None:
    cfg = {
        "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "x", **fields}},
        "models": {"m": {"deployments": ["d"]}},
    }
    with pytest.raises(ConfigError) as e:
        parse(cfg, "test.yaml")
    assert any("deployments.d" in err and message in err for err in e.value.errors)
