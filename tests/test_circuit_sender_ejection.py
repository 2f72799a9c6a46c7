"""The circuit opens for the sender that broke it (session 31; red team holes B2(a), B2(b)).

Key A's team sends prompts the cheap primary d1 fails (503); key B's team is served by d1. A's
failures alone eject d1 for A only, even while B is quiet (a): B's requests are served by d1
throughout, and A, polling every 50 ms, only ever probes for itself. A genuine outage both keys
see still opens d1 for everyone, and both are back on d1 once it recovers (b), with no 503 for
either client with `max_attempts: 1` (c). Seen through the openai SDK and `/admin/deployments`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import orjson
from aiohttp import web

from edgeroute.config import Price
from edgeroute.dispatch.policy import FailoverPolicy, Settings, Try
from edgeroute.mock.openai import completion_body, openai_error
from edgeroute.upstream import DeploymentInfo
from tests.conftest import simple_config

A, B, OPS = "sk-team-a-key", "sk-team-b-key", "sk-ops-key"
BOOM = "BOOM: a prompt d1 cannot serve"


class D1:
    """Deployment d1's upstream: 503 for a prompt with the marker, or for all in an outage."""

    def __init__(self) -> None:
        self.outage = False
        self.calls = 0
        self.fail_next = 0  # the next requests of anyone that fail (a stray error)
        self.blip: asyncio.Event | None = None  # set: a blip, requests held until it ends, then 503
        self.to_hold = 0  # `all_held` is set once that many requests are held in the blip
        self.all_held = asyncio.Event()

    async def chat(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = orjson.loads(await request.read())
        if self.blip is not None:
            self.to_hold -= 1
            if self.to_hold <= 0:
                self.all_held.set()
            await self.blip.wait()
            return openai_error(503, "The server is overloaded.")
        stray, self.fail_next = self.fail_next > 0, max(0, self.fail_next - 1)
        if stray or self.outage or BOOM in orjson.dumps(body["messages"]).decode():
            return openai_error(503, "The server is overloaded.")
        data = completion_body("chatcmpl-d1", int(time.time()), body["model"], "from d1", "stop", 5, 2)
        return web.Response(body=data, content_type="application/json")


async def _setup(
    start_upstream: Any,
    start_proxy: Any,
    serve_routes: Any,
    max_attempts: int = 3,
    base_ejection_ms: int = 1_000,
    models: dict[str, Any] | None = None,
) -> tuple[Any, D1]:
    """d1 (cheap, failing as `D1` says) and d2 (50x) for model `m`, or the routes `models` name."""
    d1 = D1()
    up1 = await serve_routes(web.post("/v1/chat/completions", d1.chat))
    d2 = await start_upstream()
    cfg = simple_config(
        {"d1": d2, "d2": d2},
        health={
            "consecutive_failures": 3,
            "min_requests": 6,
            "base_ejection_ms": base_ejection_ms,
            "max_ejection_ms": 8 * base_ejection_ms,
        },
    )
    cfg["providers"]["d1"]["base_url"] = up1.url + "/v1"
    # lowest_cost: d1 (cheaper) serves every request its circuit lets through; d2 (50x) is the fallback.
    cfg["deployments"]["d-d2"]["price"] = {"input_per_mtok": 50.0, "output_per_mtok": 100.0}
    cfg["models"]["m"]["strategy"] = "lowest_cost"
    cfg["models"]["m"]["max_attempts"] = max_attempts
    if models is not None:
        cfg["models"] = models
    cfg["keys"] = {
        "a": {"token": A, "team": "team-a", "role": "viewer"},
        "b": {"token": B, "team": "team-b", "role": "viewer"},
        "ops": {"token": OPS, "role": "admin"},
    }
    return await start_proxy(cfg), d1


async def _both_served_then_outage(proxy: Any, d1: D1) -> None:
    """A and B are served by d1 (four requests each), then d1 fails everyone."""
    for _ in range(4):
        assert await _chat(proxy, A, "hello") == "d-d1"
        assert await _chat(proxy, B, "hello") == "d-d1"
    d1.outage = True


async def _chat(proxy: Any, key: str, text: str) -> str:
    """The deployment that served a chat request, or the error status the client got."""
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as client:
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": text}]
            )
        except openai.APIStatusError as e:
            return f"error {e.status_code}"
    assert raw.parse().choices[0].message.content
    return raw.headers["x-edgeroute-deployment"]


