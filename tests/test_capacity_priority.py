"""Priority classes under capacity, end to end with the OpenAI SDK: a request's class from its
key, a rule or the `x-edgeroute-priority` header its key may set (403 naming the class
otherwise); a freed slot goes to the highest class first and to keys in turn within a class;
`reserve_percent` keeps part of a deployment for the highest class; class names no class
defines are config errors naming their path."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.config import ConfigError, parse
from edgeroute.state import STATE
from tests.dispatch_support import StartProxy, answer
from tests.dispatch_support import upstreams as upstreams  # a fixture

KEYS = {
    "admin": {"token": "tok-admin", "role": "admin"},
    "alice": {"token": "tok-alice", "priority": "batch", "priorities": ["default"]},
    "bob": {"token": "tok-bob", "priority": "batch"},
    "ivy": {"token": "tok-ivy", "priority": "interactive"},
}


def recording(calls: list[str], seconds: float, gate: asyncio.Event | None = None) -> Any:
    """An upstream that notes each request's user text as it arrives, then answers after
    `seconds` (a request saying "busy" only once `gate` is set)."""

    async def handler(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        text = body["messages"][-1]["content"]
        calls.append(text)
        if gate is not None and text == "busy":
            await asyncio.wait_for(gate.wait(), 30)
        await asyncio.sleep(seconds)
        return answer()

    return handler


def client(proxy: Any, token: str = "x") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0)


def ask(c: openai.AsyncOpenAI, text: str, priority: str | None = None) -> Any:
    headers = {"x-edgeroute-priority": priority} if priority else None
    return c.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": text}], extra_headers=headers
    )


async def until(cond: Callable[[], object], what: str) -> None:
    """Waits (bounded) until `cond()` holds: conditions, not sleeps, so a slow machine cannot reorder."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached: {what}")


async def until_waiting(proxy: Any, n: int) -> None:
    cap = proxy.app[STATE].live.capacity
    await until(lambda: len(cap._waiters) >= n, f"{n} waiting")


async def test_a_freed_slot_goes_to_the_highest_class_then_to_keys_in_turn(
    upstreams: Any, start_proxy: StartProxy
) -> None:
    calls: list[str] = []
    gate = asyncio.Event()
    cfg = await upstreams(recording(calls, 0.02, gate))
    cfg["deployments"]["d-a"].update(max_concurrency=1, max_queue=10, queue_timeout_ms=20_000)
    cfg["keys"] = KEYS
    proxy = await start_proxy(cfg)
    alice, bob, ivy = (client(proxy, f"tok-{k}") for k in ("alice", "bob", "ivy"))
    first = asyncio.ensure_future(ask(bob, "busy"))
    await until(lambda: calls, "the busy request upstream")
    # Queued in this order: three of alice's batch requests, one of bob's, then an interactive one.
    queued = [asyncio.ensure_future(ask(alice, f"alice-{i}")) for i in range(3)]
    await until_waiting(proxy, 3)
    queued.append(asyncio.ensure_future(ask(bob, "bob-1")))
    await until_waiting(proxy, 4)
    queued.append(asyncio.ensure_future(ask(ivy, "ivy-1")))
    await until_waiting(proxy, 5)
    gate.set()  # the busy one answers: its slot is handed down the line
    raws = await asyncio.gather(first, *queued)
    assert all(r.http_response.status_code == 200 for r in raws)
    # The interactive one first; then alice and bob take turns (bob is not held behind all of alice's).
    assert calls == ["busy", "ivy-1", "alice-0", "bob-1", "alice-1", "alice-2"]
    assert [proxy.app[STATE].live.capacity.active(0)] == [0]
    queued_ms = {r.key: r.queue_ms for r in proxy.recorder.records if r.key == "ivy"}
    assert queued_ms["ivy"] > 0  # waited, and the wait is recorded


