"""Spend escape: a stream asked without `stream_options.include_usage`.

OpenAI sends a stream's usage only when the request asks for it, and its SDKs do not ask by
default. edgeroute relayed the client's body as it came, so such a stream carried no usage
and was counted from its visible text: a reasoning model's reasoning tokens, billed as output
and never streamed, were priced at nothing (here 2,000 of them against 12 visible). Now every
stream to an OpenAI-format deployment asks for the usage; a client that did not ask is not
sent the usage chunk (OpenAI makes it opt-in: code reading `chunk.choices[0]` breaks on it).

A usage chunk written with spaces (`"usage": {`, as Python's `json.dumps` writes it) was
not found either, and the answer counted from its text too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.security.conftest import chat_upstream

REASONING = 2000
WORDS = ["The", " answer", " is", " forty", "-two", "."]


def _dumps(obj: Any, spaced: bool) -> bytes:
    return json.dumps(obj).encode() if spaced else orjson.dumps(obj)


@pytest.fixture
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A reasoning model as OpenAI streams it: its reasoning is billed, never sent; the usage
    (with `usage: null` on every other chunk) only when the request asks for it."""
    seen: list[dict[str, Any]] = []
    request_ = request  # parametrized with `spaced`: the upstream writes its JSON as json.dumps does

    async def chat(req: web.Request) -> web.StreamResponse:
        body = await req.json()
        seen.append(body)
        spaced = bool(getattr(request_, "param", False))
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        base: dict[str, Any] = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": "o4",
        }
        if with_usage:
            base["usage"] = None
        for i, word in enumerate(WORDS):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await resp.write(b"data: " + _dumps(chunk, spaced) + b"\n\n")
        end = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await resp.write(b"data: " + _dumps(end, spaced) + b"\n\n")
        if with_usage:
            usage = {
                "prompt_tokens": 9,
                "completion_tokens": REASONING + len(WORDS),
                "total_tokens": 9 + REASONING + len(WORDS),
                "completion_tokens_details": {"reasoning_tokens": REASONING},
            }
            await resp.write(b"data: " + _dumps({**base, "choices": [], "usage": usage}, spaced) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    server = await chat_upstream(chat)
    yield f"http://127.0.0.1:{server.port}/v1", seen
    await server.close()


def _config(base_url: str, **provider: Any) -> dict[str, Any]:
    return {
        "providers": {"p": {"kind": "openai", "base_url": base_url, "api_key": "k", **provider}},
        "deployments": {
            "d": {"provider": "p", "model": "o4", "price": {"input_per_mtok": 1.0, "output_per_mtok": 10.0}}
        },
        "models": {"m": {"deployments": ["d"]}},
    }


async def _record(proxy: Any) -> Any:
    for _ in range(200):
        if proxy.recorder.records:
            break
        await asyncio.sleep(0.02)
    (rec,) = proxy.recorder.records
    return rec


@pytest.mark.parametrize("asked", ["default", "false"])
@pytest.mark.parametrize("upstream", [False, True], ids=["compact", "spaced"], indirect=True)
async def test_a_stream_asked_without_usage_is_priced_for_its_reasoning_tokens(
    upstream: tuple[str, list[dict[str, Any]]], start_proxy: Any, asked: str
) -> None:
    base_url, seen = upstream
    proxy = await start_proxy(_config(base_url))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    options: Any = {"include_usage": False} if asked == "false" else openai.NOT_GIVEN
    got = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "think hard"}],
        stream=True,
        stream_options=options,
    )
    chunks = [c async for c in got]
    # What the client sees is what OpenAI sends a client that did not ask: no usage chunk.
    assert all(c.choices for c in chunks), [c for c in chunks if not c.choices]
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(WORDS)
    assert seen[-1]["stream_options"] == {"include_usage": True}
    rec = await _record(proxy)
    (attempt,) = rec.attempts
    assert attempt.usage is not None and not attempt.usage.estimated, attempt
    assert attempt.usage.completion_tokens == REASONING + len(WORDS)
    assert rec.cost_usd == pytest.approx((9 * 1.0 + (REASONING + len(WORDS)) * 10.0) / 1e6)


@pytest.mark.parametrize("upstream", [False, True], ids=["compact", "spaced"], indirect=True)
async def test_a_client_that_asks_for_usage_still_gets_it(
    upstream: tuple[str, list[dict[str, Any]]], start_proxy: Any
) -> None:
    base_url, seen = upstream
    proxy = await start_proxy(_config(base_url))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    got = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "think hard"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in got]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == REASONING + len(WORDS)
    assert seen[-1]["stream_options"] == {"include_usage": True}
    rec = await _record(proxy)
    assert not rec.attempts[0].usage.estimated
    assert rec.attempts[0].usage.completion_tokens == REASONING + len(WORDS)


async def test_a_provider_that_cannot_take_stream_options_is_not_sent_them(
    upstream: tuple[str, list[dict[str, Any]]], start_proxy: Any
) -> None:
    """`options.unsupported: [stream_options]` (a server that refuses the field) keeps it off
    the upstream request: the stream is counted from its text, as before."""
    base_url, seen = upstream
    cfg = _config(base_url, options={"unsupported": ["stream_options"], "unsupported_params": "drop"})
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    got = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "think hard"}], stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in got if c.choices]) == "".join(WORDS)
    assert "stream_options" not in seen[-1]
    rec = await _record(proxy)
    assert rec.attempts[0].usage.estimated


async def test_only_the_requests_own_stream_options_are_changed(
    upstream: tuple[str, list[dict[str, Any]]], start_proxy: Any
) -> None:
    """The client's `stream_options` object is found in the body's bytes, not by parsing it
    whole: a tool's parameter and a key named alike, a message quoting one, are left as sent,
    and the client's other options are kept."""
    base_url, seen = upstream
    proxy = await start_proxy(_config(base_url))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    tool_params = {"type": "object", "properties": {"stream_options": {"type": "object", "description": "}{"}}}
    quoted = 'send {"stream_options": {"include_usage": false}} and \\"stream_options": }'
    options: Any = {"include_usage": False, "continuous_usage_stats": True}  # vLLM's, say
    got = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": quoted}],
        tools=[{"type": "function", "function": {"name": "configure", "parameters": tool_params}}],
        stream=True,
        stream_options=options,
        extra_body={"metadata": {'x "stream_options': "}"}},
    )
    assert "".join([c.choices[0].delta.content or "" async for c in got if c.choices]) == "".join(WORDS)
    sent = seen[-1]
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert sent["messages"][0]["content"] == quoted
    assert sent["tools"][0]["function"]["parameters"] == tool_params
    assert sent["metadata"] == {'x "stream_options': "}"}
    rec = await _record(proxy)
    assert rec.attempts[0].usage.completion_tokens == REASONING + len(WORDS)
