"""`/v1/messages` passed through to an Anthropic deployment (here with `top_k`): an event the
Anthropic SDK cannot read ends the client's stream with an API error, or fails over before
any content.

The events were relayed unchanged: an upstream's `data: [1]`, a `content_block_delta` with a
null `delta`, or one for a block never started crashed the client's stream inside the SDK
(TypeError, AttributeError, IndexError: no `anthropic.APIError` its code handles), where the
same upstream behind the translated path was an API error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import orjson
import pytest

from tests.conftest import eventually
from tests.security.conftest import ScriptedStreams, Served, failover_config

USER: Any = [{"role": "user", "content": "hi"}]


def _sse(kind: str, obj: Any) -> bytes:
    return f"event: {kind}\n".encode() + b"data: " + orjson.dumps(obj) + b"\n\n"


START = _sse("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message",
             "role": "assistant", "model": "x", "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": 3, "output_tokens": 1}}})  # fmt: skip
BLOCK = _sse(
    "content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
)
DELTA = _sse(
    "content_block_delta",
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "partial"}},
)
END = (
    _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    + _sse(
        "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}
    )
    + _sse("message_stop", {"type": "message_stop"})
)
BAD = {
    "not-an-object": b"event: content_block_delta\ndata: [1]\n\n",
    "null-delta": _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": None}),
    "unstarted-block": _sse(
        "content_block_delta", {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": "x"}}
    ),
    "no-type": b'event: content_block_delta\ndata: {"index": 0}\n\n',
}


@pytest.fixture
async def upstreams() -> AsyncIterator[ScriptedStreams]:
    made = ScriptedStreams("/v1/messages")
    yield made
    await made.close()


async def _stream(proxy: Served, go: asyncio.Event) -> tuple[str, str]:
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    text: list[str] = []
    error = ""
    try:
        async with client.messages.stream(model="m", max_tokens=10, messages=USER, extra_body={"top_k": 3}) as s:
            async for ev in s:
                if ev.type == "content_block_delta" and ev.delta.type == "text_delta":
                    text.append(ev.delta.text)
                    go.set()
    except anthropic.APIError as e:  # anything else (a crash in the SDK) fails the test
        error = str(e)
    return "".join(text), error


@pytest.mark.parametrize("bad", list(BAD))
async def test_after_content_the_stream_ends_with_an_api_error(
    upstreams: ScriptedStreams, serve: Any, bad: str
) -> None:
    up = await upstreams(START + BLOCK + DELTA, BAD[bad] + END)
    proxy: Served = await serve(failover_config(up, kind="anthropic"))
    text, error = await _stream(proxy, upstreams.go)
    assert text == "partial"
    assert "could not read" in error, error

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")
    assert rec.outcome == "stream_interrupted"


@pytest.mark.parametrize("bad", list(BAD))
async def test_before_content_it_fails_over(upstreams: ScriptedStreams, serve: Any, bad: str) -> None:
    broken = await upstreams(START + BLOCK + BAD[bad] + DELTA + END)
    good = await upstreams(START + BLOCK + DELTA + END)
    proxy: Served = await serve(failover_config(broken, good, kind="anthropic"))
    assert await _stream(proxy, upstreams.go) == ("partial", "")
    rec = proxy.recorder.records[-1]
    assert [a.deployment for a in rec.attempts] == ["d0", "d1"]
