"""An OpenAI SDK client served by each translated provider gets the answer OpenAI itself would give.

The mocks of every provider write the same reply for the same conversation, so the
answer through edgeroute from an Anthropic, Gemini, Bedrock or Azure deployment is
compared field by field (ids and timestamps aside) with the OpenAI mock's own
answer: content, tool calls and their arguments, finish reasons, usage.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.providers_fixtures import comparable, provider_config, start_mock

__all__ = ["start_mock"]

KINDS = ["anthropic", "gemini", "bedrock", "azure"]
HELLO = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}


async def _clients(start_mock: Any, start_proxy: Any, kind: str, **mock: Any) -> tuple[Any, Any, Any]:
    native = await start_mock("openai")
    up = await start_mock(kind, record=True, **mock)
    proxy = await start_proxy(provider_config({"p": up}))
    direct = openai.AsyncOpenAI(base_url=native.base_url, api_key="x", max_retries=0)
    via = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    return direct, via, up


async def _collect(stream: Any) -> tuple[str, dict[int, dict[str, str]], str | None, Any, list[Any]]:
    """Text, tool calls by index (id, name, arguments concatenated), finish reason, usage, chunks."""
    text = ""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    usage = None
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for tc in choice.delta.tool_calls or ():
                slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += tc.id or ""
                if tc.function:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return text, calls, finish, usage, chunks


@pytest.mark.parametrize("kind", KINDS)
async def test_answer_equals_openai_answer(start_mock, start_proxy, kind: str) -> None:
    direct, via, _ = await _clients(start_mock, start_proxy, kind)
    want = await direct.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    got = await via.chat.completions.create(model="m", messages=HELLO)
    if kind == "bedrock":  # Bedrock's answers do not name the model: the client's model name stands in
        assert got.model == "m"
        got.model = want.model
    assert comparable(got.model_dump()) == comparable(want.model_dump())
    assert got.choices[0].message.content.startswith("Hello from gpt-4o-mini. You said: Say hello.")


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_equals_openai_stream(start_mock, start_proxy, kind: str) -> None:
    direct, via, _ = await _clients(start_mock, start_proxy, kind)
    opts = {"include_usage": True}
    want = await _collect(
        await direct.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True, stream_options=opts)
    )
    got = await _collect(await via.chat.completions.create(model="m", messages=HELLO, stream=True, stream_options=opts))
    assert got[0] == want[0]  # text
    assert got[2] == want[2] == "stop"
    assert got[3] is not None and comparable(got[3].model_dump()) == comparable(want[3].model_dump())
    # Streamed, not buffered: one chunk per upstream word.
    assert len([c for c in got[4] if c.choices and c.choices[0].delta.content]) == len(want[0].split(" "))


@pytest.mark.parametrize("kind", ["anthropic", "gemini", "bedrock"])  # translated streams report exact usage
async def test_stream_without_include_usage_has_no_usage_chunk_but_is_accounted(
    start_mock, start_proxy, kind: str
) -> None:
    native = await start_mock("openai")
    up = await start_mock(kind)
    proxy = await start_proxy(provider_config({"p": up}))
    via = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    direct = openai.AsyncOpenAI(base_url=native.base_url, api_key="x", max_retries=0)
    _, _, _, usage, chunks = await _collect(await via.chat.completions.create(model="m", messages=HELLO, stream=True))
    assert usage is None and all(c.usage is None for c in chunks)
    want = await direct.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and not rec.usage.estimated
    assert (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (
        want.usage.prompt_tokens,
        want.usage.completion_tokens,
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_call_round_trip(start_mock, start_proxy, kind: str) -> None:
    direct, via, _ = await _clients(start_mock, start_proxy, kind)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    want = await direct.chat.completions.create(model="gpt-4o-mini", messages=ask, tools=[WEATHER_TOOL])
    got = await via.chat.completions.create(model="m", messages=ask, tools=[WEATHER_TOOL])
    assert got.choices[0].finish_reason == want.choices[0].finish_reason == "tool_calls"
    assert got.choices[0].message.content is None
    (call,) = got.choices[0].message.tool_calls
    (wcall,) = want.choices[0].message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == (
        "function",
        "get_weather",
        wcall.function.arguments,
    )
    assert call.function.arguments == '{"city":"Paris","days":1}'
    assert call.id
    # Second turn: the tool's result goes back; the model answers in text.
    turn2 = [
        *ask,
        got.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    final = await via.chat.completions.create(model="m", messages=turn2, tools=[WEATHER_TOOL])
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content.startswith("Hello from gpt-4o-mini.")


@pytest.mark.parametrize("kind", KINDS)
async def test_streamed_tool_call_arguments_arrive_exactly(start_mock, start_proxy, kind: str) -> None:
    direct, via, _ = await _clients(start_mock, start_proxy, kind)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    want = await _collect(
        await direct.chat.completions.create(model="gpt-4o-mini", messages=ask, tools=[WEATHER_TOOL], stream=True)
    )
    text, calls, finish, _, chunks = await _collect(
        await via.chat.completions.create(model="m", messages=ask, tools=[WEATHER_TOOL], stream=True)
    )
    assert text == "" and finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert calls[0]["arguments"] == want[1][0]["arguments"] == '{"city":"Paris","days":1}'
    # The first chunk naming the call carries its id and type, as OpenAI's do.
    heads = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or () if tc.id]
    assert len(heads) == 1 and heads[0].type == "function"


async def test_failover_from_openai_down_to_anthropic_is_transparent(start_mock, start_proxy) -> None:
    down = await start_mock("openai", fail_status=503)
    anth = await start_mock("anthropic")
    native = await start_mock("openai")
    proxy = await start_proxy(provider_config({"o": down, "a": anth}))
    via = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    direct = openai.AsyncOpenAI(base_url=native.base_url, api_key="x", max_retries=0)
    raw = await via.chat.completions.with_raw_response.create(model="m", messages=HELLO)
    got = raw.parse()
    want = await direct.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert comparable(got.model_dump()) == comparable(want.model_dump())
    assert raw.headers["x-edgeroute-deployment"] == "d-a"
    assert [a.outcome for a in proxy.recorder.records[-1].attempts] == ["server_error", "success"]
    # And streaming.
    text, _, finish, _, _ = await _collect(await via.chat.completions.create(model="m", messages=HELLO, stream=True))
    assert text == want.choices[0].message.content and finish == "stop"
