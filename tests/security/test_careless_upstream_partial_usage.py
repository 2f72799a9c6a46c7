"""Spend escape: an upstream whose `usage` reports the prompt but not the completion.

A self-hosted server or a gateway in front of one may send `usage` with `prompt_tokens`
alone (or with `total_tokens` beside it). The ledger read the missing `completion_tokens`
as 0: a long answer was priced as its prompt only, and budgets never saw its output. Now a
usage without completion tokens is incomplete: the completion is `total_tokens - prompt_tokens`
when the upstream gave a total, else counted from the answer's text, as for an upstream
that reports no usage at all. (Embeddings produce no completion: their usage is whole
without it.)
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
PROMPT_TOKENS = 12


def _usage(total: bool) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, **({"total_tokens": PROMPT_TOKENS + 400} if total else {})}


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await openai_answer(request, body, ANSWER, _usage(request.headers.get("x-total") == "1"))

    server = await chat_upstream(chat)
    yield f"http://127.0.0.1:{server.port}/v1"
    await server.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("total", [False, True], ids=["prompt_only", "with_total"])
async def test_an_answer_whose_usage_lacks_completion_tokens_is_priced_for_its_output(
    upstream: str, start_proxy: Any, stream: bool, total: bool
) -> None:
    proxy = await start_proxy(priced_config(upstream))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    msgs: Any = [{"role": "user", "content": "write"}]
    extra = {"x-total": "1"} if total else {}
    if stream:
        got = await client.chat.completions.create(model="m", messages=msgs, stream=True, extra_headers=extra)
        text = "".join([c.choices[0].delta.content or "" async for c in got if c.choices])
    else:
        answer = await client.chat.completions.create(model="m", messages=msgs, extra_headers=extra)
        text = answer.choices[0].message.content or ""
    assert text == ANSWER
    for _ in range(100):
        if proxy.recorder.records:
            break
        await asyncio.sleep(0.02)
    (rec,) = proxy.recorder.records
    (attempt,) = rec.attempts
    # The output is priced: 400 tokens at $10 a million, beside 12 at $1 (the prompt alone is $0.000012).
    assert attempt.usage is not None and attempt.usage.completion_tokens >= 350, attempt
    assert rec.cost_usd >= 0.0035
