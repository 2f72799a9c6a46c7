"""Cache poisoning by an incomplete answer: an upstream that ends an answer at a token limit
(`length`), withholds it (`content_filter`) or gives no finish reason at all must not have
that answer served to the next caller as a cache hit (a replay would even say `stop`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import simple_config
from tests.security.conftest import chat_upstream


@dataclass
class Finishing:
    """An OpenAI upstream whose answers end with `finish` (JSON or stream); counts its calls."""

    finish: str | None = "stop"
    calls: int = 0
    server: TestServer | None = None
    options: Any = field(default=None)

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/v1"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await request.json()
        text = f"answer number {self.calls}"
        base = {"id": "c1", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": self.finish}
            usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
            return web.json_response(base | {"object": "chat.completion", "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for delta, finish in (({"role": "assistant", "content": text}, None), ({}, self.finish)):
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            chunk = base | {"object": "chat.completion.chunk", "choices": [choice]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def finishing() -> AsyncIterator[Finishing]:
    up = Finishing()
    up.server = await chat_upstream(up.handle)
    yield up
    await up.server.close()


async def ask(client: openai.AsyncOpenAI, text: str, stream: bool) -> tuple[str, str]:
    """(x-edgeroute-cache, the answer's text) of a deterministic request."""
    msgs: Any = [{"role": "user", "content": text}]
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=msgs, temperature=0, stream=stream)
    got = raw.parse()
    if isinstance(got, openai.AsyncStream):
        content = "".join([c.choices[0].delta.content or "" async for c in got if c.choices])
    else:
        content = got.choices[0].message.content or ""
    return raw.headers["x-edgeroute-cache"], content


@pytest.mark.parametrize("finish", ["length", "content_filter", None])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_incomplete_answer_is_never_served_from_the_cache(
    finishing: Finishing, start_proxy: Any, finish: str | None, stream: bool
) -> None:
    if stream and finish is None:
        pytest.skip("a stream without a finish reason is already refused as partial")
    cfg = simple_config({"a": finishing})  # type: ignore[dict-item]
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    finishing.finish = finish
    first = await ask(client, "Write a long essay", stream)
    finishing.finish = "stop"  # the upstream recovers: the next caller gets a whole answer
    second = await ask(client, "Write a long essay", stream)
    assert first == ("miss", "answer number 1")
    assert second == ("miss", "answer number 2")
    # The whole answer is cached as before.
    assert await ask(client, "Write a long essay", stream) == ("hit", "answer number 2")
    assert finishing.calls == 2
    await client.close()
