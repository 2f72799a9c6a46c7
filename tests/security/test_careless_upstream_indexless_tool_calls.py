"""Parallel tool calls streamed without `index`, as Gemini's OpenAI-compatible API sends them.

Each call comes whole in one delta with its own id and no `index` (and the answer ends with
`stop`). The translators read a missing index as 0: the calls were merged into one, their
arguments run together (`{"city":"Paris"}{"city":"Rome"}`). An Anthropic client's streamed
message kept one `tool_use` of two; a Responses client got one `function_call` whose
arguments are not JSON; an OpenAI client's stream, relayed as it came, crashed the SDK's
stream helper (`chat.completions.stream`: a TypeError, no `APIError`). The non-streamed
answer had both: streamed and not now agree.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import orjson
from aiohttp import web

from tests.security.conftest import Served, chat_upstream, failover_config

CALLS = [
    {"id": "function-call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
    {"id": "function-call-2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
]
USAGE = {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "gemini-x"}
    obj["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _gemini_compatible(request: web.Request) -> web.StreamResponse:
    """Gemini's OpenAI-compatible endpoint: tool calls without `index`, the answer ended with `stop`."""
    body = await request.json()
    if not body.get("stream"):
        message = {"role": "assistant", "content": None, "tool_calls": CALLS}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": "gemini-x",
                "choices": [choice],
                "usage": USAGE,
            }
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_chunk({"role": "assistant", "tool_calls": [CALLS[0]]}))
    await resp.write(_chunk({"role": "assistant", "tool_calls": [CALLS[1]]}))
    last = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "gemini-x", "choices": []}
    await resp.write(_chunk({}, "stop") + b"data: " + orjson.dumps({**last, "usage": USAGE}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _proxy(serve: Any, responses: bool = True) -> tuple[Served, Any]:
    up = await chat_upstream(_gemini_compatible)
    cfg = failover_config(up)
    if not responses:
        cfg["providers"]["p0"]["options"] = {"responses": False}  # Responses served through chat
    return await serve(cfg), up


async def test_anthropic_client_gets_every_call_streamed_as_not(serve: Any) -> None:
    proxy, up = await _proxy(serve)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    tools: Any = [
        {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    ]
    ask: Any = {
        "model": "m",
        "max_tokens": 100,
        "tools": tools,
        "messages": [{"role": "user", "content": "Paris, Rome?"}],
    }
    whole = await client.messages.create(**ask)
    async with client.messages.stream(**ask) as s:
        streamed = await s.get_final_message()
    await up.close()
    for msg in (whole, streamed):
        assert [(b.type, b.id, b.input) for b in msg.content] == [  # type: ignore[union-attr]
            ("tool_use", "function-call-1", {"city": "Paris"}),
            ("tool_use", "function-call-2", {"city": "Rome"}),
        ]
        assert msg.stop_reason == "tool_use"


async def test_responses_client_gets_every_call_streamed_as_not(serve: Any) -> None:
    proxy, up = await _proxy(serve, responses=False)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    tools: Any = [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": False,
        }
    ]
    whole = await client.responses.create(model="m", input="Paris, Rome?", tools=tools)
    async with client.responses.stream(model="m", input="Paris, Rome?", tools=tools) as s:
        streamed = await s.get_final_response()
    await up.close()
    for r in (whole, streamed):
        calls = [(o.call_id, json.loads(o.arguments)) for o in r.output if o.type == "function_call"]
        assert calls == [("function-call-1", {"city": "Paris"}), ("function-call-2", {"city": "Rome"})]


async def test_openai_client_stream_helper_gets_every_call_streamed_as_not(serve: Any) -> None:
    proxy, up = await _proxy(serve)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    ask: Any = {"model": "m", "messages": [{"role": "user", "content": "Paris, Rome?"}], "tools": tools}
    whole = await client.chat.completions.create(**ask)
    async with client.chat.completions.stream(**ask) as s:
        streamed = await s.get_final_completion()
    await up.close()
    for c in (whole, streamed):
        calls = [
            (t.id, t.function.name, json.loads(t.function.arguments)) for t in c.choices[0].message.tool_calls or ()
        ]
        assert calls == [
            ("function-call-1", "get_weather", {"city": "Paris"}),
            ("function-call-2", "get_weather", {"city": "Rome"}),
        ]
