"""`/v1/completions` with budgets and token limits: a request's worst case counts every
completion it asks for.

A completions request asks for `n` (or `best_of`) completions of each of its prompts, each
up to `max_tokens`, all billed. The routing body the core decides on had one prompt turn and
no `n`: budgets reserved one completion, and concurrent requests overshot a budget by the
factor they asked for, though budgets promise that concurrent requests cannot overshoot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import routes_upstream
from tests.test_cost_support import cost_proxy

ADMIN = "sk-combos2-admin"
APP = "sk-combos2-app"
OUT = 10.0  # USD per million output tokens: 1,000 tokens are one cent


async def _completions(request: web.Request) -> web.Response:
    """Honours `n`, `best_of` and a list of prompts, as OpenAI does: every completion is billed."""
    body = await request.json()
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    each = max(body.get("n") or 1, body.get("best_of") or 1)
    m = body["max_tokens"]
    await asyncio.sleep(0.3)  # the requests overlap
    choices = [
        {"text": " word" * m, "index": i, "logprobs": None, "finish_reason": "length"}
        for i in range(len(prompts) * each)
    ]
    usage = {"prompt_tokens": 5, "completion_tokens": m * len(choices), "total_tokens": 5 + m * len(choices)}
    out = {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": "x", "choices": choices, "usage": usage}
    return web.Response(body=orjson.dumps(out), content_type="application/json")


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with routes_upstream(web.post("/v1/completions", _completions)) as server:
        yield server.url + "/v1"


@pytest.mark.parametrize(
    "ask",
    [{"prompt": "hi", "n": 4}, {"prompt": "hi", "best_of": 4}, {"prompt": ["a", "b", "c", "d"]}],
    ids=["n", "best_of", "prompts"],
)
async def test_concurrent_completions_do_not_overshoot_a_budget(
    upstream: str, tmp_path: Path, ask: dict[str, Any]
) -> None:
    cfg = {
        "providers": {"p": {"base_url": upstream, "api_key": "key-p"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 0, "output_per_mtok": OUT}}},
        "models": {"m": {"deployments": ["d"]}},
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "cent", "scope": "team", "match": "t", "limit_usd": 0.01, "period": "day"}]},
    }
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0)

        async def one() -> int:
            try:
                # Worst case: 4 completions of 200 tokens, 0.8 cents; two do not fit one cent.
                await client.completions.create(model="m", max_tokens=200, **ask)
            except openai.APIStatusError as e:
                return e.status_code
            return 200

        statuses = sorted(await asyncio.gather(*(one() for _ in range(3))))
        await client.close()
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/admin/budgets", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                spent = next(b for b in (await r.json())["budgets"] if b["name"] == "cent")["spent_usd"]
    assert statuses == [200, 429, 429], statuses
    assert spent <= 0.01 + 1e-9, f"${spent} spent against a $0.01 budget"
