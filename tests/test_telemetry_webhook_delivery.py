"""Webhook delivery: a webhook that fails for a moment is tried again, one that refuses is
not, one that hangs delays nothing but its own messages, and no URL reaches a log.

Each notification was one attempt: a webhook answering 503 once (a deploy of the chat
service, a load balancer's blip) lost the alert. And one task sent every webhook's
messages in turn, so a webhook that hung held every other webhook's alerts for its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import eventually, simple_config, start_routes
from tests.metrics_support import scrape

TOKEN = "T0KEN-in-the-url-4b1d"


async def test_retries_backoff_no_redirects_and_a_hung_webhook_delays_only_itself(
    start_upstream: Any, start_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hits: dict[str, list[float]] = {}

    async def hook(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hits.setdefault(name, []).append(time.monotonic())
        await request.read()
        if name == "flaky" and len(hits[name]) < 3:
            return web.Response(status=503)
        if name == "refuses":
            return web.Response(status=400)
        if name == "moved":
            raise web.HTTPTemporaryRedirect("/elsewhere")
        if name == "hangs":
            await asyncio.Event().wait()
        return web.Response(status=204)

    server = await start_routes(web.post("/{name}", hook))
    base = server.url
    cfg = simple_config({"b": await start_upstream()})
    cfg["alerts"] = {
        "webhooks": {  # the hung one first: one sender for all sent it first
            name: {"url": f"{base}/{name}?token={TOKEN}", "timeout_s": 2}
            for name in ("hangs", "flaky", "refuses", "moved", "ok")
        },
    }
    proxy = await start_proxy(cfg)
    caplog.set_level(logging.INFO, "edgeroute")
    try:
        async with aiohttp.ClientSession() as s, s.post(proxy.url + "/admin/alerts/test") as r:
            assert r.status == 200
        ok = await eventually(lambda: _got(hits, "ok"), "the healthy webhook's message", within=10)

        async def settled() -> bool:
            m = await scrape(proxy.url)
            return m.total("edgeroute_alert_notifications_total") == 5

        await eventually(settled, "every webhook's message settled", within=20)
        # Not after the hung webhook's 2 s timeout: judged from when the hung one was called (a
        # stall of the host delays both), not from when the test began.
        assert ok[0] - hits["hangs"][0] < 2.0, "the healthy webhook waited for the hung one"
        m = await scrape(proxy.url)
        result = {
            name: next(
                r for r in ("sent", "failed") if m.value("edgeroute_alert_notifications_total", webhook=name, result=r)
            )
            for name in ("hangs", "flaky", "refuses", "moved", "ok")
        }
        assert result == {"hangs": "failed", "flaky": "sent", "refuses": "failed", "moved": "failed", "ok": "sent"}
        counts = {name: len(times) for name, times in hits.items()}
        assert counts == {"hangs": 3, "flaky": 3, "refuses": 1, "moved": 1, "ok": 1}  # no "elsewhere"
        gaps = [b - a for a, b in zip(hits["flaky"], hits["flaky"][1:], strict=False)]
        assert gaps[0] >= 0.45 and gaps[1] >= 1.9  # backoff, longer each time
        assert TOKEN not in caplog.text and base not in caplog.text
        assert "webhook 'flaky' failed (HTTP 503); trying again" in caplog.text
        assert "webhook 'hangs' failed (TimeoutError)" in caplog.text
    finally:
        await server.close()


async def _got(hits: dict[str, list[float]], name: str) -> list[float]:
    return hits.get(name, [])


async def test_a_webhook_whose_answer_never_ends_is_told_once(start_upstream: Any, start_proxy: Any) -> None:
    """A receiver that answers 200 at once and then streams its body without end (a hostile
    or broken one): its status is the answer. The body was read to its end within the
    timeout, held in memory meanwhile (at loopback speed, gigabytes), and the delivered alert
    counted failed and sent twice more."""
    hits: list[float] = []
    sent_bytes = [0]

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        hits.append(time.monotonic())
        resp = web.StreamResponse(status=200)
        await resp.prepare(request)
        chunk = b"x" * 2**20
        with contextlib.suppress(ConnectionError):
            while True:
                await resp.write(chunk)
                sent_bytes[0] += len(chunk)
        return resp

    server = await start_routes(web.post("/hook", endless))
    cfg = simple_config({"b": await start_upstream()})
    cfg["alerts"] = {"webhooks": {"endless": {"url": f"{server.url}/hook", "timeout_s": 2}}}
    proxy = await start_proxy(cfg)
    try:
        async with aiohttp.ClientSession() as s, s.post(proxy.url + "/admin/alerts/test") as r:
            assert r.status == 200

        async def settled() -> float:
            m = await scrape(proxy.url)
            return m.total("edgeroute_alert_notifications_total")

        await eventually(settled, "the message settled", within=15)
        m = await scrape(proxy.url)
        assert m.value("edgeroute_alert_notifications_total", webhook="endless", result="sent") == 1
        assert len(hits) == 1
        assert sent_bytes[0] < 64 * 2**20  # the receiver's stream was not read on
    finally:
        await server.close()


def test_a_slack_message_shows_names_as_written() -> None:
    """A name in an alert (a key's, a team's) holding Slack's markup is shown, not acted on: no
    `<!channel>` ping for everyone, no link whose text hides where it goes."""
    import orjson

    from edgeroute.telemetry.notify import Notification, body_for

    message = "dep-errors: d-a: error rate 50% (team <!channel> & <https://evil.example|sign in again>: set aside)"
    alert = {"severity": "critical", "message": message}
    text = orjson.loads(body_for("slack", Notification("chat", "firing", alert)))["text"]
    assert "<" not in text and ">" not in text
    assert "team &lt;!channel&gt; &amp; &lt;https://evil.example|sign in again&gt;" in text
    # The generic JSON body carries the alert as it is: its reader escapes for its own medium.
    assert orjson.loads(body_for("json", Notification("ops", "firing", alert)))["alert"]["message"] == message
