"""An answer of more than `sse.MAX_TOOL_CALLS` (1,024) tool calls is a broken upstream's.

A hostile upstream that streamed 150,000 tool-call deltas had every call held to the finish for an
Anthropic client (`StreamEncoder`), then checked and written at once: about two seconds in which
the event loop served no one else. The stream now ends with an error event at the 1,025th call (a
protocol error of the upstream: before content it fails over), on a passthrough chat stream and on
a translated one (Anthropic, Bedrock, Gemini upstreams) alike."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute import sse
from edgeroute.anthropic_api import StreamEncoder
from edgeroute.providers.anthropic import AnthropicAdapter
from edgeroute.providers.openai_format import ChunkWriter
from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded
from tests.test_cache_long_replay import LoopLag

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]
CALLS = 150_000


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [choice]}) + b"\n\n"


def _call(i: int) -> bytes:
    call = {"index": i, "id": f"call_{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    return _chunk({"tool_calls": [call]})


# Built once, written in one piece: the upstream's own work is no part of what the test measures.
FLOOD = b"".join(
    [_chunk({"role": "assistant", "content": None}), *map(_call, range(CALLS)), _chunk({}, "tool_calls")]
) + (b"data: [DONE]\n\n")


async def _flood(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(FLOOD)
    await resp.write_eof()
    return resp


async def _proxy(start_proxy: StartProxy, serve_routes: ServeRoutes) -> Proxy:
    up = await serve_routes(web.post("/v1/chat/completions", _flood))
    return await start_proxy(
        {
            "providers": {"p": {"base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )


async def test_an_anthropic_client_gets_an_error_not_a_stalled_loop(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes)
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0, timeout=120)
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    try:
        with LoopLag() as lag:
            with pytest.raises(anthropic.APIStatusError, match="tool calls"):
                async with claude.messages.stream(model="m", max_tokens=4_000_000, messages=HI, tools=tools) as stream:
                    async for _ in stream:
                        pass
    finally:
        await claude.close()
    rec = await recorded(proxy)
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_protocol_error")
    # Before: the finish alone held the loop about 2 s. Generous for a loaded host.
    assert lag.worst < 0.5, f"the event loop stalled {lag.worst:.2f} s"


async def test_an_openai_client_gets_at_most_the_cap_then_an_error(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=120)
    seen: set[int] = set()
    try:
        with pytest.raises(openai.APIError, match="tool calls"):
            stream = await client.chat.completions.create(model="m", messages=HI, stream=True)
            async for c in stream:
                for ch in c.choices:
                    seen.update(tc.index for tc in ch.delta.tool_calls or ())
    finally:
        await client.close()
    assert 0 < len(seen) <= sse.MAX_TOOL_CALLS


def test_a_translated_stream_stops_at_the_cap() -> None:
    """An Anthropic upstream's tool_use blocks (the same for Bedrock's and Gemini's calls: `ChunkWriter`)."""
    w = ChunkWriter("x", False)
    for _ in range(sse.MAX_TOOL_CALLS):
        w.new_tool()
    with pytest.raises(sse.StreamProtocolError, match="tool calls"):
        w.new_tool()
    t: Any = AnthropicAdapter.__new__(AnthropicAdapter).stream_translator("x")
    start = {"type": "message_start", "message": {"id": "m", "model": "x", "usage": {"input_tokens": 1}}}
    events = [b"data: " + orjson.dumps(start) + b"\n\n"]
    for i in range(sse.MAX_TOOL_CALLS + 1):
        block = {"type": "tool_use", "id": f"t{i}", "name": "f", "input": {}}
        events.append(
            b"data: " + orjson.dumps({"type": "content_block_start", "index": i, "content_block": block}) + b"\n\n"
        )
    with pytest.raises(sse.StreamProtocolError, match="tool calls"):
        t.feed(b"".join(events))


def test_the_anthropic_encoder_ends_past_the_cap() -> None:
    """What no relay's check saw (a whole JSON answer served as a stream) is bounded there too."""
    enc = StreamEncoder()
    out = enc(b"".join(_call(i) for i in range(sse.MAX_TOOL_CALLS + 5)))
    assert out.count(b"event: error") == 1 and b"tool calls" in out
    assert (enc.ended, enc.cut) == (True, "upstream_protocol_error")
