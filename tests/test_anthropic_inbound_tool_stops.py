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


def _two_calls(interleaved: bool) -> list[Any]:
    """OpenAI deltas of two parallel `get_weather` calls, each's arguments in two pieces: one
    call after the other (as OpenAI sends them), or both heads first and the pieces alternating."""
    heads = [
        {"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function", "function": {"name": "get_weather"}}]}
        for i in (0, 1)
    ]
    pieces = [
        [{"tool_calls": [{"index": i, "function": {"arguments": a}}]} for a in ('{"city": ', f'"{city}"}}')]
        for i, city in enumerate(("Paris", "Rome"))
    ]
    if interleaved:
        return [*heads, pieces[0][0], pieces[1][0], pieces[0][1], pieces[1][1]]
    return [heads[0], *pieces[0], heads[1], *pieces[1]]


@pytest.mark.parametrize("interleaved", [False, True], ids=["one-after-the-other", "interleaved"])
async def test_parallel_tool_calls_stream_one_whole_block_at_a_time(
    serve_routes: Any, start_proxy: Any, interleaved: bool
) -> None:
    """An OpenAI upstream streams two parallel tool calls; the Anthropic client gets them as
    Anthropic streams blocks: each block stopped before the next starts, with its input whole
    at its `content_block_stop` (where a client runs the tool), and no delta after its stop.
    An upstream may interleave the calls' argument pieces; the blocks still come one by one."""

    async def answer(request: web.Request) -> web.StreamResponse:
        head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
        deltas = [{"role": "assistant", "content": None}, *_two_calls(interleaved)]
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
    blocks: list[tuple[str, int]] = []
    late: list[tuple[str, int]] = []
    at_stop: list[tuple[int, Any]] = []
    async with client.messages.stream(model="m", max_tokens=100, tools=TOOLS, messages=ASK) as s:
        async for ev in s:
            if ev.type in ("content_block_start", "content_block_stop"):
                blocks.append((ev.type, ev.index))
            if ev.type == "content_block_stop":
                at_stop.append((ev.index, ev.content_block.input))  # type: ignore[union-attr]
            elif (
                ev.type in ("content_block_start", "content_block_delta") and ("content_block_stop", ev.index) in blocks
            ):
                late.append((ev.type, ev.index))
        msg = await s.get_final_message()
    assert blocks == [
        ("content_block_start", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_stop", 1),
    ]
    assert at_stop == [(0, {"city": "Paris"}), (1, {"city": "Rome"})] and late == []
    assert [(u.type, u.input) for u in msg.content] == [("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Rome"})]
    assert msg.stop_reason == "tool_use"
    await client.close()
