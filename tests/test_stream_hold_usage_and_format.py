"""What holds a chat stream until its first content (so that an error before it fails over):
a chunk of usage alone is not content, and a stream in another API's event format is the
upstream's failure, as its whole JSON answer is; both fail over to a healthy deployment."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes

Chunks = list[bytes]


def _sse(*objs: Any) -> Chunks:
    return [b"data: " + orjson.dumps(o) + b"\n\n" for o in objs]


def _chunk(delta: dict[str, Any], finish: str | None = None, model: str = "x") -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [choice]}


USAGE = {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
# A role chunk, a chunk of usage alone, then an error: nothing a user would see came before it.
USAGE_THEN_ERROR = _sse(
    _chunk({"role": "assistant", "content": ""}),
    {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": [], "usage": USAGE},
    {"error": {"message": "first attempt died after usage", "type": "server_error"}},
)
# Anthropic's Messages events, from a deployment of kind openai.
ANTHROPIC_EVENTS = [
    b"event: message_start\ndata: "
    + orjson.dumps({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant"}})
    + b"\n\n",
    b"event: content_block_delta\ndata: "
    + orjson.dumps({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}})
    + b"\n\n",
    b"event: message_delta\ndata: "
    + orjson.dumps({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}})
    + b"\n\n",
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]
HEALTHY = [*_sse(_chunk({"role": "assistant", "content": "fine"}), _chunk({}, "stop")), b"data: [DONE]\n\n"]


def _streaming(chunks: Chunks) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for c in chunks:
            await resp.write(c)
        await resp.write_eof()
        return resp

    return handle


async def _proxy(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, first: Chunks
) -> Proxy:
    bad = await serve_routes(web.post("/v1/chat/completions", _streaming(first)))
    good = await serve_routes(web.post("/v1/chat/completions", _streaming(HEALTHY)))
    price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    return await start_proxy(
        {
            "providers": {"bad": {"base_url": bad.url + "/v1"}, "good": {"base_url": good.url + "/v1"}},
            "deployments": {
                "d-bad": {"provider": "bad", "model": "x", "price": price},
                "d-good": {"provider": "good", "model": "x", "price": price},
            },
            "models": {"m": {"deployments": ["d-bad"], "fallbacks": ["m2"]}, "m2": {"deployments": ["d-good"]}},
        }
    )


@pytest.mark.parametrize("first", [USAGE_THEN_ERROR, ANTHROPIC_EVENTS], ids=["usage-then-error", "anthropic-events"])
async def test_a_stream_without_content_before_its_failure_fails_over(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, first: Chunks
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, first)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await client.close()
    assert text == "fine"  # the healthy deployment's answer alone: no error, nothing of the first
    rec = proxy.recorder.records[-1]
    assert [a.deployment for a in rec.attempts] == ["d-bad", "d-good"]
    assert rec.attempts[0].outcome == "server_error"


async def test_a_stream_in_another_apis_format_is_a_502_not_a_200(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes
) -> None:
    bad = await serve_routes(web.post("/v1/chat/completions", _streaming(ANTHROPIC_EVENTS)))
    proxy = await start_proxy(
        {
            "providers": {"bad": {"base_url": bad.url + "/v1"}},
            "deployments": {"d": {"provider": "bad", "model": "x"}},
            "models": {"m": {"deployments": ["d"], "max_attempts": 1}},
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    finally:
        await client.close()
    assert err.value.status_code == 502 and "another API" in str(err.value.body)


def _text_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": "c", "object": "text_completion", "created": 1, "model": "x", "choices": [choice]}


async def test_a_completions_stream_of_usage_alone_before_its_failure_fails_over(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes
) -> None:
    usage_then_error = _sse(
        {"id": "c", "object": "text_completion", "created": 1, "model": "x", "choices": [], "usage": USAGE},
        {"error": {"message": "first attempt died after usage", "type": "server_error"}},
    )
    healthy = [*_sse(_text_chunk("fine"), _text_chunk("", "stop")), b"data: [DONE]\n\n"]
    bad = await serve_routes(web.post("/v1/completions", _streaming(usage_then_error)))
    good = await serve_routes(web.post("/v1/completions", _streaming(healthy)))
    proxy = await start_proxy(
        {
            "providers": {"bad": {"base_url": bad.url + "/v1"}, "good": {"base_url": good.url + "/v1"}},
            "deployments": {"d-bad": {"provider": "bad", "model": "x"}, "d-good": {"provider": "good", "model": "x"}},
            "models": {"m": {"deployments": ["d-bad"], "fallbacks": ["m2"]}, "m2": {"deployments": ["d-good"]}},
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.completions.create(model="m", prompt="hi", stream=True)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
    finally:
        await client.close()
    assert text == "fine"
    rec = proxy.recorder.records[-1]
    assert [a.deployment for a in rec.attempts] == ["d-bad", "d-good"]
