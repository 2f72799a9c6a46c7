"""A Responses usage whose `input_tokens_details` is not an object (an odd server's `"x"`)
made a complete answer unreadable: a JSON answer was an AttributeError, retried (each attempt
paid at the provider) and then a 502; a stream raised at its terminal event after all its text
was relayed, ended with an error and recorded 0 output tokens. Such details are read as absent:
the answer is served once, billed as reported."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.conftest import eventually, routes_upstream
from tests.security.conftest import Served, failover_config
from tests.security.test_stored_state_budgets import stream_events

USAGE = {"input_tokens": 8, "output_tokens": 5, "total_tokens": 13, "input_tokens_details": "x",
         "output_tokens_details": ["y"]}  # fmt: skip
MESSAGE = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
           "content": [{"type": "output_text", "text": "hello there", "annotations": []}]}  # fmt: skip
RESPONSE = {"id": "resp_1", "object": "response", "created_at": 0, "model": "x", "status": "completed",
            "output": [MESSAGE], "usage": USAGE}  # fmt: skip


class Upstream:
    def __init__(self) -> None:
        self.calls = 0

    async def responses(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        if not (await request.json()).get("stream"):
            return web.json_response(RESPONSE)
        events = [
            {"type": "response.created", "sequence_number": 0, "response": {**RESPONSE, "status": "in_progress",
                                                                             "output": [], "usage": None}},
            {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": MESSAGE},
            {"type": "response.output_text.delta", "sequence_number": 2, "item_id": "msg_1", "output_index": 0,
             "content_index": 0, "delta": "hello there", "logprobs": []},
            {"type": "response.completed", "sequence_number": 3, "response": RESPONSE},
        ]  # fmt: skip
        return await stream_events(request, events)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Any, Upstream]]:
    up = Upstream()
    async with routes_upstream(web.post("/v1/responses", up.responses)) as server:
        yield server, up


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_details_that_are_not_an_object_are_read_as_absent(
    stream: bool, upstream: tuple[Any, Upstream], serve: Any
) -> None:
    server, up = upstream
    cfg = failover_config(server)
    cfg["models"]["m"]["max_attempts"] = 4
    proxy: Served = await serve(cfg)
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        if not stream:
            text = (await client.responses.create(model="m", input="hi")).output_text
        else:
            async with await client.responses.create(model="m", input="hi", stream=True) as events:
                kinds = [ev.type async for ev in events]
            assert kinds[-1] == "response.completed", kinds
            text = "hello there"
    assert text == "hello there" and up.calls == 1

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")
    assert rec.outcome == "ok"
    assert (rec.attempts[-1].usage.prompt_tokens, rec.attempts[-1].usage.completion_tokens) == (8, 5)
