"""A chat upstream's call of a tool without parameters, its arguments "" (not `{}`), reaches a
Responses client as `{}`, streamed as not.

The non-streamed answer had `{}`; the stream translated from chat kept "": no
`function_call_arguments.delta`, `"arguments": ""` in the done event and the final response,
and the client's `json.loads(call.arguments)` (what every agent loop runs) raised.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import orjson
from aiohttp import web

from tests.security.conftest import Served, chat_upstream, failover_config

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": ""}}
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


async def _answer(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    base = {"id": "c1", "created": 0, "model": "x"}
    if not body.get("stream"):
        choice = {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [CALL]}}
        choice["finish_reason"] = "tool_calls"
        return web.json_response({**base, "object": "chat.completion", "choices": [choice], "usage": USAGE})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for choice in (
        {"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0, **CALL}]}, "finish_reason": None},
        {"index": 0, "delta": {}, "finish_reason": "tool_calls"},
    ):
        await resp.write(b"data: " + orjson.dumps({**base, "object": "chat.completion.chunk", "choices": [choice]}))
        await resp.write(b"\n\n")
    last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
    await resp.write(b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def test_a_call_without_arguments_is_an_empty_object_streamed_as_not(serve: Any) -> None:
    up = await chat_upstream(_answer)
    cfg = failover_config(up)
    cfg["providers"]["p0"]["options"] = {"responses": False}  # Responses served through chat
    proxy: Served = await serve(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    tools: Any = [{"type": "function", "name": "get_time", "parameters": {"type": "object"}, "strict": False}]
    whole = await client.responses.create(model="m", input="What time is it?", tools=tools)
    deltas = []
    async with client.responses.stream(model="m", input="What time is it?", tools=tools) as s:
        async for ev in s:
            if ev.type == "response.function_call_arguments.delta":
                deltas.append(ev.delta)
        streamed = await s.get_final_response()
    await up.close()
    assert "".join(deltas) == "{}"
    for r in (whole, streamed):
        calls = [(o.call_id, o.name, json.loads(o.arguments)) for o in r.output if o.type == "function_call"]
        assert calls == [("call_1", "get_time", {})]
