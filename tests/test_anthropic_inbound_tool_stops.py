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
import pytest

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
