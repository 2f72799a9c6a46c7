"""`/v1/responses` relayed from a deployment that speaks Responses: an event the OpenAI SDK
cannot read ends the client's stream with an `error` event, or fails over before any content.

The events were relayed unchanged: an upstream's `data: [1]` or a text delta that is a number
crashed the client's stream inside the SDK (AttributeError, TypeError: no `openai.APIError`
its code handles)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import eventually
from tests.security.conftest import ScriptedStreams, Served, failover_config


def _ev(obj: dict[str, Any]) -> bytes:
    return f"event: {obj['type']}\n".encode() + b"data: " + orjson.dumps(obj) + b"\n\n"


def _response(status: str) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 0, "status": status, "model": "x", "output": [],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}}  # fmt: skip


ITEM = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}
PART = {"type": "output_text", "text": "", "annotations": []}
AT = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
HEAD = (
    _ev({"type": "response.created", "sequence_number": 0, "response": _response("in_progress")})
    + _ev({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": ITEM})
    + _ev({"type": "response.content_part.added", "sequence_number": 2, **AT, "part": PART})
)
DELTA = _ev({"type": "response.output_text.delta", "sequence_number": 3, **AT, "delta": "partial", "logprobs": []})
DONE_ITEM = {**ITEM, "status": "completed", "content": [{**PART, "text": "partial"}]}
END = _ev({"type": "response.output_item.done", "sequence_number": 8, "output_index": 0, "item": DONE_ITEM}) + _ev(
    {"type": "response.completed", "sequence_number": 9, "response": {**_response("completed"), "output": [DONE_ITEM]}}
)
BAD = {
    "not-an-object": b"event: response.output_text.delta\ndata: [1]\n\n",
    "number-delta": _ev({"type": "response.output_text.delta", "sequence_number": 4, **AT, "delta": 5}),
}


@pytest.fixture
async def upstreams() -> AsyncIterator[ScriptedStreams]:
    made = ScriptedStreams("/v1/responses")
    yield made
    await made.close()


async def _stream(proxy: Served, go: asyncio.Event) -> tuple[str, str]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    text: list[str] = []
    error = ""
    try:
        async with client.responses.stream(model="m", input="hi") as s:
            async for ev in s:
                if ev.type == "response.output_text.delta":
                    text.append(ev.delta)
                    go.set()
                elif ev.type == "error":  # the stream's end in Responses' terms (the SDK raises nothing)
                    error = ev.message
    except openai.APIError as e:  # anything else (a crash in the SDK) fails the test
        error = str(e)
    return "".join(text), error


@pytest.mark.parametrize("bad", list(BAD))
async def test_after_content_the_stream_ends_with_an_error_event(
    upstreams: ScriptedStreams, serve: Any, bad: str
) -> None:
    up = await upstreams(HEAD + DELTA, BAD[bad] + END)
    proxy: Served = await serve(failover_config(up))
    text, error = await _stream(proxy, upstreams.go)
    assert text == "partial"
    assert "could not read" in error, error

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")
    assert rec.outcome == "stream_interrupted"


@pytest.mark.parametrize("bad", list(BAD))
async def test_before_content_it_fails_over(upstreams: ScriptedStreams, serve: Any, bad: str) -> None:
    broken = await upstreams(HEAD[: HEAD.index(b"event: response.output_item.added")] + BAD[bad] + HEAD + DELTA + END)
    good = await upstreams(HEAD + DELTA + END)
    proxy: Served = await serve(failover_config(broken, good))
    assert await _stream(proxy, upstreams.go) == ("partial", "")
    rec = proxy.recorder.records[-1]
    assert [a.deployment for a in rec.attempts] == ["d0", "d1"]
