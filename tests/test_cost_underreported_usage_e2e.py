"""An upstream that reports far fewer output tokens than the text it sent is charged for the
text (counted, flagged estimated, its error class said): "hello world " x 2,000 reported as
5 completion tokens was charged 270 times less than it cost, JSON and streamed alike, and no
budget held it. An honest answer's report stands."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from edgeroute import _core
from tests.conftest import Proxy, ServeRoutes, eventually
from tests.metrics_support import scrape

TEXT = "hello world " * 2000
PRICE = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}  # $0.001 a token


class Upstream:
    def __init__(self, reported: int, text: str = TEXT) -> None:
        self.reported = reported
        self.text = text

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        usage = {"prompt_tokens": 10, "completion_tokens": self.reported, "total_tokens": 10 + self.reported}
        base = {"id": "c", "created": 1, "model": "x"}
        if not body.get("stream"):
            msg = {"role": "assistant", "content": self.text}
            choice = {"index": 0, "message": msg, "finish_reason": "stop"}
            return web.json_response({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        words = self.text.split(" ")
        for i in range(0, len(words), 50):  # a few hundred events, as a server that batches tokens sends
            piece = " ".join(words[i : i + 50]) + " "
            chunk = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        end = {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        await resp.write(b"data: " + orjson.dumps(end) + b"\n\n")
        tail = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        await resp.write(b"data: " + orjson.dumps(tail) + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _cost(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, reported: int, stream: bool
) -> tuple[float, Any, Proxy]:
    server = await serve_routes(web.post("/v1/chat/completions", Upstream(reported).handle))
    proxy = await start_proxy(
        {
            "providers": {"p": {"base_url": server.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o", "price": PRICE}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    ask: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8000}
    try:
        if stream:
            got = await client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
            text = "".join([c.choices[0].delta.content or "" async for c in got if c.choices])
        else:
            answer = await client.chat.completions.create(**ask)
            text = answer.choices[0].message.content or ""
    finally:
        await client.close()
    assert text.strip() == TEXT.strip()  # the client gets the answer as it came

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")  # a stream's once it has ended
    return rec.cost_usd, rec, proxy


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_an_answer_longer_than_its_reported_tokens_is_charged_for_its_text(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, stream: bool
) -> None:
    cost, rec, proxy = await _cost(start_proxy, serve_routes, 5, stream)
    counted = _core.Router.count_tokens(TEXT, "o200k_base")
    assert rec.usage.completion_tokens >= counted - 2 and rec.usage.estimated
    assert cost == pytest.approx((10 + rec.usage.completion_tokens) * 0.001)  # not (10 + 5) x $0.001
    assert rec.error_class == "upstream_underreported_usage"
    metrics = await scrape(proxy.url)
    assert metrics.value("edgeroute_upstream_usage_corrections_total", deployment="d", kind=rec.error_class) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_an_honest_report_stands(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, stream: bool
) -> None:
    honest = _core.Router.count_tokens(TEXT, "o200k_base") + 7  # another tokenizer's count, a little more
    _, rec, _ = await _cost(start_proxy, serve_routes, honest, stream)
    assert rec.usage.completion_tokens == honest and not rec.usage.estimated
    assert rec.error_class is None


async def test_a_client_that_closes_as_the_stream_ends_still_pays_for_the_text(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes
) -> None:
    """The text is counted off the event loop after `[DONE]` went out; a client that closes then
    (curl does) cancelled the count, and the answer was recorded with no usage at all: not even
    the 5 tokens reported, the request free."""
    long = TEXT * 20  # its count off the loop takes a while: the client is gone before it ends
    server = await serve_routes(web.post("/v1/chat/completions", Upstream(5, long).handle))
    proxy = await start_proxy(
        {
            "providers": {"p": {"base_url": server.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o", "price": PRICE}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000, "stream": True}
    body = orjson.dumps(ask)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    seen = b""
    while b"data: [DONE]" not in seen:
        got = await reader.read(65536)
        assert got, f"the stream ended before [DONE]: {seen[:300]!r}"
        seen += got
    writer.transport.abort()  # gone the moment the answer ended, as curl is

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")
    counted = _core.Router.count_tokens(long, "o200k_base")
    assert rec.usage is not None and rec.usage.completion_tokens >= counted - 2 and rec.usage.estimated
    assert rec.cost_usd == pytest.approx((10 + rec.usage.completion_tokens) * 0.001)
