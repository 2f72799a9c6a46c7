"""An Anthropic client's `stop_sequences` served by an Anthropic deployment: the answer says
which sequence ended it (`stop_reason: "stop_sequence"`, `stop_sequence: "###"`), as Anthropic
does, JSON and streamed. Through the chat translation both came back `end_turn` and null
(OpenAI's `stop` finish does not say a stop sequence ended the answer)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import orjson
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes

TEXT = "up to the stop"


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **obj}) + b"\n\n"


async def _messages(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    assert body.get("stop_sequences") == ["###"]  # sent as asked
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x"}
    usage = {"input_tokens": 10, "output_tokens": 5}
    if not body.get("stream"):
        content = [{"type": "text", "text": TEXT}]
        end = {"stop_reason": "stop_sequence", "stop_sequence": "###", "usage": usage}
        return web.json_response({**message, "content": content, **end})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
    for name, obj in (
        ("message_start", {"message": start}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": TEXT}}),
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "stop_sequence", "stop_sequence": "###"}, "usage": usage}),
        ("message_stop", {}),
    ):
        await resp.write(_event(name, obj))
    await resp.write_eof()
    return resp


async def _proxy(start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes) -> Proxy:
    up = await serve_routes(web.post("/v1/messages", _messages))
    return await start_proxy(
        {
            "providers": {"a": {"kind": "anthropic", "base_url": up.url, "api_key": "sk-ant-test-0123456789"}},
            "deployments": {"d": {"provider": "a", "model": "claude-x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_the_stop_sequence_that_ended_the_answer_is_said(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, stream: bool
) -> None:
    proxy = await _proxy(start_proxy, serve_routes)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    ask: dict[str, Any] = {
        "model": "m",
        "max_tokens": 50,
        "stop_sequences": ["###"],
        "messages": [{"role": "user", "content": "count"}],
    }
    try:
        if stream:
            async with client.messages.stream(**ask) as s:
                message = await s.get_final_message()
        else:
            message = await client.messages.create(**ask)
    finally:
        await client.close()
    assert [getattr(b, "text", None) for b in message.content] == [TEXT]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "###")
