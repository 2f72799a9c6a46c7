"""A Gemini or Bedrock error inside a stream keeps its class, as an OpenAI or Anthropic upstream's does.

Gemini's error object in an SSE chunk (`{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}`)
and Bedrock's exception frames (`throttlingException`, `validationException`, ...) were translated
to an error event whose `type` was the provider's name: before content a quota error failed over as
a server error (no cool-down), a validation error was charged to the deployment's health and answered
502; after content an Anthropic client got `api_error` for a rate limit, an OpenAI client a `type`
no SDK knows. The event's `type` is now the one both APIs use for its status (`rate_limit_error`,
`overloaded_error`, `invalid_request_error`, `api_error`), its `code` the provider's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.mock.bedrock import event_frame, exception_frame
from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded
from tests.providers_fixtures import BEDROCK_OPTIONS
from tests.test_stream_hold_usage_and_format import _streaming

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]


def _gemini(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\r\n\r\n"


def _gemini_text(text: str) -> bytes:
    return _gemini({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}]})


def _gemini_error(code: int, status: str) -> bytes:
    return _gemini({"error": {"code": code, "message": f"upstream said {status}", "status": status}})


GEMINI_GOOD = [
    _gemini(
        {
            "candidates": [{"content": {"role": "model", "parts": [{"text": "good"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4},
        }
    )
]


def _bedrock_text(text: str) -> bytes:
    return event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}})


BR_START = event_frame("messageStart", {"role": "assistant"})


async def _proxy(start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str, *streams: list[bytes]) -> Proxy:
    """Model `m` on the first stream; the next ones are its fallback models'."""
    cfg: dict[str, Any] = {"providers": {}, "deployments": {}, "models": {}}
    for i, events in enumerate(streams):
        handle = _streaming(events)
        up = await serve_routes(
            web.post("/v1beta/models/{target}", handle), web.post("/model/{model}/converse-stream", handle)
        )
        if kind == "gemini":
            cfg["providers"][f"p{i}"] = {"kind": "gemini", "base_url": up.url + "/v1beta", "api_key": "k"}
        else:
            cfg["providers"][f"p{i}"] = {"kind": "bedrock", "base_url": up.url, "options": BEDROCK_OPTIONS}
        cfg["deployments"][f"d{i}"] = {"provider": f"p{i}", "model": "gemini-x" if kind == "gemini" else "claude-x"}
        cfg["models"]["m" if i == 0 else f"m{i}"] = {"deployments": [f"d{i}"]}
    cfg["models"]["m"]["fallbacks"] = [f"m{i}" for i in range(1, len(streams))]
    return await start_proxy(cfg)


async def _openai_stream(proxy: Proxy) -> tuple[str, openai.APIError | None]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    text, error = "", None
    try:
        stream = await client.chat.completions.create(model="m", messages=HI, stream=True)
        async for c in stream:
            text += "".join(ch.delta.content or "" for ch in c.choices)
    except openai.APIError as e:
        error = e
    finally:
        await client.close()
    return text, error


MIDSTREAM = [
    (
        "gemini",
        [_gemini_text("half"), _gemini_error(429, "RESOURCE_EXHAUSTED")],
        "rate_limit_error",
        "RESOURCE_EXHAUSTED",
    ),
    ("gemini", [_gemini_text("half"), _gemini_error(503, "UNAVAILABLE")], "overloaded_error", "UNAVAILABLE"),
    (
        "bedrock",
        [BR_START, _bedrock_text("half"), exception_frame("throttlingException", "Too many requests")],
        "rate_limit_error",
        "throttlingException",
    ),
    (
        "bedrock",
        [BR_START, _bedrock_text("half"), exception_frame("modelStreamErrorException", "The model failed")],
        "api_error",
        "modelStreamErrorException",
    ),
]


@pytest.mark.parametrize(
    ("kind", "events", "etype", "code"),
    MIDSTREAM,
    ids=["gemini-429", "gemini-503", "bedrock-throttle", "bedrock-model"],
)
async def test_an_error_after_content_keeps_its_class(
    start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str, events: list[bytes], etype: str, code: str
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, kind, events)
    text, error = await _openai_stream(proxy)
    assert text == "half"
    assert error is not None and (error.type, error.code) == (etype, code), error
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    try:
        with pytest.raises(anthropic.APIStatusError) as got:
            async with claude.messages.stream(model="m", max_tokens=50, messages=HI) as stream:
                async for _ in stream.text_stream:
                    pass
    finally:
        await claude.close()
    body = got.value.body
    assert isinstance(body, dict) and body["error"]["type"] == etype


@pytest.mark.parametrize(
    ("kind", "first", "good", "outcome"),
    [
        ("gemini", [_gemini_error(429, "RESOURCE_EXHAUSTED")], GEMINI_GOOD, "rate_limited"),
        (
            "bedrock",
            [BR_START, exception_frame("throttlingException", "Too many requests")],
            [
                BR_START,
                _bedrock_text("good"),
                event_frame("messageStop", {"stopReason": "end_turn"}),
                event_frame("metadata", {"usage": {"inputTokens": 3, "outputTokens": 1}}),
            ],
            "rate_limited",
        ),
    ],
    ids=["gemini-429", "bedrock-throttle"],
)
async def test_an_overload_before_content_fails_over_as_one(
    start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str, first: list[bytes], good: list[bytes], outcome: str
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, kind, first, good)
    text, error = await _openai_stream(proxy)
    assert (text, error) == ("good", None)
    rec = await recorded(proxy)
    assert rec.attempts[0].outcome == outcome


@pytest.mark.parametrize(
    ("kind", "events"),
    [
        ("gemini", [_gemini_error(400, "INVALID_ARGUMENT")]),
        ("bedrock", [BR_START, exception_frame("validationException", "The request is not valid")]),
    ],
    ids=["gemini", "bedrock"],
)
async def test_a_validation_error_before_content_is_the_clients(
    start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str, events: list[bytes]
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, kind, events)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as got:
            await client.chat.completions.create(model="m", messages=HI, stream=True)
    finally:
        await client.close()
    assert got.value.status_code == 400, got.value
