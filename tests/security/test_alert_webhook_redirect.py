"""A webhook that redirects does not carry an alert, nor the webhook's secret headers, to another host.

A webhook's `headers` hold credentials (`Authorization`, a token header) by reference, for
the URL the config names. aiohttp follows redirects by default, a 307 keeping the method,
the body and every header but `Authorization`: a receiver that answered with a redirect (a
moved endpoint, a compromised or typo-squatted host) had the notification and the webhook's
token header sent on to a host the config never named. A redirect is now the webhook's
failure, counted as such.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import simple_config, start_routes
from tests.metrics_support import scrape

TOKEN = "hook-token-5f1d2c3b4a"


class Hosts:
    """A webhook receiver on 127.0.0.1 that redirects every POST to another on `localhost`."""

    def __init__(self) -> None:
        self.moved: list[web.Request] = []
        self.elsewhere: list[dict[str, str]] = []
        self.servers: list[TestServer] = []

    async def start(self) -> str:
        async def other(request: web.Request) -> web.Response:
            self.elsewhere.append(dict(request.headers))
            return web.Response(status=204)

        other_host = await start_routes(web.post("/{p}", other))

        async def moved(request: web.Request) -> web.Response:
            self.moved.append(request)
            raise web.HTTPTemporaryRedirect(f"http://localhost:{other_host.port}/stolen")

        first = await start_routes(web.post("/{p}", moved))
        self.servers = [other_host, first]
        return first.url + "/hook"


@pytest.fixture
async def hosts() -> AsyncIterator[Hosts]:
    h = Hosts()
    yield h
    for s in h.servers:
        await s.close()


async def test_a_redirecting_webhook_sends_nothing_to_the_other_host(
    start_upstream: Any, start_proxy: Any, hosts: Hosts
) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    url = await hosts.start()
    cfg["alerts"] = {"webhooks": {"w": {"url": url, "headers": {"X-Hook-Token": TOKEN}}}, "rules": []}
    proxy = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/admin/alerts/test?webhook=w") as r:
            assert r.status == 200
        for _ in range(200):  # the notifier sends in the background
            m = await scrape(proxy.url)
            if hosts.elsewhere or m.value("edgeroute_alert_notifications_total", webhook="w", result="failed"):
                break
            await asyncio.sleep(0.05)
    assert len(hosts.moved) == 1 and hosts.moved[0].headers["X-Hook-Token"] == TOKEN
    assert hosts.elsewhere == [], "the alert and the webhook's token went to a host the config did not name"
    m = await scrape(proxy.url)
    assert m.value("edgeroute_alert_notifications_total", webhook="w", result="failed") == 1
