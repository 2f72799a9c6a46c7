"""Chat completions with budgets: `n` and `best_of` are read strictly, so a reservation
covers every choice an upstream writes.

The core read `n` leniently (anything but a JSON integer counted as one choice) and left
the value to the upstream. OpenAI refuses `"4"` or `4.0`, but many OpenAI-compatible
servers validate leniently (pydantic's lax mode turns both into 4): the budget reserved
one choice while four were written and billed, so concurrent requests overshot a budget
that promises they cannot.
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

ADMIN = "sk-choices-admin"
APP = "sk-choices-app"
OUT = 10.0  # USD per million output tokens: 1,000 tokens are one cent


def _lax_int(v: Any) -> int:
    """What a lenient (pydantic lax-mode) server makes of a count."""
    return 1 if v is None else int(float(v))


async def _chat(request: web.Request) -> web.Response:
    body = await request.json()
    each = max(_lax_int(body.get("n")), _lax_int(body.get("best_of")))
    m = body["max_tokens"]
    await asyncio.sleep(0.3)  # the requests overlap
    choices = [
        {"index": i, "message": {"role": "assistant", "content": " word" * m}, "finish_reason": "length"}
        for i in range(each)
    ]
    usage = {"prompt_tokens": 5, "completion_tokens": m * each, "total_tokens": 5 + m * each}
    out = {"id": "c", "object": "chat.completion", "created": 1, "model": "x", "choices": choices, "usage": usage}
    return web.Response(body=orjson.dumps(out), content_type="application/json")


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with routes_upstream(web.post("/v1/chat/completions", _chat)) as server:
        yield server.url + "/v1"


def _config(upstream: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "providers": {"p": {"base_url": upstream, "api_key": "key-p"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 0, "output_per_mtok": OUT}}},
        "models": {"m": {"deployments": ["d"]}},
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "cent", "scope": "team", "match": "t", "limit_usd": 0.01, "period": "day"}]},
    }


async def _spent(url: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/admin/budgets", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            spent: float = next(b for b in (await r.json())["budgets"] if b["name"] == "cent")["spent_usd"]
    return spent


async def _three(client: openai.AsyncOpenAI, extra: dict[str, Any]) -> list[int | str]:
    async def one() -> int | str:
        try:
            # Worst case: 4 choices of 200 tokens, 0.8 cents; two do not fit one cent.
            await client.chat.completions.create(
                model="m", max_tokens=200, messages=[{"role": "user", "content": "hi"}], extra_body=extra
            )
        except openai.BadRequestError as e:
            return f"400 {e.body}"
        except openai.APIStatusError as e:
            return e.status_code
        return 200

    return list(await asyncio.gather(*(one() for _ in range(3))))


async def test_concurrent_chats_with_n_do_not_overshoot_a_budget(upstream: str, tmp_path: Path) -> None:
    async with cost_proxy(_config(upstream, tmp_path)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0)
        statuses = sorted(await _three(client, {"n": 4}), key=str)
        await client.close()
        spent = await _spent(proxy.url)
    assert statuses == [200, 429, 429], statuses
    assert spent <= 0.01 + 1e-9, f"${spent} spent against a $0.01 budget"


async def test_both_token_bounds_reserve_the_larger(upstream: str, tmp_path: Path) -> None:
    """`max_completion_tokens: 1` beside `max_tokens: 200`: the reservation was for one token a
    choice, while a provider that reads `max_tokens` (DeepSeek, Mistral, an older server; this
    one) wrote 200. OpenAI refuses the pair, so a client that sends it targets such a server."""
    async with cost_proxy(_config(upstream, tmp_path)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0)
        statuses = sorted(await _three(client, {"n": 4, "max_completion_tokens": 1}), key=str)
        await client.close()
        spent = await _spent(proxy.url)
    assert statuses == [200, 429, 429], statuses
    assert spent <= 0.01 + 1e-9, f"${spent} spent against a $0.01 budget"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": "4"}, "n"),
        ({"n": 4.0}, "n"),
        ({"n": 0}, "n"),
        ({"n": -1}, "n"),
        ({"n": True}, "n"),
        ({"best_of": "4"}, "best_of"),
        ({"best_of": 4.5}, "best_of"),
    ],
    ids=["n-string", "n-float", "n-zero", "n-negative", "n-bool", "best_of-string", "best_of-float"],
)
async def test_a_count_that_is_not_a_positive_integer_is_a_400(
    upstream: str, tmp_path: Path, extra: dict[str, Any], param: str
) -> None:
    async with cost_proxy(_config(upstream, tmp_path)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0)
        answers = await _three(client, extra)
        await client.close()
        spent = await _spent(proxy.url)
    assert all(isinstance(a, str) and a.startswith("400") and f"'{param}'" in a for a in answers), answers
    assert spent == 0, f"${spent} spent on refused requests"
