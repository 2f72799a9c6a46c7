"""An upstream's usage that reports fewer output tokens than its text can be is checked on
`/v1/completions` and `/v1/responses` JSON answers too, as on chat: 5 KB of completion text and
12 KB of Response text reported as 3 output tokens were charged at 3 ($0.011, $0.016 where the
text was worth $2 and $4), with no trace in the ledger. The answer is now charged at its
counted text, flagged estimated and recorded `upstream_underreported_usage`. A completions
answer with more choices than asked for (`n` of each prompt) is trimmed to those asked for:
50 choices were relayed for `n: 1`. An embeddings usage of fewer prompt tokens than the inputs
can be (ten 2,000-token texts reported as 1 token) is charged at the inputs' count."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.conftest import eventually, routes_upstream
from tests.security.conftest import Served, failover_config

TEXT = "lorem ipsum dolor sit amet " * 400  # 2,000 words: about 2,000 tokens
LIE = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


async def _completions(request: web.Request) -> web.Response:
    body = await request.json()
    many = 50 if body.get("n") == 1 and body.get("prompt") == "many" else 1
    choices = [{"index": i, "text": TEXT, "finish_reason": "stop", "logprobs": None} for i in range(many)]
    return web.json_response({"id": "c1", "object": "text_completion", "created": 0, "model": "x",
                              "choices": choices, "usage": LIE})  # fmt: skip


async def _responses(request: web.Request) -> web.Response:
    text = {"type": "output_text", "text": TEXT, "annotations": []}
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [text]}
    usage = {"input_tokens": 3, "output_tokens": 3, "total_tokens": 6}
    return web.json_response({"id": "resp_1", "object": "response", "created_at": 0, "model": "x",
                              "status": "completed", "output": [message], "usage": usage})  # fmt: skip


async def _embeddings(request: web.Request) -> web.Response:
    inputs = (await request.json())["input"]
    data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2]} for i in range(len(inputs))]
    return web.json_response(
        {"object": "list", "data": data, "model": "x", "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    )


@pytest.fixture
async def upstream() -> AsyncIterator[Any]:
    routes = (
        web.post("/v1/completions", _completions),
        web.post("/v1/responses", _responses),
        web.post("/v1/embeddings", _embeddings),
    )
    async with routes_upstream(*routes) as server:
        yield server


async def _record(proxy: Served) -> Any:
    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    return await eventually(recorded, "the request's record")


@pytest.mark.parametrize("endpoint", ["completions", "responses"])
async def test_an_impossible_output_count_is_charged_as_counted(endpoint: str, upstream: Any, serve: Any) -> None:
    proxy: Served = await serve(failover_config(upstream))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        if endpoint == "completions":
            said: Any = await client.completions.create(model="m", prompt="hi", max_tokens=4000)
            assert said.choices[0].text == TEXT
        else:
            said = await client.responses.create(model="m", input="hi", max_output_tokens=4000)
            assert said.output_text == TEXT
    rec = await _record(proxy)
    usage = rec.attempts[-1].usage
    assert usage.completion_tokens >= 1500 and usage.estimated, usage
    assert rec.error_class == "upstream_underreported_usage"


async def test_completions_choices_past_those_asked_for_are_not_relayed(upstream: Any, serve: Any) -> None:
    proxy: Served = await serve(failover_config(upstream))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        said = await client.completions.create(model="m", prompt="many", n=1, max_tokens=4000)
    assert [c.index for c in said.choices] == [0]


async def test_embeddings_inputs_reported_as_fewer_tokens_than_they_can_be_are_counted(
    upstream: Any, serve: Any
) -> None:
    proxy: Served = await serve(failover_config(upstream))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        await client.embeddings.create(model="m", input=[TEXT] * 10)  # 20,000 tokens reported as 1
    rec = await _record(proxy)
    assert rec.attempts[-1].usage.prompt_tokens >= 15_000 and rec.error_class == "upstream_underreported_usage"
