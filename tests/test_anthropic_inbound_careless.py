"""`/v1/messages` served by an OpenAI-format upstream, through the `anthropic` SDK: a tool call
cut off by the token limit, and a careless upstream's nameless call, reach the client as
Anthropic answers them, not as a 502 (which the SDK retries, each answer paid for)."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import orjson
import pytest

from tests.test_providers_careless_answers import raw_upstream

__all__ = ["raw_upstream"]


def _config(url: str) -> dict[str, Any]:
    return {
        "providers": {"p": {"base_url": url + "/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}},
        "models": {"m": {"deployments": ["d"]}},
    }


def _answer(call: dict[str, Any], finish: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "x",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


async def _records(proxy: Any, n: int) -> list[Any]:
    for _ in range(200):
        if len(proxy.recorder.records) >= n:
            break
        await asyncio.sleep(0.01)
    return list(proxy.recorder.records)


async def test_tool_call_cut_off_by_max_tokens(start_proxy, raw_upstream) -> None:
    # Was: a 502 ("invalid JSON arguments") for the model's answer at the token limit, recorded
    # and paid for, and retried by the SDK (each retry paid again).
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Par'}}
    proxy = await start_proxy(_config(await raw_upstream(_answer(call, "length"))))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=2)
    msg = await client.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert msg.stop_reason == "max_tokens"
    assert len(msg.content) == 1
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "weather" and block.id == "call_1" and block.input == {}
    records = await _records(proxy, 1)
    assert [r.status for r in records] == [200]


async def test_invalid_arguments_without_truncation_stay_an_upstream_error(start_proxy, raw_upstream) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Par'}}
    proxy = await start_proxy(_config(await raw_upstream(_answer(call, "tool_calls"))))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as e:
        await client.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502 and "invalid JSON" in str(e.value)


async def test_nameless_tool_call(start_proxy, raw_upstream) -> None:
    # Was: `"name": null, "id": null` relayed; the SDK's ToolUseBlock.name (a str) was None.
    call = {"type": "function", "function": {"arguments": "{}"}}
    proxy = await start_proxy(_config(await raw_upstream(_answer(call, "tool_calls"))))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    msg = await client.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "" and block.id == "" and block.input == {}


async def test_nameless_tool_call_streamed(start_proxy, raw_upstream) -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "type": "function", "function": {"arguments": "{}"}}]},
                    "finish_reason": None,
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}},
    ]
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "x"}
    body = b"".join(b"data: " + orjson.dumps({**base, **c}) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    proxy = await start_proxy(_config(await raw_upstream(body)))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    async with client.messages.stream(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as stream:
        starts = [ev.content_block for ev in [e async for e in stream] if ev.type == "content_block_start"]
        final = await stream.get_final_message()
    assert [(b.type, b.name, b.id) for b in starts] == [("tool_use", "", "")]  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use" and final.content[0].input == {}
