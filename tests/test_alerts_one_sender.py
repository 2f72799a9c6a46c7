"""One team cannot fire the gateway's deployment alerts with traffic it chooses.

Every sender's attempts were judged whole: a team asking for long generations (`max_tokens`)
fired `latency_p95` (`slow: d: p95 latency 3009 ms`) while the other team's answers took
milliseconds, and a team whose crafted input makes the upstream fail fired `error_rate` while
the other team got 200s (the circuit knew: it withheld those trips as one sender's). The alerts
now judge, as the rollback guard does, a stream's first token and short answers, and set aside
the most failing sender while the others are served well; a deployment slow or failing for
everyone still fires. A firing alert's message also followed its value no longer: frozen at the
value it fired at while `value` moved on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from edgeroute.accounting import AttemptRecord, RequestRecord
from edgeroute.telemetry.alerts import AlertEngine
from edgeroute.telemetry.notify import Notifier
from edgeroute.telemetry.window import Window
from tests.conftest import Proxy, ServeRoutes, eventually

ROOT = "tok-root-0123456789abcdef"
MS_PER_TOKEN = 0.004  # the upstream's generation speed: 150 tokens take 0.6 s
THRESHOLD_MS = 300
HI: Any = [{"role": "user", "content": "hi"}]
POISON: Any = [{"role": "user", "content": "poison: an input this upstream fails on"}]


class _Upstream:
    """A chat upstream that writes `max_tokens` tokens at MS_PER_TOKEN each after a first-token
    delay of `first_s`; it answers 500 to a poisoned prompt, and to everything once `broken`."""

    def __init__(self) -> None:
        self.first_s = 0.0
        self.broken = False
        self.heavy_s = 0.0  # a prompt marked `heavy` (long, hard) waits this long for its first token

    def route(self) -> web.RouteDef:
        return web.post("/v1/chat/completions", self.generate)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or 8)
        if self.broken or "poison" in str(body["messages"]):
            return web.json_response({"error": {"message": "down", "type": "server_error"}}, status=500)
        await asyncio.sleep(self.first_s + (self.heavy_s if "heavy" in str(body["messages"]) else 0.0))
        usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}
        if not body.get("stream"):
            await asyncio.sleep(n * MS_PER_TOKEN)
            return web.json_response({
                "id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * n},
                             "finish_reason": "stop"}],
                "usage": usage,
            })  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        for i in range(n):
            if i:
                await asyncio.sleep(MS_PER_TOKEN)
            delta = {"choices": [{"index": 0, "delta": {"content": "x "}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk | delta)}\n\n".encode())
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await resp.write(f"data: {json.dumps(chunk | end)}\n\n".encode())
        await resp.write(f"data: {json.dumps(chunk | {'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _config(base_url: str, rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "providers": {"p": {"base_url": base_url, "api_key": "key-p"}},
        "deployments": {
            "d": {"provider": "p", "model": "gpt-4o-mini", "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
        },
        "models": {"m": {"deployments": ["d"]}},
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        # The circuit stays closed: the alerts are what is tested, not the circuit.
        "health": {"consecutive_failures": 1000, "min_requests": 1000},
        # As the README shows, with a short window and evaluation interval.
        "alerts": {"interval_s": 1, "cooldown_s": 0, "rules": [{"window_s": 5, "min_requests": 5, **rule}]},
    }


class _Gateway:
    def __init__(self, proxy: Proxy, session: aiohttp.ClientSession) -> None:
        self.url = proxy.url
        self.session = session
        self.clients: list[openai.AsyncOpenAI] = []

    async def key(self, name: str, team: str) -> tuple[str, openai.AsyncOpenAI]:
        """A managed service key of `team`: its secret and an SDK client with it."""
        body = {"name": name, "team": team}
        async with self.session.post(self.url + "/admin/keys", json=body, headers=_auth(ROOT)) as r:
            assert r.status == 201, await r.text()
            secret = str((await r.json())["secret"])
        self.clients.append(openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=secret, max_retries=0))
        return secret, self.clients[-1]

    async def firing(self, rule: str, token: str = ROOT) -> dict[str, Any] | None:
        async with self.session.get(self.url + "/admin/alerts", headers=_auth(token)) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        return next((a for a in body["firing"] if a["rule"] == rule), None)

    async def stays_quiet(self, rule: str) -> None:
        """Through three evaluations (one a second), `rule` does not fire."""
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            assert await self.firing(rule) is None, await self.firing(rule)
            await asyncio.sleep(0.2)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _fails(client: openai.AsyncOpenAI, messages: Any = HI) -> None:
    """One request that the upstream fails (a 500 after the proxy's retries)."""
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="m", messages=messages, max_tokens=4)


