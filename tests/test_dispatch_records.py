"""What the request path writes into each record: attempt kinds, start times, time to first
content, and why a request failed (read by the request log and by telemetry)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.dispatch_support import HELLO, StartProxy, chunk, ok, sse_response
from tests.dispatch_support import upstreams as upstreams  # a fixture


async def unavailable(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"error": {"message": "overloaded"}}, status=503)


async def slow_stream(request: web.Request) -> web.StreamResponse:
    r = await sse_response(request)
    await asyncio.sleep(0.05)
    await r.write(chunk("hi"))
    await r.write(b"data: [DONE]\n\n")
    return r


async def test_a_retried_stream_records_kinds_start_times_and_first_content(
    upstreams: Any, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(await upstreams(unavailable, slow_stream))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    before = time.time()
    stream = await client.chat.completions.create(model="m", messages=HELLO, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "hi"
    rec = proxy.recorder.records[-1]
    assert [(a.deployment, a.kind) for a in rec.attempts] == [("d-a", "first"), ("d-b", "retry")]
    assert before <= rec.started_at == rec.started <= rec.attempts[0].started_at <= rec.attempts[1].started_at
    assert rec.attempts[0].ttft_ms is None  # it failed before any content
    first_content = rec.attempts[1].ttft_ms
    assert first_content is not None and first_content >= 40  # the upstream waited 50 ms before its first chunk
    assert rec.ttft_ms is not None and rec.ttft_ms >= first_content
    assert rec.error_class is None and rec.queue_ms == 0.0


async def test_a_fallback_model_attempt_is_a_fallback_and_a_hedge_a_hedge(
    upstreams: Any, start_proxy: StartProxy
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return await ok(request)

    cfg = await upstreams(unavailable, ok, slow, slow)
    cfg["models"] = {
        "m": {"deployments": ["d-a"], "fallbacks": ["m2"]},
        "m2": {"deployments": ["d-b"]},
        "h": {"deployments": ["d-c", "d-d"], "hedge": {"delay_ms": 50, "budget_percent": 100}},
    }
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=HELLO)
    rec = proxy.recorder.records[-1]
    assert [(a.deployment, a.kind) for a in rec.attempts] == [("d-a", "first"), ("d-b", "fallback")]
    assert rec.ttft_ms is None  # not a stream
    await client.chat.completions.create(model="h", messages=HELLO)
    rec = proxy.recorder.records[-1]
    assert sorted((a.kind, a.hedge) for a in rec.attempts) == [("first", False), ("hedge", True)]


async def test_a_failed_request_records_why(upstreams: Any, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(await upstreams(unavailable, unavailable))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model="m", messages=HELLO)
    assert e.value.status_code == 502
    assert proxy.recorder.records[-1].error_class == "server_error"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=HELLO)
    assert proxy.recorder.records[-1].error_class == "model_not_found"
