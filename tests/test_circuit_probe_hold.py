"""One client cannot hold a deployment's circuit open by winning its half-open probes (red team
round 2, session 29, B2).

Key A (team a) sends prompts deployment d1 fails (503), polling it; key B (team b) sends ordinary
requests. A's failures open d1's circuit while B has no recent requests to judge by. B, routed
past d1 while it is open, is noted as waiting for it: once half-open, A's requests are routed on
to d2 (d1 not called) and the probe is B's, which d1 serves: d1 closes, and B is served by d1
while A keeps failing (d1 served B since: B's requests are evidence enough that A's failures are
A's alone). A genuine outage fails B's probe too: d1 stays open and everyone is on d2. Seen
through the openai SDK, `/admin/deployments` and `/metrics`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from edgeroute.dispatch import senders
from tests.conftest import simple_config
from tests.metrics_support import scrape
from tests.test_circuit_one_sender import BOOM, D1, OPS, A, B


@pytest.fixture(autouse=True)
def _own_log_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A withheld trip here is logged in a window of this test's own: the once-a-minute log of
    another test in this process (`test_circuit_one_sender`) is not silenced by these."""
    monkeypatch.setattr(senders, "_logged", {})


class Counted(D1):
    """Deployment d1's upstream (503 for the marker, or for all in an outage), counting calls."""

    calls = 0

    async def chat(self, request: web.Request) -> web.Response:
        self.calls += 1
        return await super().chat(request)


async def _setup(start_upstream: Any, start_proxy: Any, serve_routes: Any, layout: str) -> tuple[Any, Counted]:
    d1 = Counted()
    up1 = await serve_routes(web.post("/v1/chat/completions", d1.chat))
    d2 = await start_upstream()
    cfg = simple_config(
        {"d1": d2, "d2": d2},
        health={
            "consecutive_failures": 3,
            "min_requests": 6,
            "base_ejection_ms": 1_000,
            "max_ejection_ms": 60_000,
            "max_ejected_percent": 100,  # an open circuit is routed past even as a route's only one
        },
    )
    cfg["providers"]["d1"]["base_url"] = up1.url + "/v1"
    # d2 costs five times as much: the victim pays for every request d1's circuit sends there.
    cfg["deployments"]["d-d2"]["price"] = {"input_per_mtok": 5.0, "output_per_mtok": 10.0}
    if layout == "one route":  # lowest_cost over both: d1 serves whatever its circuit lets through
        cfg["models"]["m"]["strategy"] = "lowest_cost"
    else:  # d2 serves another model, m's fallback
        cfg["models"] = {"m": {"deployments": ["d-d1"], "fallbacks": ["m2"]}, "m2": {"deployments": ["d-d2"]}}
    cfg["keys"] = {
        "a": {"token": A, "team": "team-a"},
        "b": {"token": B, "team": "team-b"},
        "ops": {"token": OPS, "role": "admin"},
    }
    return await start_proxy(cfg), d1


async def _chat(client: openai.AsyncOpenAI, text: str) -> str:
    """The deployment that served a chat request (it is always served: d2 takes d1's failures)."""
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": text}]
    )
    assert raw.parse().choices[0].message.content
    return raw.headers["x-edgeroute-deployment"]


async def _d1(proxy: Any) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {OPS}"}
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments", headers=headers) as r:
        assert r.status == 200
        return next(d for d in (await r.json())["deployments"] if d["name"] == "d-d1")


def _client(proxy: Any, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("layout", ["one route", "fallback model"])
async def test_a_client_polling_failed_probes_does_not_keep_the_victim_off_the_deployment(
    start_upstream: Any, start_proxy: Any, serve_routes: Any, layout: str
) -> None:
    proxy, d1 = await _setup(start_upstream, start_proxy, serve_routes, layout)
    async with _client(proxy, A) as attacker, _client(proxy, B) as victim:
        for _ in range(3):  # B has not been here lately: A's failures open d1
            assert await _chat(attacker, BOOM) == "d-d2"
        assert (await _d1(proxy))["circuit"] == "open"
        assert await _chat(victim, "hello") == "d-d2"  # routed past d1: B waits for it
        await asyncio.sleep(1.1)  # the ejection is over: half-open
        calls = d1.calls
        for _ in range(3):  # A comes first, each time: routed on to d2, d1 not called
            assert await _chat(attacker, BOOM) == "d-d2"
        assert d1.calls == calls
        state = await _d1(proxy)
        assert state["circuit"] == "half_open" and state["probes_reassigned"] == 3, state
        # B's next request is the probe, d1 serves it; then A polls every 50 ms and keeps
        # failing, and B is served by d1 every time (d1 served B since: A's failures are A's).
        served: list[str] = []
        attacker_served: list[str] = []
        t0 = time.monotonic()

        async def attack() -> None:
            await asyncio.sleep(0.01)  # B's probe first
            while time.monotonic() - t0 < 3:
                attacker_served.append(await _chat(attacker, BOOM))
                await asyncio.sleep(0.05)

        async def use() -> None:
            while time.monotonic() - t0 < 3:
                served.append(await _chat(victim, "hello"))
                await asyncio.sleep(0.2)

        await asyncio.gather(attack(), use())
    assert set(attacker_served) == {"d-d2"} and len(attacker_served) > 20
    assert served and set(served) == {"d-d1"}, served
    assert d1.calls > calls + len(attacker_served) // 2  # A's requests did reach d1, and failed
    state = await _d1(proxy)
    assert state["circuit"] == "closed" and state["trips_withheld"] > 0, state
    m = await scrape(proxy.url, OPS)
    assert m.value("edgeroute_circuit_probes_reassigned_total", deployment="d-d1") == 3
    assert m.value("edgeroute_circuit_probes_reassigned_total", deployment="d-d2") == 0


async def test_a_genuine_outage_keeps_everyone_on_the_fallback(
    start_upstream: Any, start_proxy: Any, serve_routes: Any
) -> None:
    proxy, d1 = await _setup(start_upstream, start_proxy, serve_routes, "fallback model")
    async with _client(proxy, A) as a, _client(proxy, B) as b:
        for _ in range(3):
            assert await _chat(a, "hello") == "d-d1"
            assert await _chat(b, "hello") == "d-d1"
        d1.outage = True
        got: list[str] = []
        t0 = time.monotonic()

        async def use(client: openai.AsyncOpenAI, every: float) -> None:
            while time.monotonic() - t0 < 4:
                got.append(await _chat(client, "hello"))
                await asyncio.sleep(every)

        await asyncio.gather(use(a, 0.05), use(b, 0.2))
    assert set(got) == {"d-d2"} and len(got) > 30
    state = await _d1(proxy)
    # Opened at once, then each probe failed: ejected for 1, 2, then 4 s.
    assert state["circuit"] == "open", state
    assert d1.calls <= 3 * 2 + 2 + 3, d1.calls  # the first failures and a few probes, no more
