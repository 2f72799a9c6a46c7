"""Rate-limit cool-downs shared over Redis: a 429 with Retry-After seen by one proxy cools the others."""

from __future__ import annotations

import asyncio
import os
import time

import openai
from aiohttp import web

from edgeroute.health_share import HEALTH_SHARE
from edgeroute.state import STATE
from tests.conftest import _serve
from tests.test_cost_support import require_redis


async def test_a_429_cool_down_reaches_the_other_instance_and_is_not_echoed(start_proxy, start_upstream) -> None:
    url = require_redis()
    hits: list[float] = []

    async def limited(_: web.Request) -> web.Response:
        hits.append(time.monotonic())
        body = b'{"error": {"message": "slow down", "type": "rate_limit_error"}}'
        return web.Response(status=429, body=body, content_type="application/json", headers={"Retry-After": "30"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", limited)
    busy = await _serve(app)
    good = await start_upstream()
    prefix = f"edgeroute-hs-{os.getpid()}-{os.urandom(4).hex()}"
    cfg = {
        "providers": {
            "a": {"base_url": f"http://127.0.0.1:{busy.port}/v1", "api_key": "k"},
            "b": {"base_url": good.base_url, "api_key": "k"},
        },
        "deployments": {
            "d-a": {"provider": "a", "model": "x", "weight": 1000},
            "d-b": {"provider": "b", "model": "x", "weight": 1},
        },
        "models": {"m": {"deployments": ["d-a", "d-b"]}},
        "shared_state": {"redis_url": url, "prefix": prefix, "timeout_ms": 2000},
    }
    p1, p2 = await start_proxy(cfg), await start_proxy(cfg)
    try:
        c1 = openai.AsyncOpenAI(base_url=p1.url + "/v1", api_key="x", max_retries=0)
        for _ in range(20):  # until one request has met d-a's 429 (and failed over to d-b)
            reply = await c1.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content
            if hits:
                break
        assert len(hits) == 1
        r2, i2 = p2.app[STATE].live.router, p2.app[STATE].live.index_of["d-a"]
        t0 = time.monotonic()
        while r2.health(i2)["cooldown_ms"] == 0:
            assert time.monotonic() - t0 < 5, "the cool-down never reached the second instance"
            await asyncio.sleep(0.02)
        assert 20_000 < r2.health(i2)["cooldown_ms"] <= 30_000
        # The second instance routes around d-a: no request reaches it.
        c2 = openai.AsyncOpenAI(base_url=p2.url + "/v1", api_key="x", max_retries=0)
        for _ in range(3):
            await c2.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert len(hits) == 1
        # Applied from another instance: not published back (one event each way at most).
        await asyncio.sleep(0.5)
        share1, share2 = p1.app[HEALTH_SHARE], p2.app[HEALTH_SHARE]
        assert (share1.sent, share2.sent) == (1, 0) and share2.received >= 1
    finally:
        await busy.close()
