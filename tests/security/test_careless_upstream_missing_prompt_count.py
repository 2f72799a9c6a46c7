"""Spend escape: an upstream whose `usage` counts the answer but not the prompt.

A self-hosted server or a gateway may report `completion_tokens` alone (an embeddings server
`total_tokens` alone, or `{}`; an Anthropic-format one `output_tokens` without
`input_tokens`). The missing prompt count was read as 0: a prompt of 13,500 tokens was
priced at nothing, outside every budget. Now the prompt is taken from `total_tokens` where
the upstream gave one, else the request is counted as when it reports no usage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import routes_upstream
from tests.security.conftest import openai_answer

PROMPT = "lorem ipsum dolor " * 2000  # about 6,000 tokens
IN = 10.0  # $ per million prompt tokens; output is free, so the cost is the prompt's


def _usage(kind: str, completion: int) -> dict[str, int]:
    return {"total": {"completion_tokens": completion, "total_tokens": 6000 + completion}}.get(
        kind, {"completion_tokens": completion}
    )


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        kind = body["messages"][-1]["content"].split()[-1]
        usage = _usage(kind, 3)
        return await openai_answer(request, body, "ok it is", usage)

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        kind = body["input"].split()[-1]
        usage = {"total_tokens": 6000} if kind == "total" else {}
        data = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]
        return web.json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})

    async def messages(request: web.Request) -> web.Response:
        body = await request.json()
        msg = {
            "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": "ok it is"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"output_tokens": 3},
        }  # fmt: skip
        return web.json_response(msg)

    async with routes_upstream(
        web.post("/v1/chat/completions", chat),
        web.post("/v1/embeddings", embeddings),
        web.post("/v1/messages", messages),
    ) as server:
        yield server.url


def _config(base_url: str) -> dict[str, Any]:
    price = {"input_per_mtok": IN, "output_per_mtok": 0.0}
    return {
        "providers": {
            "o": {"kind": "openai", "base_url": f"{base_url}/v1", "api_key": "k"},
            "a": {"kind": "anthropic", "base_url": base_url, "api_key": "k"},
        },
        "deployments": {
            "d": {"provider": "o", "model": "x", "price": price},
            "e": {"provider": "o", "model": "x-embed", "price": price},
            "c": {"provider": "a", "model": "claude-x", "price": price},
        },
        "models": {"m": {"deployments": ["d"]}, "emb": {"deployments": ["e"]}, "claude": {"deployments": ["c"]}},
    }


async def _priced_for_the_prompt(proxy: Any) -> None:
    for _ in range(100):
        if proxy.recorder.records:
            break
        await asyncio.sleep(0.02)
    (rec,) = proxy.recorder.records
    assert rec.usage is not None and rec.usage.prompt_tokens >= 5000, rec.usage
    assert rec.cost_usd >= 5000 * IN / 1e6


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", ["completion_only", "total"])
async def test_a_chat_answer_without_its_prompt_count_is_priced_for_its_prompt(
    upstream: str, start_proxy: Any, stream: bool, kind: str
) -> None:
    proxy = await start_proxy(_config(upstream))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    msgs: Any = [{"role": "user", "content": f"{PROMPT} {kind}"}]
    if stream:
        got = await client.chat.completions.create(model="m", messages=msgs, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in got if c.choices]) == "ok it is"
    else:
        answer = await client.chat.completions.create(model="m", messages=msgs)
        assert answer.choices[0].message.content == "ok it is"
    await _priced_for_the_prompt(proxy)


@pytest.mark.parametrize("kind", ["empty", "total"])
async def test_embeddings_without_a_prompt_count_are_priced_for_their_input(
    upstream: str, start_proxy: Any, kind: str
) -> None:
    proxy = await start_proxy(_config(upstream))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    got = await client.embeddings.create(model="emb", input=f"{PROMPT} {kind}")
    assert len(got.data) == 1
    await _priced_for_the_prompt(proxy)


async def test_an_anthropic_answer_without_input_tokens_is_priced_for_its_prompt(
    upstream: str, start_proxy: Any
) -> None:
    proxy = await start_proxy(_config(upstream))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    got = await client.messages.create(model="claude", max_tokens=50, messages=[{"role": "user", "content": PROMPT}])
    assert got.content[0].type == "text" and got.content[0].text == "ok it is"
    await _priced_for_the_prompt(proxy)
