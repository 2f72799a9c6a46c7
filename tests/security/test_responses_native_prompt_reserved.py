"""A Responses request that only a Responses deployment can serve (it has no chat
translation: an `include`, a built-in tool, `reasoning`, ...) was decided and reserved on its
`input` alone: its `instructions` and its tools' definitions, which the provider bills as
prompt tokens, were not counted. Ten concurrent requests of a 10,000-word system prompt,
each with `include` set, were all admitted against a budget that holds three, and spent
twice its limit. They are counted now, as on the chat path (where they become the system
message and the chat tools)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import routes_upstream
from tests.test_cost_support import budget_spent, cost_proxy, statuses_of

ADMIN, APP = "sk-native-admin", "sk-native-app"
LIMIT = 0.05  # USD, at $1 a million input tokens
WORDS = "lorem ipsum dolor sit amet " * 2000  # 10,000 words: about $0.01 billed a request


async def _responses(request: web.Request) -> web.Response:
    """Bills a word a token of everything the model reads: instructions, input and tools."""
    body = await request.json()
    read = [body.get("instructions") or "", orjson.dumps(body.get("input")).decode()]
    read += [str(t.get("description", "")) + orjson.dumps(t.get("parameters")).decode() for t in body.get("tools", [])]
    prompt = sum(len(s.split()) for s in read)
    await asyncio.sleep(0.3)  # the requests overlap
    text = {"type": "output_text", "text": "ok", "annotations": []}
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [text]}
    usage = {"input_tokens": prompt, "output_tokens": 1, "total_tokens": prompt + 1}
    out = {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-4o", "status": "completed"}
    return web.json_response({**out, "output": [message], "usage": usage})


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with routes_upstream(web.post("/v1/responses", _responses)) as server:
        yield server.url + "/v1"


def _config(upstream: str, tmp_path: Path) -> dict[str, Any]:
    price = {"input_per_mtok": 1.0, "output_per_mtok": 0}
    return {
        "providers": {"p": {"kind": "openai", "base_url": upstream, "api_key": "key-p"}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o", "price": price}},
        "models": {"m": {"deployments": ["d"]}},
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "b", "scope": "team", "match": "t", "limit_usd": LIMIT, "period": "day"}]},
    }


_TOOL = {
    "type": "function",
    "name": "lookup",
    "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": WORDS}}},
}


@pytest.mark.parametrize(
    "prompt",
    [{"instructions": WORDS}, {"tools": [_TOOL, {"type": "web_search"}]}],
    ids=["instructions", "tools"],
)
async def test_what_the_model_reads_besides_the_input_is_reserved(
    prompt: dict[str, Any], upstream: str, tmp_path: Path
) -> None:
    async with cost_proxy(_config(upstream, tmp_path)) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0) as client:
            statuses = await statuses_of(
                lambda: client.responses.create(
                    model="m",
                    input="hi",
                    max_output_tokens=5,
                    include=["reasoning.encrypted_content"],  # no chat translation: served natively
                    **prompt,
                )
            )
        spent = await budget_spent(proxy.url, ADMIN)
    assert spent <= LIMIT + 1e-9, f"${spent} spent against a ${LIMIT} budget ({statuses})"
    assert 429 in statuses and 200 in statuses, statuses
