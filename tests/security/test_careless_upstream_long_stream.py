"""A careless upstream's long stream that reports no usage: its tokens are counted from the
streamed text when it ends, and that count must not hold the event loop every other client
shares (it took ~80 ms a megabyte there, in the `finally` of the relay)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from edgeroute.accounting import stream_text
from tests.conftest import eventually
from tests.security.conftest import chat_upstream, loop_lag

EVENTS = 6000
WORD = "a" * 1000  # no spaces: the slowest text to count


async def _stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    event = orjson.dumps(
        {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": WORD}}]}
    )
    batch = b"data: " + event + b"\n\n"
    for _ in range(EVENTS // 100):
        await resp.write(batch * 100)
    await resp.write(b"data: [DONE]\n\n")  # and never a usage chunk
    return resp


async def _recorded(proxy: Any) -> bool:
    return bool(proxy.recorder.records)


async def test_counting_a_long_stream_without_usage_leaves_the_loop_free(
    serve: Callable[..., Awaitable[Any]],
) -> None:
    up = await chat_upstream(_stream)
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    proxy = await serve(
        {
            "providers": {"p": {"base_url": f"http://127.0.0.1:{up.port}/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x", "price": price}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    try:
        with loop_lag() as lag:
            # A raw client reading the bytes as they come: the SDK's own parsing, on this same
            # loop, would be the stall measured.
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                streamed = b"".join([chunk async for chunk in r.content.iter_any()])
            await eventually(lambda: _recorded(proxy), "the stream's record", within=60)
    finally:
        await up.close()
    got = len(stream_text(streamed))
    assert got == EVENTS * len(WORD)
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and rec.usage.estimated and rec.usage.completion_tokens > 500_000  # counted
    assert rec.cost_usd > 0
    # Counted in a worker thread (the core releases the GIL): the loop woke on time meanwhile.
    assert lag.max_s < 0.5, f"the event loop stalled {lag.max_s:.2f} s"
