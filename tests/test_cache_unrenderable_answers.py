"""A streamed answer whose tool call's arguments are not a JSON object is relayed as it came to
an OpenAI client (an Anthropic client's stream ends with an error event) but never stored:
stored, it was served from the cache to every later caller of the tenant for the entry's life,
to an Anthropic client as a 502 ("invalid JSON arguments") that no retry or failover could fix,
the upstream never asked again."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes

TOOL = {"name": "lookup", "description": "look up", "input_schema": {"type": "object", "properties": {}}}
OPENAI_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


class Careless:
    """Streams a tool call whose arguments are `streamed`; answers JSON with a sound call."""

    def __init__(self, streamed: str) -> None:
        self.streamed = streamed
        self.calls = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls += 1
        base = {"id": f"c{self.calls}", "created": 1, "model": "x"}
        if not body.get("stream"):
            call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
            msg = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice = {"index": 0, "message": msg, "finish_reason": "tool_calls"}
            usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
            return web.json_response({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        fn = {"name": "lookup", "arguments": self.streamed}
        for delta, finish in (
            (
                {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": fn}]},
                None,
            ),
            ({}, "tool_calls"),
        ):
            chunk = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _proxy(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, up: Careless
) -> Proxy:
    server = await serve_routes(web.post("/v1/chat/completions", up.handle))
    return await start_proxy(
        {
            "providers": {"p": {"base_url": server.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"], "cache": {"ttl": 300}}},
        }
    )


@pytest.mark.parametrize("streamed", ['{"a": }}}not json', "[1, 2]"], ids=["not-json", "not-an-object"])
async def test_a_hit_never_replays_tool_arguments_no_client_can_read(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, streamed: str
) -> None:
    up = Careless(streamed)
    proxy = await _proxy(start_proxy, serve_routes, up)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    ask: dict[str, Any] = {
        "model": "m",
        "max_tokens": 100,
        "extra_body": {"temperature": 0},  # (not a parameter of this SDK's)
        "tools": [TOOL],
        "messages": [{"role": "user", "content": "look it up"}],
    }
    try:
        # The stream ends with an error event, as the answer not streamed is a 502 (the SDK's raw
        # events: nothing parses the arguments).
        with pytest.raises(anthropic.APIStatusError, match="arguments"):
            _ = [e async for e in await client.messages.create(**ask, stream=True)]
        # Not from the cache: the upstream is asked again, and its sound answer served.
        got = await client.messages.create(**ask)
    finally:
        await client.close()
    assert up.calls == 2
    assert [b.type for b in got.content] == ["tool_use"] and got.content[0].input == {"q": 1}  # type: ignore[union-attr]


async def test_an_openai_stream_with_unreadable_arguments_is_not_stored(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes
) -> None:
    up = Careless('{"a": }}}not json')
    proxy = await _proxy(start_proxy, serve_routes, up)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    ask: dict[str, Any] = {
        "model": "m",
        "temperature": 0,
        "tools": [OPENAI_TOOL],
        "messages": [{"role": "user", "content": "look it up"}],
        "stream": True,
    }
    try:
        for _ in range(2):
            raw = await client.chat.completions.with_raw_response.create(**ask)
            args = "".join(
                [
                    tc.function.arguments or ""
                    async for c in raw.parse()
                    for tc in (c.choices[0].delta.tool_calls or [])
                    if c.choices and tc.function
                ]
            )
            assert args == '{"a": }}}not json'  # relayed as it came
            assert raw.headers["x-edgeroute-cache"] == "miss"
    finally:
        await client.close()
    assert up.calls == 2


async def test_a_hit_the_clients_api_cannot_carry_is_a_miss(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]],
    serve_routes: ServeRoutes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An entry stored before its answer was checked (by an earlier release, on a shared cache
    during a rolling upgrade) that cannot be rendered for the client is a miss: the upstream is
    asked and its answer served, where the cache's 502 reached every caller of the tenant."""
    from edgeroute import anthropic_api
    from edgeroute.cache import entry

    monkeypatch.setattr(entry, "_arguments_object", lambda arguments: True)  # the earlier release's store
    # and its stream, which relayed the arguments as they came (it now ends with an error event)
    monkeypatch.setattr(anthropic_api._HeldCall, "arguments", lambda self, truncated: "".join(self.args))
    up = Careless('{"a": }}}not json')
    proxy = await _proxy(start_proxy, serve_routes, up)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    ask: dict[str, Any] = {
        "model": "m",
        "max_tokens": 100,
        "extra_body": {"temperature": 0},
        "tools": [TOOL],
        "messages": [{"role": "user", "content": "look it up"}],
    }
    try:
        _ = [e async for e in await client.messages.create(**ask, stream=True)]
        got = await client.messages.with_raw_response.create(**ask)
    finally:
        await client.close()
    assert up.calls == 2  # asked again, not answered from the entry
    assert got.headers["x-edgeroute-cache"] == "miss"
    assert (await got.parse()).content[0].input == {"q": 1}  # type: ignore[union-attr]