async def test_the_class_from_header_key_and_rule_and_403_for_a_class_the_key_may_not_use(
    upstreams: Any, start_proxy: StartProxy
) -> None:
    calls: list[str] = []
    cfg = await upstreams(recording(calls, 0.0), recording(calls, 0.0))
    # Half of d-a's two slots are kept for `interactive`: other classes see one slot.
    cfg["deployments"]["d-a"].update(max_concurrency=2, reserve_percent=50, weight=1000)
    cfg["keys"] = {**KEYS, "olga": {"token": "tok-olga", "priority": "batch", "team": "ops"}}
    cfg["rules"] = [
        {
            "name": "ops-urgent",
            "priority": 2,
            "when": {"tags": ["urgent"], "teams": ["ops"]},
            "then": {"priority": "interactive"},
        },
        {"name": "urgent", "priority": 1, "when": {"tags": ["urgent"]}, "then": {"priority": "interactive"}},
    ]
    proxy = await start_proxy(cfg)
    live = proxy.app[STATE].live
    live.router.acquire(0)  # one slot of d-a busy: only `interactive` may take the other

    async def served(c: openai.AsyncOpenAI, priority: str | None = None, tags: str | None = None) -> str:
        headers = {"x-edgeroute-priority": priority} if priority else {}
        if tags:
            headers["x-edgeroute-tags"] = tags
        raw = await c.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "q"}], extra_headers=headers
        )
        return str(raw.headers["x-edgeroute-deployment"])

    alice, ivy = client(proxy, "tok-alice"), client(proxy, "tok-ivy")
    assert await served(ivy) == "d-a"  # the key's own class may use the reserve
    assert await served(alice) == "d-b"  # batch: the reserve is not alice's
    assert await served(alice, "default") == "d-b"  # a class she may ask for; still not the top
    # A rule naming the sender's team comes first; one any client can trigger with a tag is
    # held at the highest class the key may use (alice's `default`: still not the reserve).
    assert await served(client(proxy, "tok-olga"), tags="urgent") == "d-a"
    assert await served(alice, tags="urgent") == "d-b"
    raw = await alice.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "q"}], extra_headers={"x-edgeroute-priority": "batch"}
    )
    assert "spillover: d-a at capacity for class batch" in raw.headers["x-edgeroute-explain"]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await served(alice, "interactive")
    assert "priority class 'interactive'" in denied.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        await served(ivy, "urgent")
    assert "unknown priority class 'urgent'" in bad.value.message
    live.router.release(0)
    async with (
        aiohttp.ClientSession(headers={"Authorization": "Bearer tok-admin"}) as s,
        s.get(proxy.url + "/admin/deployments") as r,
    ):
        deps = {d["name"]: d for d in (await r.json())["deployments"]}
    assert (deps["d-a"]["max_concurrency"], deps["d-a"]["reserve_percent"], deps["d-a"]["active"]) == (2, 50, 0)


async def test_a_full_deployment_gets_no_hedge(upstreams: Any, start_proxy: StartProxy) -> None:
    calls: list[str] = []
    cfg = await upstreams(recording(calls, 0.3), recording(calls, 0.3))
    cfg["deployments"]["d-a"]["weight"] = 1000
    cfg["deployments"]["d-b"]["max_concurrency"] = 1
    cfg["models"]["m"]["hedge"] = {"delay_ms": 20, "budget_percent": 100}
    proxy = await start_proxy(cfg)
    c = client(proxy)
    raw = await ask(c, "control")
    assert raw.headers.get("x-edgeroute-hedged") == "true"  # d-b with room: hedged
    proxy.app[STATE].live.router.acquire(1)  # d-b full
    raw = await ask(c, "one")
    assert raw.headers.get("x-edgeroute-hedged") is None
    assert calls.count("one") == 1


