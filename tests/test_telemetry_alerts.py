"""Alerts end to end: a real outage and recovery of a fault-injecting upstream, notified to
local webhook receivers; and the deployments history the dashboard reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute.bench.faults import FaultUpstream
from tests.conftest import RoutesServer, simple_config, start_routes
from tests.metrics_support import scrape
from tests.serve_support import free_port

MSG = [{"role": "user", "content": "hi"}]


class Receiver:
    """A webhook receiver: every POST body, by path."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[Any]] = {}
        self.server: RoutesServer | None = None

    async def start(self) -> str:
        async def hook(request: web.Request) -> web.Response:
            self.bodies.setdefault(request.path, []).append(await request.json())
            return web.Response(status=204)

        self.server = await start_routes(web.post("/{name}", hook))
        return self.server.url


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    yield r
    if r.server is not None:
        await r.server.close()


@pytest.fixture
async def faulty() -> AsyncIterator[FaultUpstream]:
    up = FaultUpstream()
    await up.start()
    yield up
    await up.stop()


async def _until(check: Any, within: float, poke: Any = None) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if poke is not None:
            await poke()
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached within {within} s")


async def test_outage_fires_and_recovery_resolves(
    start_upstream, start_proxy, faulty: FaultUpstream, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = await receiver.start()
    monkeypatch.setenv("EDGEROUTE_TEST_SLACK_URL", hooks + "/slack")
    healthy = await start_upstream()
    cfg = simple_config({"b": healthy})
    cfg["providers"]["a"] = {"base_url": faulty.url, "api_key": "key-a"}
    cfg["deployments"]["d-a"] = {
        "provider": "a", "model": "gpt-4o-mini", "weight": 1000, "price": {"input_per_mtok": 1, "output_per_mtok": 2},
    }  # fmt: skip
    cfg["models"]["m"]["deployments"] = ["d-a", "d-b"]
    cfg["health"] = {"consecutive_failures": 3, "base_ejection_ms": 300, "min_requests": 1000}
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    cfg["alerts"] = {
        "interval_s": 1,
        "cooldown_s": 0,
        "webhooks": {
            "ops": {"url": hooks + "/ops"},
            "chat": {"url": "env:EDGEROUTE_TEST_SLACK_URL", "format": "slack"},
            "dead": {"url": dead, "timeout_s": 1},
        },
        "rules": [
            {"name": "dep-errors", "kind": "error_rate", "threshold": 0.5, "window_s": 5, "min_requests": 3},
            {"name": "circuit", "kind": "circuit_open", "severity": "critical", "webhooks": ["ops"]},
        ],
    }
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    admin = aiohttp.ClientSession()

    async def alerts() -> dict[str, Any]:
        async with admin.get(proxy.url + "/admin/alerts") as r:
            assert r.status == 200
            body: dict[str, Any] = await r.json()
            return body

    async def traffic() -> None:
        t0 = time.perf_counter()
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG)
            assert raw.http_response.status_code == 200  # the outage is invisible to clients
        # An unreachable webhook slows nothing (one loopback answer well under its 1 s timeout).
        assert time.perf_counter() - t0 < 3

    try:
        # The outage: d-a answers 503; every request fails over to d-b.
        faulty.set_mode("503")

        async def fired() -> bool:
            names = {(a["rule"], a["subject"]) for a in (await alerts())["firing"]}
            return {("dep-errors", "d-a"), ("circuit", "d-a")} <= names

        await _until(fired, 20, traffic)
        firing = {a["rule"]: a for a in (await alerts())["firing"]}
        err = firing["dep-errors"]
        assert err["kind"] == "error_rate" and err["state"] == "firing" and err["severity"] == "warning"
        assert err["value"] > 0.5 and err["threshold"] == 0.5 and err["resolved_at"] is None
        assert set(err) == {
            "id", "rule", "kind", "subject", "severity", "state", "value", "threshold", "started_at",
            "resolved_at", "message", "instance",
        }  # fmt: skip
        assert "d-b" not in {a["subject"] for a in (await alerts())["firing"]}

        # Recovery: d-a answers again; once the window holds successes only, both resolve.
        faulty.clear()

        async def resolved() -> bool:
            body = await alerts()
            return not body["firing"] and {a["rule"] for a in body["recent"]} >= {"dep-errors", "circuit"}

        await _until(resolved, 30, traffic)
        recent = {a["rule"]: a for a in (await alerts())["recent"]}
        assert recent["dep-errors"]["state"] == "resolved"
        assert recent["dep-errors"]["resolved_at"] >= recent["dep-errors"]["started_at"]
        assert recent["circuit"]["message"].endswith("circuit closed — resolved")

        async def delivered() -> bool:
            ops = receiver.bodies.get("/ops", [])
            return sum(b["event"] == "resolved" for b in ops) == 2 and len(receiver.bodies.get("/slack", [])) == 2

        await _until(delivered, 10)
        ops = receiver.bodies["/ops"]
        # Deduplicated: one firing and one resolved message per alert, whatever the evaluations.
        assert sorted((b["event"], b["alert"]["rule"]) for b in ops) == [
            ("firing", "circuit"), ("firing", "dep-errors"), ("resolved", "circuit"), ("resolved", "dep-errors")
        ]  # fmt: skip
        assert all(b["source"] == "edgeroute" and b["alert"]["subject"] == "d-a" for b in ops)
        slack = [b["text"] for b in receiver.bodies["/slack"]]  # the circuit rule notifies "ops" only
        assert slack[0].startswith(":rotating_light: [FIRING] warning: dep-errors: d-a: error rate")
        assert slack[1].startswith(":white_check_mark: [RESOLVED]")
        # An operator checks a webhook's set-up with a test message.
        async with admin.post(proxy.url + "/admin/alerts/test?webhook=chat") as r:
            assert r.status == 200 and (await r.json()) == {"queued": ["chat"]}
        async with admin.post(proxy.url + "/admin/alerts/test?webhook=nope") as r:
            assert r.status == 404 and (await r.json())["error"]["param"] == "webhook"

        async def tested() -> bool:
            return len(receiver.bodies.get("/slack", [])) == 3

        await _until(tested, 10)
        assert receiver.bodies["/slack"][2]["text"].startswith(":information_source: [TEST] info: test:")

        async def dead_failed() -> bool:  # after its three attempts each (connection refused)
            m = await scrape(proxy.url)
            return m.value("edgeroute_alert_notifications_total", webhook="dead", result="failed") == 2

        await _until(dead_failed, 10)
        m = await scrape(proxy.url)
        assert m.value("edgeroute_alert_notifications_total", webhook="ops", result="sent") == 4
        assert m.value("edgeroute_alerts_firing", severity="warning") == 0
    finally:
        await admin.close()
        await client.close()


