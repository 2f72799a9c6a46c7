"""An alert's notification still being delivered when `edgeroute serve` is stopped (SIGTERM:
a deploy, a restart), against the real process: it is delivered before the process exits,
within a bound (`notify.FLUSH_AT_EXIT_S`).

The notifier was cancelled at once: a "firing" whose webhook had answered 503 once (a blip
the notifier tries again after half a second) was never sent, and after the restart, with
the alert's state gone with the process, nothing told the on-call that it had fired."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import openai
from aiohttp import web

from tests.conftest import simple_config, start_routes, wait_ready
from tests.serve_support import killed, start_serve


async def test_a_notification_being_retried_at_sigterm_is_delivered_before_exit(
    start_upstream: Any, tmp_path: Path
) -> None:
    received: list[dict[str, Any]] = []
    first = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        if not first.is_set():
            first.set()
            return web.Response(status=503)  # a blip: the notifier tries again
        received.append(body)
        return web.Response(status=204)

    hooks = await start_routes(web.post("/hook", hook))
    cfg = simple_config({"a": await start_upstream()})
    cfg["alerts"] = {
        "interval_s": 1,
        "webhooks": {"oncall": {"url": hooks.url + "/hook", "timeout_s": 2}},
        "rules": [{"name": "any-spend", "kind": "spend_per_hour", "threshold": 0, "window_s": 60}],
    }
    serving = await start_serve(tmp_path / "c.yaml", cfg)
    try:
        await wait_ready(serving.url, proc=serving.proc)
        client = openai.AsyncOpenAI(base_url=serving.url + "/v1", api_key="unused", max_retries=0)
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        finally:
            await client.close()
        await asyncio.wait_for(first.wait(), 10)  # the alert fired; its first attempt failed
        t0 = time.monotonic()
        serving.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serving.proc.wait(), 15) == 0
        took = time.monotonic() - t0
    finally:
        await killed(serving.proc)
        await hooks.close()
    assert [(b["event"], b["alert"]["rule"]) for b in received] == [("firing", "any-spend")]
    assert took < 8, f"the stop waited {took:.1f} s"
