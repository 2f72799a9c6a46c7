"""`serve --workers 2` without Redis: a deployment's `max_concurrency` holds for the workers
together (leases in the supervisor's run directory), measured at the upstream."""

from __future__ import annotations

import asyncio

import openai
from aiohttp import web

from tests.conftest import _serve
from tests.dispatch_support import answer
from tests.scale.support import Spawn, metric


async def test_workers_share_a_deployments_capacity_without_redis(spawn: Spawn) -> None:
    now = peak = served = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal now, peak, served
        await request.read()
        now += 1
        peak = max(peak, now)
        try:
            await asyncio.sleep(0.15)
        finally:
            now -= 1
        served += 1
        return answer()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    upstream = await _serve(app)
    try:
        cfg = {
            "providers": {"a": {"base_url": f"http://127.0.0.1:{upstream.port}/v1", "api_key": "k"}},
            "deployments": {
                "d-a": {"provider": "a", "model": "x", "max_concurrency": 2, "max_queue": 20, "queue_timeout_ms": 30000}
            },
            "models": {"m": {"deployments": ["d-a"]}},
            "ledger": {"backend": "memory"},
        }
        inst = await spawn(cfg, "--workers", "2")

        async def ask() -> int:
            # A client (a connection) of its own per request, so the kernel spreads them over the workers.
            async with openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key="x", max_retries=0) as c:
                raw = await c.chat.completions.with_raw_response.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
                return raw.http_response.status_code

        statuses = await asyncio.gather(*(ask() for _ in range(12)))
        assert statuses == [200] * 12
        assert peak <= 2 and served == 12  # each worker alone would have let 2 in: 4 together
        # Whichever worker answers the scrape, the count is the server's. A slot freed while a
        # request of the same worker waits is handed over with its lease: fewer leases than requests.
        taken = await metric(inst.url, "edgeroute_shared_capacity_total", {"result": "taken"})
        assert taken is not None and 2 <= taken <= 12
    finally:
        await upstream.close()
