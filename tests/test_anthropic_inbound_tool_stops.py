"""`/v1/messages` on an OpenAI-format deployment: an answer that calls a tool stops with
`tool_use`, however the upstream ended it.

OpenAI ends an answer whose tool `tool_choice` forces by name with finish_reason `stop`
(Gemini's OpenAI-compatible API ends every tool call so). It was mapped to `end_turn`: an
Anthropic client that forced a tool (`tool_choice: {"type": "tool"}`, how structured
extraction is done) and loops `while stop_reason == "tool_use"` took the call for the final
answer and never ran it; streamed and not alike.
"""

from __future__ import annotations

from typing import Any

import anthropic
import orjson
import pytest
from aiohttp import web

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

TOOLS: Any = [
    {"name": "get_time", "description": "The time now.", "input_schema": {"type": "object"}},
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
]
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_forced_tool_call_stops_with_tool_use(start_mock: Any, start_proxy: Any, stream: bool) -> None:
    up = await start_mock("openai", record=True)
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    ask: Any = {
        "model": "m",
        "max_tokens": 100,
        "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": ASK,
    }
    if stream:
        async with client.messages.stream(**ask) as s:
            msg = await s.get_final_message()
    else:
        msg = await client.messages.create(**ask)
    # The upstream was asked for that function and ended its answer as OpenAI does.
    sent = up.options.requests[-1]["body"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    (use,) = msg.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    assert msg.stop_reason == "tool_use"


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_without_calls_still_ends_its_turn(start_mock: Any, start_proxy: Any, stream: bool) -> None:
    up = await start_mock("openai")
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    ask: Any = {"model": "m", "max_tokens": 100, "tools": TOOLS, "tool_choice": {"type": "none"}, "messages": ASK}
    if stream:
        async with client.messages.stream(**ask) as s:
            msg = await s.get_final_message()
    else:
        msg = await client.messages.create(**ask)
    assert [b.type for b in msg.content] == ["text"] and msg.stop_reason == "end_turn"


async def test_parallel_tool_calls_stream_one_block_at_a_time(serve_routes: Any, start_proxy: Any) -> None:
    """An OpenAI upstream streams two parallel tool calls one after the other; the Anthropic
    client gets them as Anthropic streams blocks: each block stopped before the next starts."""

    async def answer(request: web.Request) -> web.StreamResponse:
        head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
        deltas: list[Any] = [{"role": "assistant", "content": None}]
        for i, city in enumerate(("Paris", "Rome")):
            call = {"index": i, "id": f"call_{i}", "type": "function", "function": {"name": "get_weather"}}
            deltas.append({"tool_calls": [call | {"function": {"name": "get_weather", "arguments": ""}}]})
            deltas.append(
                {"tool_calls": [{"index": i, "function": {"arguments": orjson.dumps({"city": city}).decode()}}]}
            )
        chunks = [{"index": 0, "delta": d, "finish_reason": None} for d in deltas]
        chunks.append({"index": 0, "delta": {}, "finish_reason": "tool_calls"})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for c in chunks:
            await resp.write(b"data: " + orjson.dumps(head | {"choices": [c]}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    up = await serve_routes(web.post("/v1/chat/completions", answer))
    cfg = {
        "providers": {"p": {"base_url": up.url + "/v1"}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"]}},
    }
    proxy = await start_proxy(cfg)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    events: list[tuple[str, int]] = []
    async with client.messages.stream(model="m", max_tokens=100, tools=TOOLS, messages=ASK) as s:
        async for ev in s:
            if ev.type in ("content_block_start", "content_block_stop"):
                events.append((ev.type, ev.index))
        msg = await s.get_final_message()
    assert events == [
        ("content_block_start", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_stop", 1),
    ]
    assert [(u.type, u.input) for u in msg.content] == [("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Rome"})]
    assert msg.stop_reason == "tool_use"


async def test_interleaved_parallel_tool_calls_stop_whole(serve_routes: Any, start_proxy: Any) -> None:
    """An upstream that sends both calls' headers, then their arguments in alternating pieces:
    each Anthropic block still stops with its input whole (a client runs a tool at its
    `content_block_stop`), and no block gets a delta after its stop."""

    async def answer(request: web.Request) -> web.StreamResponse:
        head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
        deltas: list[Any] = [{"role": "assistant", "content": None}]
        for i in (0, 1):
            fn = {"name": "get_weather", "arguments": ""}
            deltas.append({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function", "function": fn}]})
        for piece in ('{"city": ', None):
            for i, city in enumerate(("Paris", "Rome")):
                args = piece or orjson.dumps(city).decode() + "}"
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": args}}]})
        chunks = [{"index": 0, "delta": d, "finish_reason": None} for d in deltas]
        chunks.append({"index": 0, "delta": {}, "finish_reason": "tool_calls"})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for c in chunks:
            await resp.write(b"data: " + orjson.dumps(head | {"choices": [c]}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    up = await serve_routes(web.post("/v1/chat/completions", answer))
    cfg = {
        "providers": {"p": {"base_url": up.url + "/v1"}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"]}},
    }
    proxy = await start_proxy(cfg)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    stopped: set[int] = set()
    late: list[tuple[str, int]] = []
    at_stop: list[tuple[int, Any]] = []
    async with client.messages.stream(model="m", max_tokens=100, tools=TOOLS, messages=ASK) as s:
        async for ev in s:
            if ev.type == "content_block_stop":
                stopped.add(ev.index)
                at_stop.append((ev.index, ev.content_block.input))  # type: ignore[union-attr]
            elif ev.type in ("content_block_start", "content_block_delta") and ev.index in stopped:
                late.append((ev.type, ev.index))
        msg = await s.get_final_message()
    assert at_stop == [(0, {"city": "Paris"}), (1, {"city": "Rome"})]
    assert late == []
    assert [(u.type, u.input) for u in msg.content] == [("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Rome"})]
