"""A model's answer that says `error` is content like any other: relayed as it came.

The relay's redaction of error events matched the bytes `"error"`, which a model's text that is
exactly that word also encodes to (`"content":"error"`): every event read with it went through
the redaction layer, so a successful answer streamed in the same read as that word had its
`password=...` or key-shaped text replaced with [REDACTED] (and was decoded and scanned, which
successful answers never are). Only an `"error"` key marks an error event."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import routes_upstream
from tests.security.conftest import Served

WORDS = ["error", " password=hunter2", " is what the docs show"]


def _chunk(text: str, finish: str | None = None) -> bytes:
    delta = {"role": "assistant", "content": text} if text else {}
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    # One write: the relay reads the word and the text after it together.
    await resp.write(b"".join(_chunk(w) for w in WORDS) + _chunk("", "stop") + b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    async with routes_upstream(web.post("/v1/chat/completions", _stream)) as server:
        yield server


def _config(server: TestServer) -> dict[str, Any]:
    return {
        "providers": {"p": {"base_url": f"http://127.0.0.1:{server.port}/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
        "models": {"m": {"deployments": ["d"]}},
    }


async def test_a_streamed_answer_saying_error_is_relayed_unchanged(upstream: TestServer, serve: Any) -> None:
    proxy: Served = await serve(_config(upstream))
    user: Any = [{"role": "user", "content": "what does the config example say?"}]

    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(model="m", messages=user, stream=True)
    text = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(text) == "".join(WORDS)

    aclient = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    async with aclient.messages.stream(model="m", messages=user, max_tokens=10) as astream:
        assert await astream.get_final_text() == "".join(WORDS)
