"""Spend escape: an Anthropic-format upstream whose `usage` has no `output_tokens`.

An Anthropic-compatible server or a gateway in front of one may report the input alone.
Read as zero output tokens, its answers were priced as their prompt, however long (the
OpenAI format's incomplete usage is counted since `test_careless_upstream_partial_usage`);
through the pass-through of `/v1/messages`, an answer without usage was priced as its
prompt too. Either way the answer is now counted from its text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import routes_upstream

ANSWER = " ".join(["word"] * 400)  # about 400 tokens of output
OUT = 10.0


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async def messages(request: web.Request) -> web.Response:
        body = await request.json()
        usage = {"input_tokens": 12} if request.headers.get("x-usage") != "none" else None
        msg = {
            "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": ANSWER}], "stop_reason": "end_turn", "stop_sequence": None,
            **({"usage": usage} if usage is not None else {}),
        }  # fmt: skip
        return web.json_response(msg)

    async with routes_upstream(web.post("/v1/messages", messages)) as server:
        yield server.url


def _config(base_url: str) -> dict[str, Any]:
    price = {"input_per_mtok": 0, "output_per_mtok": OUT}
    return {
        "providers": {"p": {"kind": "anthropic", "base_url": base_url, "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "claude-x", "price": price}},
        "models": {"m": {"deployments": ["d"]}},
    }


def _priced_for_the_answer(proxy: Any) -> None:
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and 350 <= rec.usage.completion_tokens <= 500, rec.usage
    assert rec.cost_usd == pytest.approx(rec.usage.completion_tokens * OUT / 1e6)


@pytest.mark.parametrize("usage", ["input only", "none"])
async def test_an_anthropic_answer_without_output_tokens_is_counted(
    start_proxy: Any, upstream: str, usage: str
) -> None:
    proxy = await start_proxy(_config(upstream))
    hdrs = {"x-usage": "none"} if usage == "none" else {}
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, default_headers=hdrs)
    got = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert got.choices[0].message.content == ANSWER
    _priced_for_the_answer(proxy)


@pytest.mark.parametrize("usage", ["input only", "none"])
async def test_a_passed_through_answer_without_output_tokens_is_counted(
    start_proxy: Any, upstream: str, usage: str
) -> None:
    proxy = await start_proxy(_config(upstream))
    hdrs = {"x-usage": "none"} if usage == "none" else {}
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0, default_headers=hdrs)
    got = await client.messages.create(
        model="m", max_tokens=1000, extra_body={"top_k": 5}, messages=[{"role": "user", "content": "hi"}]
    )
    await client.close()
    assert got.content[0].type == "text" and got.content[0].text == ANSWER
    _priced_for_the_answer(proxy)
