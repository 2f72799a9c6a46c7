"""Time-of-day price windows with a request that spans a window's edge: priced once, by the
price in force when it started.

A request is routed, and its budget reserved, at the prices in force when it starts, and the
spend report's baseline prices it at that time too; its cost was taken when its answer ended.
A request that started before an off-peak window and ended inside it was recorded at the
discount (and the report showed a saving no routing made); one that started inside the
window and ended after it, at the full price.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import routes_upstream

OUT = 10.0  # USD per million output tokens


@pytest.fixture
async def edge_upstream() -> AsyncIterator[tuple[str, float]]:
    """An upstream that answers (100 output tokens) once the next minute's edge has passed."""
    edge = time.time() // 60 * 60 + 60

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(max(0.0, edge + 0.3 - time.time()))
        out = {
            "id": "c", "object": "chat.completion", "created": 1, "model": "x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 100, "total_tokens": 105},
        }  # fmt: skip
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async with routes_upstream(web.post("/v1/chat/completions", handler)) as server:
        yield server.url + "/v1", edge


async def test_a_request_across_a_windows_edge_is_priced_as_it_started(
    start_proxy: Any, edge_upstream: tuple[str, float]
) -> None:
    url, edge = edge_upstream
    hhmm = time.strftime("%H:%M", time.gmtime(edge))
    until = time.strftime("%H:%M", time.gmtime(edge + 600))
    price = {"input_per_mtok": 0, "output_per_mtok": OUT, "windows": [{"start": hhmm, "end": until, "multiplier": 0.5}]}
    cfg = {
        "providers": {"p": {"base_url": url, "api_key": "k", "timeouts": {"first_byte": 90, "total": 120}}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": price}},
        "models": {"m": {"deployments": ["d"]}},
    }
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=120)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    await client.close()
    rec = proxy.recorder.records[-1]
    assert rec.started < edge < time.time(), "the request started before the window and ended inside it"
    full = 100 * OUT / 1e6  # the price in force when it started: no discount
    assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(full)
    assert rec.cost_usd == pytest.approx(full)
