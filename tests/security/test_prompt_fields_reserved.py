"""Fields the provider renders into the prompt beside the ones edgeroute counted: on chat, the
legacy `functions` (tools by their older name, still served by OpenAI and Azure) and a
`response_format` JSON schema; on completions, the `suffix` (the text after the insertion,
read with each prompt).
A request's reservation left them out: ten concurrent requests of a 10,000-word function
description (or schema, or suffix), each billed for it, were all admitted against a budget
that holds three, and spent twice its limit. They are counted now, as `tools` are."""

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

ADMIN, APP = "sk-fields-admin", "sk-fields-app"
LIMIT = 0.05  # USD, at $1 a million input tokens
WORDS = "lorem ipsum dolor sit amet " * 2000  # 10,000 words: about $0.01 billed a request


async def _chat(request: web.Request) -> web.Response:
    """Bills a word a token of what the model reads: messages, functions, response_format."""
    body = await request.json()
    read = [orjson.dumps(body.get(k)).decode() for k in ("messages", "functions", "response_format")]
    prompt = sum(len(s.split()) for s in read)
    await asyncio.sleep(0.3)  # the requests overlap
    out = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": prompt + 1},
    }
    return web.json_response(out)


async def _completions(request: web.Request) -> web.Response:
    """Bills a word a token of the prompt and the suffix, as an insertion reads both."""
    body = await request.json()
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    prompt = sum(len(p.split()) + len(str(body.get("suffix") or "").split()) for p in prompts)
    await asyncio.sleep(0.3)
    choice = {"text": "x", "index": 0, "logprobs": None, "finish_reason": "stop"}
    usage = {"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": prompt + 1}
    return web.json_response({"id": "cmpl", "object": "text_completion", "created": 1, "model": "gpt-4o",
                              "choices": [choice], "usage": usage})  # fmt: skip


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with routes_upstream(
        web.post("/v1/chat/completions", _chat), web.post("/v1/completions", _completions)
    ) as server:
        yield server.url + "/v1"


_SCHEMA = {"type": "object", "description": WORDS, "properties": {}}


@pytest.mark.parametrize(
    "extra",
    [
        {"functions": [{"name": "lookup", "description": WORDS, "parameters": {"type": "object"}}]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": _SCHEMA}}},
        {"suffix": WORDS},
        {"suffix": WORDS[: len(WORDS) // 4], "prompt": ["a(", "b(", "c(", "d("]},  # read with each prompt
    ],
    ids=["functions", "response_format", "completions-suffix", "completions-suffix-prompts"],
)
async def test_prompt_fields_beside_messages_are_reserved(extra: dict[str, Any], upstream: str, tmp_path: Path) -> None:
    cfg = {
        "providers": {"p": {"base_url": upstream, "api_key": "key-p"}},
        "deployments": {
            "d": {"provider": "p", "model": "gpt-4o", "price": {"input_per_mtok": 1.0, "output_per_mtok": 0}}
        },
        "models": {"m": {"deployments": ["d"]}},
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "b", "scope": "team", "match": "t", "limit_usd": LIMIT, "period": "day"}]},
    }
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0) as client:
            if "suffix" in extra:
                statuses = await statuses_of(
                    lambda: client.completions.create(model="m", max_tokens=5, **{"prompt": "def f(", **extra})
                )
            else:
                say: Any = [{"role": "user", "content": "hi"}]
                statuses = await statuses_of(
                    lambda: client.chat.completions.create(model="m", max_tokens=5, messages=say, **extra)
                )
        spent = await budget_spent(proxy.url, ADMIN)
    assert spent <= LIMIT + 1e-9, f"${spent} spent against a ${LIMIT} budget ({statuses})"
    assert 429 in statuses and 200 in statuses, statuses
