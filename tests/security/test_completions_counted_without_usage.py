"""A legacy completions answer that carries no usage is counted from its text, without the
prompt `echo: true` repeats at its start. The prompt's tokens were subtracted whether or not
the text started with it: an OpenAI-compatible server that ignores `echo` (and reports no
usage, the case the count exists for) had a 1,000-word answer to a 1,000-word prompt counted
as 0 output tokens, JSON and streamed. The echo is now taken out of a choice (a stream) only
when its text starts with its prompt; an answer that does echo is still counted without it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import eventually, routes_upstream
from tests.security.conftest import Served, failover_config

PROMPT = "hello " * 1000
ANSWER = " world" * 1000  # 1,000 tokens


def _answering(echoes: bool) -> Any:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        texts = ([body["prompt"]] if echoes and body.get("echo") else []) + [ANSWER]
        if not body.get("stream"):
            choice = {"index": 0, "text": "".join(texts), "finish_reason": "length", "logprobs": None}
            return web.json_response({"id": "c1", "object": "text_completion", "created": 0, "model": "x",
                                      "choices": [choice]})  # fmt: skip
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, text in enumerate(texts):
            done = "length" if i == len(texts) - 1 else None
            choice = {"index": 0, "text": text, "finish_reason": done, "logprobs": None}
            chunk = {"id": "c1", "object": "text_completion", "created": 0, "model": "x", "choices": [choice]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    return completions


@pytest.fixture(params=[False, True], ids=["echo-ignored", "echo-honoured"])
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, bool]]:
    async with routes_upstream(web.post("/v1/completions", _answering(request.param))) as server:
        yield server, request.param


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_only_an_echoed_prompt_is_left_out_of_the_count(
    stream: bool, upstream: tuple[Any, bool], serve: Any
) -> None:
    server, echoes = upstream
    proxy: Served = await serve(failover_config(server))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        if not stream:
            text = (
                (await client.completions.create(model="m", prompt=PROMPT, echo=True, max_tokens=1200)).choices[0].text
            )
        else:
            events = await client.completions.create(model="m", prompt=PROMPT, echo=True, max_tokens=1200, stream=True)
            text = "".join([c.choices[0].text async for c in events])
    assert text.startswith(PROMPT) == echoes

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    usage = (await eventually(recorded, "the request's record")).attempts[-1].usage
    assert 990 <= usage.completion_tokens <= 1010, usage
