"""Spend escape: an upstream whose `usage` counts are not integers.

`completion_tokens: true` was read as 1 token (Python's `int(True)`), `0.5` as 0 and `"7"`
as 7: a long answer priced as its prompt, or nearly. A count that is not an integer is
garbage, not a number of tokens: the answer is counted from its text, as when an upstream
reports no usage (SECURITY.md says so of a string or a list; a boolean or a fraction passed).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.security.conftest import chat_upstream, openai_answer, priced_config

ANSWER = " ".join(["word"] * 400)  # about 400 tokens of output
ODD = {"true": True, "half": 0.5, "string": "7"}


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        usage = {"prompt_tokens": 12, "completion_tokens": ODD[body["messages"][0]["content"]]}
        return await openai_answer(request, body, ANSWER, usage)

    server = await chat_upstream(chat)
    yield f"http://127.0.0.1:{server.port}/v1"
    await server.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("odd", list(ODD))
async def test_a_count_that_is_not_an_integer_is_not_read_as_one(
    upstream: str, start_proxy: Any, stream: bool, odd: str
) -> None:
    proxy = await start_proxy(priced_config(upstream))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    msgs: Any = [{"role": "user", "content": odd}]
    if stream:
        got = await client.chat.completions.create(
            model="m", messages=msgs, stream=True, stream_options={"include_usage": True}
        )
        text = "".join([c.choices[0].delta.content or "" async for c in got if c.choices])
    else:
        answer = await client.chat.completions.create(model="m", messages=msgs)
        text = answer.choices[0].message.content or ""
    assert text == ANSWER
    for _ in range(100):
        if proxy.recorder.records:
            break
        await asyncio.sleep(0.02)
    (rec,) = proxy.recorder.records
    (attempt,) = rec.attempts
    assert attempt.usage is not None and attempt.usage.estimated, attempt
    assert attempt.usage.completion_tokens >= 350, attempt
    assert rec.cost_usd >= 0.0035