async def _served(proxy: Any, key: str, text: str) -> tuple[str, str]:
    """The deployment that served a chat request, and the attempts it took (`x-edgeroute-attempts`)."""
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": text}]
        )
    return raw.headers["x-edgeroute-deployment"], raw.headers["x-edgeroute-attempts"]


async def _d1(proxy: Any, token: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments", headers=headers) as r:
        assert r.status == 200
        return next(d for d in (await r.json())["deployments"] if d["name"] == "d-d1")


async def test_a_key_striking_while_the_victim_is_quiet_then_polling_ejects_only_itself(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    proxy, d1 = await _setup(start_upstream, start_proxy, serve_routes)
    for _ in range(3):  # B was served, then goes quiet: too few requests to be evidence
        assert await _chat(proxy, B, "hello") == "d-d1"
    for _ in range(3):  # A strikes: d1 is ejected for A alone
        assert await _chat(proxy, A, BOOM) == "d-d2"
    state = await _d1(proxy, OPS)
    assert state["circuit"] == "closed" and state["senders_ejected"] == 1 and state["sender_ejections"] == 1, state
    assert (await _d1(proxy, A))["ejected_for_you"] is True
    assert (await _d1(proxy, B))["ejected_for_you"] is False
    calls = d1.calls
    victim: list[str] = []
    attacker: list[str] = []
    t0 = time.monotonic()

    async def poll() -> None:  # A's probes: every 50 ms, each failing on d1
        while time.monotonic() - t0 < 4.5:
            attacker.append(await _chat(proxy, A, BOOM))
            await asyncio.sleep(0.05)

    async def serve() -> None:
        while time.monotonic() - t0 < 4.5:
            victim.append(await _chat(proxy, B, "hello"))
            await asyncio.sleep(0.25)

    await asyncio.gather(poll(), serve())
    assert victim and set(victim) == {"d-d1"}, victim  # B never paid the 50x fallback
    assert set(attacker) == {"d-d2"}, attacker  # A is served too: by the fallback
    # A's failures reached d1 only as its own probes (after 1 s, 2 s of ejection): not each poll.
    assert d1.calls - calls - len(victim) <= 3, (d1.calls - calls, len(victim), len(attacker))
    # One more of A's: its ejection may have ended since its last poll (a loop stall of 0.5 s
    # moves its probes: 1 s, 1 s, 2 s ejections can end just after the polls stop), and then
    # this is its probe, which fails and ejects it again.
    assert await _chat(proxy, A, BOOM) == "d-d2"
    state = await _d1(proxy, OPS)
    assert state["circuit"] == "closed" and state["senders_ejected"] == 1, state


async def test_an_outage_both_keys_see_opens_for_both_and_both_come_back(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    proxy, d1 = await _setup(start_upstream, start_proxy, serve_routes)
    await _both_served_then_outage(proxy, d1)
    for key in (A, A, A, B, B, B):  # A's streak ejects d1 for A; B's own streak opens it for all
        assert await _chat(proxy, key, "hello") == "d-d2"
    state = await _d1(proxy, OPS)
    assert state["circuit"] == "open" and state["senders_ejected"] == 0, state
    calls = d1.calls
    for key in (A, B, A, B):
        assert await _chat(proxy, key, "hello") == "d-d2"
    assert d1.calls == calls  # open for everyone: no request reaches d1
    d1.outage = False
    await asyncio.sleep(1.1)  # the ejection ends: the next request probes, and closes it
    for key in (A, B, A, B):
        assert await _chat(proxy, key, "hello") == "d-d1", key
    state = await _d1(proxy, OPS)
    assert state["circuit"] == "closed" and state["senders_ejected"] == 0, state


async def test_with_one_attempt_neither_client_gets_a_503_once_an_outage_is_over(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    proxy, d1 = await _setup(start_upstream, start_proxy, serve_routes, max_attempts=1)
    await _both_served_then_outage(proxy, d1)
    seen = [await _chat(proxy, key, "hello") for key in (A, A, A, B, B, B)]  # each tried once: d1's 503 relayed
    assert all(s.startswith("error 5") for s in seen), seen
    state = await _d1(proxy, OPS)
    assert state["circuit"] == "open", state
    d1.outage = False
    got: dict[str, list[str]] = {A: [], B: []}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:  # through the ejection and the probe that closes it
        for key in (A, B):
            got[key].append(await _chat(proxy, key, "hello"))
        await asyncio.sleep(0.05)
    for key, answers in got.items():
        assert not [a for a in answers if a.startswith("error")], (key, answers)
        assert answers[-3:] == ["d-d1"] * 3, (key, answers)


def test_a_deployment_ejected_for_the_sender_is_skipped_before_an_attempt_is_counted() -> None:
    """With `max_attempts: 1`, a request of the ejected sender still reaches the next deployment
    (the skip spends no attempt: round 2's R1); with nothing else left, it is still tried."""
    price = Price(input_per_mtok=1.0, output_per_mtok=1.0)
    d1, d2 = (DeploymentInfo(i, f"d{i}", "m", "p", price, 0) for i in (1, 2))

    def policy(ejected: set[int]) -> FailoverPolicy:
        return FailoverPolicy(
            "m", ["d1", "d2"], Settings(1, 10, 100, 60),
            fallbacks_on=lambda _k: None, allowed=lambda _d: True, is_open=lambda _i: False,
            try_retry=lambda: True, remaining=lambda: 10.0, serving=lambda _i: True,
            sender_ejected=lambda i: i in ejected,
        )  # fmt: skip

    p = policy({1})
    state = p.start([d1, d2])
    step = p.next_attempt(state, None)
    assert isinstance(step, Try) and step.deployment == d2 and step.kind == "first", step
    assert state.sender_skipped == [d1] and state.attempts == 1
    p = policy({1})
    state = p.start([d1])
    step = p.next_attempt(state, None)
    assert isinstance(step, Try) and step.deployment == d1, step


async def test_one_stray_failure_of_another_key_while_one_is_ejected_keeps_d1_for_it(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    # redQ2 F1: while A's team is ejected from d1, one stray 503 of well-served B is not an
    # outage: B stays on the cheap d1 (it used to open d1 for everyone for the whole ejection).
    # redQ2 F2: A's first ejection is short (1 s); its failed probe then ejects it for base (20 s).
    proxy, d1 = await _setup(start_upstream, start_proxy, serve_routes, base_ejection_ms=20_000)
    for _ in range(8):
        assert await _chat(proxy, B, "hello") == "d-d1"
    for _ in range(3):
        assert await _chat(proxy, A, BOOM) == "d-d2"
    await asyncio.sleep(1.1)
    calls = d1.calls
    assert await _chat(proxy, A, BOOM) == "d-d2"
    assert d1.calls == calls + 1  # A's own probe, after 1 s rather than 20 s
    for _ in range(8):
        assert await _chat(proxy, B, "hello") == "d-d1"
    d1.fail_next = 1
    assert await _chat(proxy, B, "hello") == "d-d2"  # failed over within its own request
    for _ in range(4):
        assert await _chat(proxy, B, "hello") == "d-d1"
    state = await _d1(proxy, OPS)
    assert state["circuit"] == "closed" and state["senders_ejected"] == 1, state


async def test_a_busy_keys_requests_failing_together_in_a_blip_eject_it_once_and_briefly(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    # red3Q R1: A's 20 requests in flight fail together in a short blip of d1. The first streak
    # ejects d1 for A, briefly (1 s); the rest were sent before it and neither eject it again nor
    # double its ejection (they did: 18 ejections here, A kept on the 50x fallback for the 8 s max).
    proxy, d1 = await _setup(start_upstream, start_proxy, serve_routes)
    for _ in range(4):
        assert await _chat(proxy, B, "hello") == "d-d1"
    d1.blip, d1.to_hold = asyncio.Event(), 20
    burst = [asyncio.create_task(_chat(proxy, A, "hello")) for _ in range(20)]
    await asyncio.wait_for(d1.all_held.wait(), 10)
    d1.blip.set()
    d1.blip = None  # the blip is over: d1 serves again
    assert set(await asyncio.gather(*burst)) == {"d-d2"}  # each failed over
    state = await _d1(proxy, OPS)
    assert state["circuit"] == "closed" and state["sender_ejections"] == 1, state
    assert (await _d1(proxy, A))["ejected_for_you"] is True
    assert await _chat(proxy, B, "hello") == "d-d1"
    await asyncio.sleep(1.1)
    assert await _chat(proxy, A, "hello") == "d-d1"  # its probe, served: back on d1
    assert (await _d1(proxy, A))["ejected_for_you"] is False


async def test_an_outage_a_quiet_key_sees_twice_opens_for_all_once_the_busy_keys_probe_failed(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    # red3Q R2: with `max_attempts: 1`, an outage seen by A (ejected alone by its streak) and by
    # quiet B. A's probe fails too, and B's second failure opens d1 for everyone: B's next request
    # goes to d2, where it waited for a whole streak of its own failures (a 502 each).
    proxy, d1 = await _setup(start_upstream, start_proxy, serve_routes, max_attempts=1)
    await _both_served_then_outage(proxy, d1)
    assert [await _chat(proxy, A, "hello") for _ in range(3)] == ["error 502"] * 3
    assert (await _d1(proxy, OPS))["senders_ejected"] == 1
    assert await _chat(proxy, B, "hello") == "error 502"  # one failure of B: not yet an outage
    assert (await _d1(proxy, OPS))["circuit"] == "closed"
    await asyncio.sleep(1.1)
    assert await _chat(proxy, A, "hello") == "error 502"  # A's probe fails too
    assert await _chat(proxy, B, "hello") == "error 502"
    state = await _d1(proxy, OPS)
    assert state["circuit"] == "open", state
    assert await _chat(proxy, B, "hello") == "d-d2"
    assert await _chat(proxy, A, "hello") == "d-d2"


async def test_a_route_with_fallbacks_on_sends_the_ejected_keys_requests_to_the_fallback_first(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    # red3Q R3: model m has d1 alone, its fallback by `fallbacks_on`. Once d1 is ejected for A,
    # A's requests go to the fallback first (they went to d1 each time, failed, then fell back,
    # and each third failure counted another ejection).
    models = {
        "m": {"deployments": ["d-d1"], "fallbacks_on": {"server_error": ["m2"], "timeout": ["m2"]}},
        "m2": {"deployments": ["d-d2"]},
    }
    proxy, d1 = await _setup(start_upstream, start_proxy, serve_routes, base_ejection_ms=20_000, models=models)
    for _ in range(4):
        assert await _served(proxy, B, "hello") == ("d-d1", "1")
    for _ in range(3):
        assert await _served(proxy, A, BOOM) == ("d-d2", "2")  # d1's 503, then the fallback
    calls = d1.calls
    for _ in range(6):  # within A's first ejection (1 s)
        assert await _served(proxy, A, BOOM) == ("d-d2", "1")
    assert d1.calls == calls  # none of A's requests reached d1
    assert await _served(proxy, B, "hello") == ("d-d1", "1")
    state = await _d1(proxy, OPS)
    assert state["circuit"] == "closed" and state["sender_ejections"] == 1 and state["senders_ejected"] == 1, state
