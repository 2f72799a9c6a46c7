"""A stream request an upstream answers with a whole JSON answer (a server that ignores
`stream: true`) is served as the stream that delivers it; a client that asked for
`stream_options: {include_usage: true}` gets that stream's last chunk as OpenAI sends it:
`choices: []` and the answer's `usage`. A legacy completions client never got it (its request's
`include_usage` was not read), nor did a chat client whose upstream's JSON carried no usage
(the usage edgeroute charged is then the one sent)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
TEXT_ANSWER = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "x",
    "choices": [{"index": 0, "text": "three word answer", "logprobs": None, "finish_reason": "stop"}],
    "usage": USAGE,
}
CHAT_ANSWER_WITHOUT_USAGE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "x",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "three word answer"}, "finish_reason": "stop"}
    ],
}


def _json(body: dict[str, Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    return handle


async def _proxy(
    start_proxy: StartProxy, serve_routes: ServeRoutes, path: str, body: dict[str, Any], cached: bool = False
) -> Proxy:
    up = await serve_routes(web.post(path, _json(body)))
    model: dict[str, Any] = {"deployments": ["d"]}
    if cached:
        model["cache"] = {"ttl": 300, "deterministic_only": False}
    return await start_proxy(
        {
            "providers": {"p": {"base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": model},
        }
    )


async def _stream(proxy: Proxy, **ask: Any) -> list[Any]:
    """The chunks of a stream the OpenAI SDK asked for: a legacy completion's with a `prompt`,
    else chat's (after the same request asked without a stream, with `first_json`)."""
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        if "prompt" in ask:
            stream: Any = await client.completions.create(model="m", stream=True, **ask)
        else:
            messages = [{"role": "user", "content": "hi"}]
            if ask.pop("first_json", False):
                await client.chat.completions.create(model="m", messages=messages)
            stream = await client.chat.completions.create(model="m", messages=messages, stream=True, **ask)
        return [c async for c in stream]
    finally:
        await client.close()


def _text_of(chunks: list[Any]) -> str:
    return "".join(
        getattr(ch, "text", None) or getattr(getattr(ch, "delta", None), "content", None) or ""
        for c in chunks
        for ch in c.choices
    )


def _usage_chunk(chunks: list[Any]) -> tuple[int, int, int]:
    """The last chunk's usage, which must be OpenAI's usage chunk (no choices)."""
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, last
    return last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens


INCLUDE_USAGE: dict[str, Any] = {"stream_options": {"include_usage": True}}


async def test_a_completions_stream_of_a_json_answer_ends_with_its_usage(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, "/v1/completions", TEXT_ANSWER)
    chunks = await _stream(proxy, prompt="hi", **INCLUDE_USAGE)
    assert _text_of(chunks) == "three word answer"
    assert _usage_chunk(chunks) == (7, 3, 10)
    rec = await recorded(proxy)
    assert rec.usage is not None and rec.usage.completion_tokens == 3


async def test_a_completions_stream_of_a_json_answer_without_include_usage_has_none(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, "/v1/completions", TEXT_ANSWER)
    chunks = await _stream(proxy, prompt="hi")
    assert all(c.usage is None and c.choices for c in chunks)


@pytest.mark.parametrize("cached", [False, True], ids=["json-answer", "cache-hit"])
async def test_a_chat_stream_of_an_answer_without_usage_ends_with_the_charged_usage(
    start_proxy: StartProxy, serve_routes: ServeRoutes, cached: bool
) -> None:
    """Its upstream answered JSON without usage; or it was stored so (a JSON request's miss)
    and is replayed as a stream."""
    proxy = await _proxy(start_proxy, serve_routes, "/v1/chat/completions", CHAT_ANSWER_WITHOUT_USAGE, cached)
    chunks = await _stream(proxy, first_json=cached, **INCLUDE_USAGE)
    assert _text_of(chunks) == "three word answer"
    charged = proxy.recorder.records[0].usage  # the miss's, for a hit
    assert charged is not None and charged.completion_tokens > 0
    want = (charged.prompt_tokens, charged.completion_tokens, charged.prompt_tokens + charged.completion_tokens)
    assert _usage_chunk(chunks) == want
    rec = await recorded(proxy, 1 + cached)
    assert rec.cache == ("hit" if cached else None)
