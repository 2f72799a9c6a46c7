"""Spend escapes through `/v1/responses` passed through to an upstream that speaks Responses.

- `background: true` is answered at once (`queued`, no usage) and run by the provider
  afterwards: it was priced as its prompt, so a key held to a budget could have any amount
  generated, uncounted. It is refused (400) before any upstream call.
- An answer without usage (or without `output_tokens`: a Responses-compatible server, a
  gateway) was priced as its prompt, however long: it is counted from its output.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.conftest import routes_upstream

ANSWER = " ".join(["word"] * 400)
OUT = 10.0


async def test_a_background_response_is_refused_before_any_call(start_upstream: Any, start_proxy: Any) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(
        {
            "providers": {"p": {"base_url": up.base_url, "api_key": "k"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model="m", input="write a novel", background=True, max_output_tokens=100000)
    await client.close()
    assert e.value.body["param"] == "background"  # type: ignore[index]
    assert up.options.requests == []


@pytest.fixture
async def no_usage() -> AsyncIterator[str]:
    async def responses(request: web.Request) -> web.Response:
        body = await request.json()
        usage = {"input_tokens": 12} if request.headers.get("x-usage") == "input" else None
        item = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": ANSWER, "annotations": []}]}  # fmt: skip
        return web.json_response(
            {
                "id": "resp_1",
                "object": "response",
                "created_at": 1,
                "status": "completed",
                "model": body["model"],
                "output": [item],
                "usage": usage,
            }
        )

    async with routes_upstream(web.post("/v1/responses", responses)) as server:
        yield server.url + "/v1"


@pytest.mark.parametrize("usage", ["none", "input"])
async def test_a_response_without_output_tokens_is_counted(start_proxy: Any, no_usage: str, usage: str) -> None:
    price = {"input_per_mtok": 0, "output_per_mtok": OUT}
    proxy = await start_proxy(
        {
            "providers": {"p": {"base_url": no_usage, "api_key": "k"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini", "price": price}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    client = openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key="x", max_retries=0, default_headers={"x-usage": usage}
    )
    got = await client.responses.create(model="m", input="hi")
    await client.close()
    assert got.output_text == ANSWER
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and 350 <= rec.usage.completion_tokens <= 500, rec.usage
    assert rec.cost_usd == pytest.approx(rec.usage.completion_tokens * OUT / 1e6)
