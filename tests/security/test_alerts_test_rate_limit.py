"""`POST /admin/alerts/test` is rate limited per caller.

Each call queued a test notification to every webhook (every pager and on-call channel) with
no bound: an operator's key, or a script holding one, could page the on-call rota as fast as it
could send requests. Now a caller gets ALERT_TESTS_PER_MINUTE of them a minute (a token bucket);
past it, 429 in the OpenAI error format with `Retry-After`, and nothing is sent. Each one sent
is audited (`alerts.test`) under the caller's key.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import eventually, simple_config, start_routes

ALERT_TESTS_PER_MINUTE = 3  # as `edgeroute.telemetry.app` has it
ROOT, OPS, OPS2 = "tok-root-0123456789", "tok-ops-0123456789", "tok-ops2-0123456789"


async def _post(url: str, token: str) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s, s.post(url) as r:
        return r.status, await r.json(), r.headers


async def test_a_caller_cannot_page_the_webhooks_without_bound(start_upstream: Any, start_proxy: Any) -> None:
    hits: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        hits.append(request.match_info["name"])
        await request.read()
        return web.Response(status=204)

    receiver = await start_routes(web.post("/{name}", hook))
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {
        "root": {"token": ROOT, "role": "admin"},
        "ops": {"token": OPS, "role": "operator"},
        "ops2": {"token": OPS2, "role": "operator"},
    }
    cfg["alerts"] = {"webhooks": {"pager": {"url": f"{receiver.url}/pager"}}}
    proxy = await start_proxy(cfg)
    test = proxy.url + "/admin/alerts/test"

    for _ in range(ALERT_TESTS_PER_MINUTE):
        status, body, _ = await _post(test, OPS)
        assert status == 200 and body == {"queued": ["pager"]}, body
    status, body, headers = await _post(test, OPS)
    assert status == 429, body
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "alerts_test_rate_limited", body
    assert 1 <= int(headers["Retry-After"]) <= 60 // ALERT_TESTS_PER_MINUTE, headers
    status, body, _ = await _post(test + "?webhook=pager", OPS)
    assert status == 429, body
    # A probe for an unknown webhook pages no one but writes an audit entry: it counts too.
    status, body, _ = await _post(test + "?webhook=nope", OPS)
    assert status == 429, body
    # Another caller has its own allowance.
    status, body, _ = await _post(test, OPS2)
    assert status == 200, body

    sent = ALERT_TESTS_PER_MINUTE + 1

    async def delivered() -> bool:
        return len(hits) >= sent

    await eventually(delivered, "the test notifications at the webhook", within=10)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ROOT}"}) as s,
        s.get(proxy.url + "/admin/audit?action=alerts.test") as r,
    ):
        entries = (await r.json())["entries"]
    tested = [e["actor"] for e in entries if e["action"] == "alerts.test"]
    assert sorted(tested) == sorted(["ops"] * ALERT_TESTS_PER_MINUTE + ["ops2"]), entries
    assert hits == ["pager"] * sent


async def test_probes_for_unknown_webhooks_cannot_fill_the_audit(start_upstream: Any, start_proxy: Any) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}, "ops": {"token": OPS, "role": "operator"}}
    proxy = await start_proxy(cfg)
    statuses = [(await _post(proxy.url + "/admin/alerts/test?webhook=bogus", OPS))[0] for _ in range(20)]
    assert statuses == [404] * ALERT_TESTS_PER_MINUTE + [429] * (20 - ALERT_TESTS_PER_MINUTE), statuses
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ROOT}"}) as s,
        s.get(proxy.url + "/admin/audit?action=alerts.test_refused") as r,
    ):
        entries = (await r.json())["entries"]
    assert len(entries) == ALERT_TESTS_PER_MINUTE, entries
