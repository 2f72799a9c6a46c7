"""What a careless translated upstream answers (null texts and names, counts that are not
counts) reaches an OpenAI client as a well-formed answer: never the word "None" in its text,
never negative `usage`, never a 502 for a good answer; and the spend is still recorded.

Through the real proxy and the `openai` SDK; the upstream is a raw server answering the
given body, as a careless upstream would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import ServeRoutes
from tests.providers_fixtures import BEDROCK_OPTIONS

Raw = Callable[[Any], Awaitable[str]]


@pytest.fixture
async def raw_upstream(serve_routes: ServeRoutes) -> AsyncIterator[Raw]:
    """Starts a server answering every POST with `body` (JSON), or with `body` as SSE when bytes."""

    async def start(body: Any) -> str:
        async def answer(_req: web.Request) -> web.Response:
            if isinstance(body, bytes):
                return web.Response(body=body, content_type="text/event-stream")
            return web.Response(body=orjson.dumps(body), content_type="application/json")

        return (await serve_routes(web.post("/{tail:.*}", answer))).url

    yield start


def _config(kind: str, url: str) -> dict[str, Any]:
    provider: dict[str, Any] = {"kind": kind, "base_url": url, "api_key": "k"}
    if kind == "bedrock":
        provider["options"] = dict(BEDROCK_OPTIONS)
    return {
        "providers": {"p": provider},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}},
        "models": {"m": {"deployments": ["d"]}},
    }


async def _ask(start_proxy: Any, raw_upstream: Raw, kind: str, body: Any) -> tuple[Any, Any]:
    proxy = await start_proxy(_config(kind, await raw_upstream(body)))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    answer = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello there"}])
    for _ in range(200):  # the record is written as the answer ends
        if proxy.recorder.records:
            break
        await asyncio.sleep(0.01)
    return answer, proxy.recorder.records[-1]


def _anthropic(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "x",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": usage,
    }


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": -30, "output_tokens": 2},
        {"input_tokens": 30, "output_tokens": 2, "cache_read_input_tokens": -50},
        {"input_tokens": "abc", "output_tokens": 2},
    ],
)
async def test_anthropic_usage_that_is_not_counts(start_proxy, raw_upstream, usage: dict[str, Any]) -> None:
    # Was: the client saw prompt_tokens -30 / cached_tokens -50 (its usage disagreeing with the
    # spend recorded), and a string count failed the good answer with a 502.
    answer, record = await _ask(start_proxy, raw_upstream, "anthropic", _anthropic(usage))
    assert answer.choices[0].message.content == "hi"
    if answer.usage is not None:
        u = answer.usage
        assert u.prompt_tokens >= 0 and u.completion_tokens >= 0 and u.total_tokens >= 0
        assert u.prompt_tokens_details is None or (u.prompt_tokens_details.cached_tokens or 0) >= 0
    assert record.status == 200 and record.cost_usd > 0  # counted from the conversation instead


async def test_anthropic_usage_with_good_counts_is_kept(start_proxy, raw_upstream) -> None:
    usage = {"input_tokens": 10, "output_tokens": 2, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 1}
    answer, _ = await _ask(start_proxy, raw_upstream, "anthropic", _anthropic(usage))
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (16, 2)
    assert answer.usage.prompt_tokens_details is not None and answer.usage.prompt_tokens_details.cached_tokens == 5


async def test_an_anthropic_client_is_told_the_prompt_a_total_implies(start_proxy, raw_upstream) -> None:
    """An OpenAI-format answer whose usage has the completion and the total but no prompt count,
    to a `/v1/messages` client: its input is the total less the output (it was told the total)."""
    import anthropic

    answer = {
        "id": "c1", "object": "chat.completion", "created": 0, "model": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"completion_tokens": 50, "total_tokens": 150},
    }  # fmt: skip
    proxy = await start_proxy(_config("openai", await raw_upstream(answer) + "/v1"))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    msg = await client.messages.create(model="m", max_tokens=60, messages=[{"role": "user", "content": "hello"}])
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (100, 50)
    await client.close()


NULL_TEXTS: list[tuple[str, dict[str, Any]]] = [
    (
        "gemini",
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [{"text": None}, {"text": "hi"}, {"functionCall": {"args": {}}}],
                    },
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2},
        },
    ),
    (
        "bedrock",
        {
            "output": {
                "message": {
                    "role": "assistant",
                    "content": [
                        {"text": None},
                        {"text": "hi"},
                        {"toolUse": {"toolUseId": "t1", "name": None, "input": {}}},
                    ],
                }
            },
            "stopReason": "tool_use",
            "usage": {"inputTokens": 3, "outputTokens": 2},
        },
    ),
    (
        "anthropic",
        {
            **_anthropic({"input_tokens": 3, "output_tokens": 2}),
            "content": [
                {"type": "text", "text": None},
                {"type": "text", "text": "hi"},
                {"type": "tool_use", "id": "t1", "input": {}},
            ],
            "stop_reason": "tool_use",
        },
    ),
]


@pytest.mark.parametrize(("kind", "body"), NULL_TEXTS, ids=[k for k, _ in NULL_TEXTS])
async def test_null_text_and_tool_name(start_proxy, raw_upstream, kind: str, body: dict[str, Any]) -> None:
    # Was: Gemini's and Bedrock's null text reached the client as the word "None" (and a
    # Gemini call without a name was named "None"); Anthropic's failed the answer with a 502.
    answer, record = await _ask(start_proxy, raw_upstream, kind, body)
    message = answer.choices[0].message
    assert message.content == "hi"
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    assert message.tool_calls[0].function.name == "" and message.tool_calls[0].function.arguments == "{}"
    assert record.status == 200


async def test_gemini_stream_null_text(start_proxy, raw_upstream) -> None:
    event = {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": None}, {"text": "hi"}]}, "finishReason": "STOP"}
        ],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2},
    }
    proxy = await start_proxy(_config("gemini", await raw_upstream(b"data: " + orjson.dumps(event) + b"\r\n\r\n")))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "hi"
