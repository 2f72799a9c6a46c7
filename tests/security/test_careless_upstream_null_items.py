"""A careless upstream's 200 whose list of answers holds something that is not an object
(`[null]`, a string) on `/v1/responses`, `/v1/completions`, `/v1/embeddings` and `/v1/messages`
passed through to Anthropic: the upstream's failure (a 502 in the API's format, or the next
deployment), never a 200. It was relayed as a 200: the OpenAI SDK crashed reading embeddings
(inside `create`), `response.output_text` raised AttributeError in the client's code, and the
request was recorded as served, never failed over."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import ServeRoutes, eventually
from tests.security.conftest import Served

ODD = {"null": None, "string": "x"}
ANSWERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "responses": lambda item: {"id": "resp_1", "object": "response", "created_at": 0, "status": "completed",
                               "model": "x", "output": [item], "usage": {"input_tokens": 3, "output_tokens": 1,
                               "total_tokens": 4}},
    "completions": lambda item: {"id": "c1", "object": "text_completion", "created": 0, "model": "x",
                                 "choices": [item], "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                 "total_tokens": 4}},
    "embeddings": lambda item: {"object": "list", "model": "x", "data": [item],
                                "usage": {"prompt_tokens": 3, "total_tokens": 3}},
    "messages": lambda item: {"id": "msg_1", "type": "message", "role": "assistant", "model": "x",
                              "content": [item], "stop_reason": "end_turn", "stop_sequence": None,
                              "usage": {"input_tokens": 3, "output_tokens": 1}},
}  # fmt: skip


@pytest.fixture
async def upstream(serve_routes: ServeRoutes) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[TestServer]]]:

    async def start(answer: dict[str, Any]) -> TestServer:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response(answer)

        return await serve_routes(web.post("/{tail:.*}", handle))

    yield start


async def _ask(proxy: Served, endpoint: str) -> Any:
    if endpoint == "messages":
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0) as ac:
            return await ac.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}], extra_body={"top_k": 3}
            )
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        if endpoint == "responses":
            return await client.responses.create(model="m", input="hi")
        if endpoint == "completions":
            return await client.completions.create(model="m", prompt="hi")
        return await client.embeddings.create(model="m", input="hi")


@pytest.mark.parametrize("odd", list(ODD))
@pytest.mark.parametrize("endpoint", list(ANSWERS))
async def test_an_answer_list_holding_no_object_is_the_upstreams_failure(
    upstream: Callable[[dict[str, Any]], Awaitable[TestServer]], serve: Any, endpoint: str, odd: str
) -> None:
    server = await upstream(ANSWERS[endpoint](ODD[odd]))
    kind = {"kind": "anthropic"} if endpoint == "messages" else {}
    base = f"http://127.0.0.1:{server.port}" + ("" if endpoint == "messages" else "/v1")
    proxy: Served = await serve({
        "providers": {"p": {"base_url": base, "api_key": "k", **kind}},
        "deployments": {"d": {"provider": "p", "model": "x"}},
        "models": {"m": {"deployments": ["d"], "max_attempts": 1}},
    })  # fmt: skip
    with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as raised:
        await _ask(proxy, endpoint)
    assert raised.value.status_code == 502, raised.value

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")
    assert rec.status == 502 and rec.attempts[0].outcome == "server_error", rec
    assert "that are not objects" in (rec.attempts[0].error or ""), rec.attempts[0]