@pytest.fixture
async def gateway(start_proxy: Any, serve_routes: ServeRoutes, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    upstream = _Upstream()
    up = await serve_routes(upstream.route())
    proxy = await start_proxy(_config(up.url + "/v1", request.param))
    async with aiohttp.ClientSession() as session:
        gw = _Gateway(proxy, session)
        yield upstream, gw
        for client in gw.clients:
            await client.close()


LATENCY = {"name": "slow", "kind": "latency_p95", "threshold": THRESHOLD_MS}
FIRST_TOKEN = {"name": "slow", "kind": "ttft_p95", "threshold": THRESHOLD_MS}
HEAVY: Any = [{"role": "user", "content": "heavy: a prompt this deployment is slow on"}]
ERRORS = {"name": "dep-errors", "kind": "error_rate", "threshold": 0.2}


@pytest.mark.parametrize("gateway", [LATENCY], indirect=True)
async def test_long_generations_of_one_team_do_not_fire_the_latency_alert(gateway: Any) -> None:
    upstream, gw = gateway
    _, alpha = await gw.key("alpha-app", "alpha")
    _, beta = await gw.key("beta-app", "beta")
    for _ in range(10):  # alpha's ordinary answers: a few tokens, ~30 ms
        await alpha.chat.completions.create(model="m", messages=HI, max_tokens=8)
    # Beta asks for long generations, whole and streamed: 0.6 s each, twice the threshold.
    essays = [beta.chat.completions.create(model="m", messages=HI, max_tokens=150) for _ in range(6)]
    answers = await asyncio.gather(*essays)
    assert all(a.usage is not None and a.usage.completion_tokens == 150 for a in answers)

    async def streamed() -> int:
        stream = await beta.chat.completions.create(model="m", messages=HI, max_tokens=150, stream=True)
        return sum([1 async for c in stream if c.choices and c.choices[0].delta.content])

    assert await asyncio.gather(*(streamed() for _ in range(4))) == [150] * 4
    await gw.stays_quiet("slow")

    # The deployment's first token becomes slow, for everyone: that fires.
    upstream.first_s = 0.4

    async def short_stream() -> None:
        stream = await alpha.chat.completions.create(model="m", messages=HI, max_tokens=4, stream=True)
        async for _ in stream:
            pass

    await asyncio.gather(*(short_stream() for _ in range(8)))
    alert = await eventually(lambda: gw.firing("slow"), "the slow first token's alert", within=5)
    assert alert["subject"] == "d" and alert["value"] >= 400, alert
    assert f"p95 latency {alert['value']:.0f} ms (first token" in alert["message"], alert


@pytest.mark.parametrize("gateway", [LATENCY, FIRST_TOKEN], indirect=True)
async def test_one_teams_slow_prompts_do_not_fire_the_latency_alert(gateway: Any) -> None:
    """Beta's prompts are slow to answer (0.6 s to a first token, short answers): the alert judged
    its answers with alpha's and fired for a deployment that answers alpha in milliseconds."""
    upstream, gw = gateway
    upstream.heavy_s = 0.6
    _, alpha = await gw.key("alpha-app", "alpha")
    _, beta = await gw.key("beta-app", "beta")

    async def short_stream(client: openai.AsyncOpenAI, messages: Any = HI) -> None:
        stream = await client.chat.completions.create(model="m", messages=messages, max_tokens=4, stream=True)
        async for _ in stream:
            pass

    for _ in range(10):
        await short_stream(alpha)
    await asyncio.gather(*(short_stream(beta, HEAVY) for _ in range(8)))
    # Beta's whole answers too, where the rule judges them (short ones).
    await asyncio.gather(*(beta.chat.completions.create(model="m", messages=HEAVY, max_tokens=4) for _ in range(4)))
    await gw.stays_quiet("slow")

    # The deployment becomes slow for everyone: that fires, judged whole.
    upstream.first_s = 0.4
    await asyncio.gather(*(short_stream(c) for c in (alpha, beta) * 5))
    alert = await eventually(lambda: gw.firing("slow"), "the slow deployment's alert", within=5)
    assert alert["subject"] == "d" and alert["value"] >= 400, alert
    assert "set aside" not in alert["message"], alert


@pytest.mark.parametrize("gateway", [ERRORS], indirect=True)
async def test_one_teams_failing_requests_do_not_fire_the_error_alert(gateway: Any) -> None:
    upstream, gw = gateway
    beta_secret, beta = await gw.key("beta-app", "beta")
    _, alpha = await gw.key("alpha-app", "alpha")
    for _ in range(10):
        await alpha.chat.completions.create(model="m", messages=HI, max_tokens=4)
    for _ in range(10):  # beta's crafted input: the upstream fails on it
        await _fails(beta, POISON)
    await gw.stays_quiet("dep-errors")

    # The deployment fails everyone: that fires, judged whole as before.
    upstream.broken = True
    for client in (alpha, beta) * 4:
        await _fails(client)
    alert = await eventually(lambda: gw.firing("dep-errors"), "the outage's alert", within=5)
    assert alert["subject"] == "d" and alert["value"] > 0.5, alert
    assert f"error rate {alert['value']:.1%}" in alert["message"] and "set aside" not in alert["message"], alert
    # Only global keys read the alerts (a message may name a team): a team's key gets a 403.
    async with gw.session.get(gw.url + "/admin/alerts", headers=_auth(beta_secret)) as r:
        assert r.status == 403


@pytest.mark.parametrize("gateway", [ERRORS], indirect=True)
async def test_a_firing_alerts_message_says_its_current_value(gateway: Any) -> None:
    upstream, gw = gateway
    _, alpha = await gw.key("alpha-app", "alpha")
    upstream.broken = True
    for _ in range(6):
        await _fails(alpha)
    fired = await eventually(lambda: gw.firing("dep-errors"), "the outage's alert", within=5)
    assert fired["value"] == 1.0 and "error rate 100.0%" in fired["message"], fired
    upstream.broken = False  # half recovered: the rate falls, still over the threshold
    for _ in range(4):
        await alpha.chat.completions.create(model="m", messages=HI, max_tokens=4)

    async def moved() -> dict[str, Any] | None:
        alert = await gw.firing("dep-errors")
        return alert if alert is not None and alert["value"] < 1.0 else None

    alert = await eventually(moved, "the alert's value updated", within=5)
    assert alert is not None
    assert alert["id"] == fired["id"] and alert["value"] > 0.2, alert  # failed attempts retried: not 6 of 10
    assert f"error rate {alert['value']:.1%}" in alert["message"] and "100.0%" not in alert["message"], alert


def _rec(team: str, ok: bool, t: float) -> RequestRecord:
    r = RequestRecord("req", t, "m", route="m", status=200 if ok else 500, team=team)
    r.attempts.append(AttemptRecord("d-a", "p", "success" if ok else "server_error", 200 if ok else 500, 10.0))
    return r


async def test_the_resolved_message_says_whose_failures_were_set_aside() -> None:
    """An outage for everyone fires; once only one team's requests fail while the other's are
    served, the alert resolves, and its message says that team's attempts were set aside."""
    from tests.test_telemetry_alert_rules import T0, _live

    rule = {"name": "errs", "kind": "error_rate", "threshold": 0.2, "window_s": 10, "min_requests": 5}
    live, cfg = _live({"cooldown_s": 0, "rules": [rule]})
    engine, window = AlertEngine(Notifier()), Window()
    for team in ("alpha", "beta") * 5:
        window.add(_rec(team, False, T0), T0)
    engine.evaluate(cfg, live, window, (), T0 + 1)
    (alert,) = engine.firing.values()
    assert alert.value == 1.0 and "set aside" not in alert.message
    later = T0 + 20  # the outage's slots are out of the window
    for ok, team in [(True, "alpha")] * 10 + [(False, "beta")] * 10:
        window.add(_rec(team, ok, later), later)
    engine.evaluate(cfg, live, window, (), later + 1)
    assert not engine.firing and engine.recent[0].value == 0.0
    assert "team beta: 10 failed of 10 attempts set aside, the others served well" in engine.recent[0].message


def _timed(team: str, ms: float, t: float) -> RequestRecord:
    r = RequestRecord("req", t, "m", route="m", status=200, team=team, stream=True)
    r.attempts.append(AttemptRecord("d-a", "p", "success", 200, ms, ttft_ms=ms))
    return r


async def test_the_resolved_latency_message_says_whose_slow_answers_were_set_aside() -> None:
    """A slow deployment fires; once only one team's answers are slow (here the team floods:
    far more answers than the others, which the shared reservoir would have crowded out), the
    alert resolves at the others' p95 and its message says that team's answers were set aside."""
    from tests.test_telemetry_alert_rules import T0, _live

    rule = {"name": "slow", "kind": "latency_p95", "threshold": 300, "window_s": 10, "min_requests": 5}
    live, cfg = _live({"cooldown_s": 0, "rules": [rule]})
    engine, window = AlertEngine(Notifier()), Window()
    for team in ("alpha", "beta") * 5:
        window.add(_timed(team, 900.0, T0), T0)
    engine.evaluate(cfg, live, window, (), T0 + 1)
    (alert,) = engine.firing.values()
    assert alert.value == 900.0 and "set aside" not in alert.message
    later = T0 + 20
    for ms, team in [(40.0, "alpha")] * 10 + [(900.0, "beta")] * 2000:
        window.add(_timed(team, ms, later), later)
    engine.evaluate(cfg, live, window, (), later + 1)
    assert not engine.firing and engine.recent[0].value == 40.0, engine.recent[0]
    assert "team beta: 2000 of 2000 answers over the threshold set aside" in engine.recent[0].message