async def test_deployments_history(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    async with aiohttp.ClientSession() as s:

        async def history(query: str = "") -> dict[str, Any]:
            async with s.get(proxy.url + "/admin/deployments/history" + query) as r:
                assert r.status == 200
                body: dict[str, Any] = await r.json()
                return body

        async def sampled() -> bool:
            rows = (await history())["deployments"].get("d-a", [])
            return any(r["requests"] > 0 for r in rows)

        async def poke() -> None:
            await client.chat.completions.create(model="m", messages=MSG)

        await _until(sampled, 15, poke)
        body = await history("?since=10m")
        assert body["interval_s"] == 5
        row = next(r for r in body["deployments"]["d-a"] if r["requests"] > 0)
        assert set(row) == {"t", "circuit", "in_flight", "error_rate", "p50_ms", "p95_ms", "requests"}
        assert row["circuit"] == "closed" and row["error_rate"] == 0 and 0 < row["p50_ms"] <= row["p95_ms"]
        assert (await history(f"?since={time.time() + 60:.0f}"))["deployments"] == {"d-a": []}
        for bad, param in (("?since=yesterday", "since"), ("?since=-5m", "since"), ("?limit=3", "limit")):
            async with s.get(proxy.url + "/admin/deployments/history" + bad) as r:
                assert r.status == 400
                err = (await r.json())["error"]
                assert err["param"] == param and param in err["message"]
        async with s.get(proxy.url + "/admin/alerts?x=1") as r:
            assert r.status == 400
    await client.close()


def test_alert_config_errors() -> None:
    base = {
        "providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}},
        "deployments": {"d": {"provider": "p", "model": "x"}},
        "models": {"m": {"deployments": ["d"]}},
    }
    bad = {
        "webhooks": {"w": {"url": "ftp://example.invalid/x"}, "s": {"url": "env:EDGEROUTE_TEST_NO_SUCH_VAR"}},
        "rules": [
            {"name": "r1", "kind": "error_rate", "threshold": 0.2, "deployments": ["nope"]},
            {"name": "r2", "kind": "latency_p95", "threshold": 100, "webhooks": ["missing"]},
        ],
    }
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse({**base, "alerts": bad}, "t.yaml")
    text = "\n".join(e.value.errors)
    assert "alerts" in text and "missing" in text
    bad["rules"] = bad["rules"][:1]  # type: ignore[index]
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse({**base, "alerts": bad}, "t.yaml")
    text = "\n".join(e.value.errors)
    assert "alerts.rules[0].deployments[0]: unknown deployment 'nope'" in text
    assert "alerts.webhooks.w.url: a webhook URL starts with http" in text
    assert "alerts.webhooks.s.url" in text and "EDGEROUTE_TEST_NO_SUCH_VAR" in text
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse({**base, "alerts": {"rules": [{"name": "x", "kind": "nonsense"}]}}, "t.yaml")
    assert "alerts.rules[0].kind" in "\n".join(e.value.errors)


async def test_poison_requests_alert(start_proxy, faulty: FaultUpstream) -> None:
    """A request that makes two healthy deployments fail the same way is a poison request; the rule counts them."""
    cfg: dict[str, Any] = {
        "providers": {"f": {"base_url": faulty.url, "api_key": "key-f"}},
        "deployments": {
            name: {"provider": "f", "model": "gpt-4o-mini", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}
            for name in ("d-a", "d-b")
        },
        "models": {"m": {"deployments": ["d-a", "d-b"]}},
        "alerts": {"interval_s": 1, "rules": [{"name": "poison", "kind": "poison_requests", "threshold": 0}]},
    }
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        for _ in range(6):  # both deployments serve other requests
            await client.chat.completions.create(model="m", messages=MSG)
        faulty.set_mode("500", count=2)  # this request's two attempts both get the same 500
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model="m", messages=MSG)
        assert e.value.status_code == 502
        assert proxy.recorder.records[-1].error_class == "poison"
        async with aiohttp.ClientSession() as s:

            async def fired() -> bool:
                async with s.get(proxy.url + "/admin/alerts") as r:
                    return any(a["rule"] == "poison" and a["value"] == 1 for a in (await r.json())["firing"])

            await _until(fired, 10)
        m = await scrape(proxy.url)
        assert m.value("edgeroute_request_errors_total", route="m", error_class="poison") == 1
    finally:
        await client.close()
