"""An OpenAI-compatible answer whose content is a list of parts (Mistral's reasoning models answer
`[{type: thinking}, {type: text}]`) reaches an Anthropic client as its text parts: it was a paid
502 ("could not be read as a chat completion"), streamed or not."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import orjson
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes
from tests.test_stream_hold_usage_and_format import _streaming

PARTS = [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
BASE = {"id": "c", "created": 1, "model": "x"}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + orjson.dumps({**BASE, "object": "chat.completion.chunk", "choices": [choice]}) + b"\n\n"


STREAM = [_chunk({"role": "assistant", "content": PARTS[:2]}), _chunk({"content": PARTS[2:]}), _chunk({}, "stop")]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_content_parts_are_the_answers_text(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, stream: bool
) -> None:
    message = {"role": "assistant", "content": PARTS}
    answer = {
        **BASE,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }

    async def handle(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream"):
            resp: web.StreamResponse = await _streaming([*STREAM, b"data: [DONE]\n\n"])(request)
            return resp
        return web.json_response({**answer, "usage": USAGE})

    up = await serve_routes(web.post("/v1/chat/completions", handle))
    proxy = await start_proxy(
        {
            "providers": {"p": {"kind": "openai_compatible", "base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    ask: dict[str, Any] = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    try:
        if stream:
            async with client.messages.stream(**ask) as s:
                got = await s.get_final_message()
        else:
            got = await client.messages.create(**ask)
    finally:
        await client.close()
    assert [(b.type, getattr(b, "text", None)) for b in got.content] == [("text", "Hello world")]
    assert got.stop_reason == "end_turn"