@pytest.mark.parametrize(
    ("extra", "path", "message"),
    [
        ({"keys": {"k": {"token": "t", "priority": "gold"}}}, "keys.k.priority", "unknown priority class 'gold'"),
        ({"keys": {"k": {"token": "t", "priorities": ["x"]}}}, "keys.k.priorities[0]", "unknown priority class"),
        (
            {"rules": [{"name": "r", "when": {"tags": ["t"]}, "then": {"priority": "batchh"}}]},
            "rules[0].then.priority",
            "did you mean 'batch'",
        ),
        ({"priority": {"classes": ["a", "a"]}}, "priority.classes", "named twice"),
        ({"priority": {"default": "low"}}, "priority.default", "unknown priority class 'low'"),
        ({"deployments": {"d": {"provider": "p", "model": "x", "reserve_percent": 10}}}, "deployments.d", "needs"),
        (
            {"deployments": {"d": {"provider": "p", "model": "x", "max_concurrency": 4, "reserve_percent": 101}}},
            "deployments.d.reserve_percent",
            "100",
        ),
    ],
)
def test_bad_classes_and_reserves_are_config_errors_naming_the_path(
    extra: dict[str, Any], path: str, message: str
) -> None:
    cfg: dict[str, Any] = {
        "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "x"}},
        "models": {"m": {"deployments": ["d"]}},
        **extra,
    }
    with pytest.raises(ConfigError) as e:
        parse(cfg, "test.yaml")
    assert any(path in err and message in err for err in e.value.errors), e.value.errors


def test_custom_classes_take_the_last_as_default() -> None:
    cfg = parse(
        {
            "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
            "priority": {"classes": ["gold", "silver", "bronze"]},
        },
        "test.yaml",
    )
    assert cfg.priority.default_class == "bronze"
    assert orjson.loads(cfg.core_json())["default_priority"] == "bronze"


async def test_a_waiter_takes_a_slot_freed_on_any_deployment_it_may_use(
    upstreams: Any, start_proxy: StartProxy
) -> None:
    calls: list[str] = []
    cfg = await upstreams(recording(calls, 0.0), recording(calls, 0.0))
    cfg["deployments"]["d-a"].update(max_concurrency=1, max_queue=2, queue_timeout_ms=20_000, weight=1000)
    cfg["deployments"]["d-b"]["max_concurrency"] = 1  # no queue of its own
    proxy = await start_proxy(cfg)
    live = proxy.app[STATE].live
    live.router.acquire(0)
    live.router.acquire(1)  # both full: the request waits in d-a's line, for a slot on either
    waiting = asyncio.ensure_future(ask(client(proxy), "w"))
    await until_waiting(proxy, 1)
    live.capacity.release(1)  # d-b frees a slot: handed to the waiter
    raw = await waiting
    assert raw.headers["x-edgeroute-deployment"] == "d-b"
    assert [live.capacity.active(0), live.capacity.active(1)] == [1, 0]
    live.capacity.release(0)


def test_the_spike_scenario_end_to_end_tiny() -> None:
    """`edgeroute bench spike`, bounded small: a load step past the primary's capacity spills
    over without errors, and the priority part runs both classes."""
    from edgeroute.bench import spike, stack

    c = stack.Common(duration=0.6, requests=200, prompt_tokens=50, pin=False, warmup=0)
    out = spike.spike(c, rates=(10.0, 120.0), service_ms=50, secondary_ms=60, capacity=2, batch_rate=60.0)
    low, high = out["steps"]
    assert low["failed"] == high["failed"] == 0 and low["ok"] > 0 and high["ok"] > 0
    # 2 slots at 50 ms serve 40 req/s at most: at 120 req/s most must spill.
    assert high["spillover_pct"] > 30 > low["spillover_pct"]
    pr = out["priority"]
    assert pr["interactive_alone"]["ok"] > 0 and pr["batch"]["ok"] > 0 and pr["batch"]["failed"] == 0
    assert {d["name"]: d["max_concurrency"] for d in out["deployments"]} == {"d0": 2, "d1": None}
