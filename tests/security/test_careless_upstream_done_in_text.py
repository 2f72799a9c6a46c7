"""A model's text that quotes `data: [DONE]` (an answer about server-sent events) is text.

The relay took the bytes `data: [DONE]` anywhere in what it had sent for the stream's end:
inside a JSON string too. An upstream whose text deltas carry several tokens (Anthropic,
Gemini, Bedrock, Azure's batched chunks) quoting it cut the answer there: the rest of the
text, the finish and the usage were never read, the client's stream ended without its
finish (an Anthropic client's without message_stop), and the request was recorded as
served, its usage estimated. `data:[DONE]` (SSE's space is optional), the real end of an
upstream's stream, was not taken as its end: the stream was recorded as interrupted and
the deployment blamed for a broken stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.conftest import eventually
from tests.security.conftest import ScriptedStreams, Served, failover_config

USER: Any = [{"role": "user", "content": "How does an OpenAI stream end?"}]
SAID = ["An OpenAI stream ends with the line ", "`data: [DONE]` and a blank line; then", " the client stops reading."]


def _anthropic_event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **obj}) + b"\n\n"


def _anthropic_stream() -> bytes:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "x",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 1},
    }
    out = _anthropic_event("message_start", {"message": message})
    out += _anthropic_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    for t in SAID:
        out += _anthropic_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": t}})
    out += _anthropic_event("content_block_stop", {"index": 0})
    end = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 23}}
    out += _anthropic_event("message_delta", end)
    return out + _anthropic_event("message_stop", {})


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
    obj: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x"}
    obj["choices"] = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _openai_stream(done: bytes = b"data: [DONE]\n\n", said: list[str] = SAID) -> bytes:
    out = _chunk({"role": "assistant", "content": ""})
    for t in said:
        out += _chunk({"content": t})
    out += _chunk({}, "stop")
    return out + _chunk({}, usage={"prompt_tokens": 11, "completion_tokens": 23, "total_tokens": 34}) + done


def _split_after_quote(stream: bytes) -> tuple[bytes, bytes]:
    """The stream up to the end of the event that quotes `data: [DONE]`, and the rest (sent
    once the client has read content, so that the two arrive in separate reads)."""
    cut = stream.index(b"\n\n", stream.index(b"`data: [DONE]`")) + 2
    return stream[:cut], stream[cut:]


@pytest.fixture
async def anthropic_upstreams() -> AsyncIterator[ScriptedStreams]:
    made = ScriptedStreams("/v1/messages")
    yield made
    await made.close()


@pytest.fixture
async def openai_upstreams() -> AsyncIterator[ScriptedStreams]:
    made = ScriptedStreams("/v1/chat/completions")
    yield made
    await made.close()


async def _record(proxy: Served) -> Any:
    async def last() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    return await eventually(last, "the request's record")


async def test_openai_client_reads_the_whole_answer_from_an_anthropic_upstream(
    anthropic_upstreams: ScriptedStreams, serve: Any
) -> None:
    up = await anthropic_upstreams(*_split_after_quote(_anthropic_stream()))
    proxy: Served = await serve(failover_config(up, kind="anthropic"))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    text, finish, usage = "", None, None
    stream = await client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    async for c in stream:
        usage = c.usage or usage
        for choice in c.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            if choice.delta.content:
                anthropic_upstreams.go.set()
    assert (text, finish) == ("".join(SAID), "stop")
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (11, 23)
    rec = await _record(proxy)
    assert rec.outcome == "ok" and rec.usage is not None and not rec.usage.estimated
    assert (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (11, 23)


async def test_anthropic_client_reads_the_whole_message_from_an_openai_upstream(
    openai_upstreams: ScriptedStreams, serve: Any
) -> None:
    up = await openai_upstreams(*_split_after_quote(_openai_stream()))
    proxy: Served = await serve(failover_config(up))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    async with client.messages.stream(model="m", max_tokens=100, messages=USER) as s:
        async for ev in s:
            if ev.type == "content_block_delta":
                openai_upstreams.go.set()
        final = await s.get_final_message()
    assert [b.type for b in final.content] == ["text"]
    assert final.content[0].text == "".join(SAID)  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (11, 23)
    rec = await _record(proxy)
    assert rec.outcome == "ok" and rec.usage is not None and not rec.usage.estimated


async def test_done_without_its_space_ends_the_stream_cleanly(openai_upstreams: ScriptedStreams, serve: Any) -> None:
    plain = ["Hello", " there."]
    stream = _openai_stream(done=b"data:[DONE]\n\n", said=plain)
    up = await openai_upstreams(stream[: len(stream) // 2], stream[len(stream) // 2 :])
    proxy: Served = await serve(failover_config(up))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    text = ""
    async for c in await client.chat.completions.create(model="m", messages=USER, stream=True):
        for choice in c.choices:
            text += choice.delta.content or ""
            if choice.delta.content:
                openai_upstreams.go.set()
    assert text == "Hello there."
    rec = await _record(proxy)
    assert (rec.outcome, rec.error_class) == ("ok", None)
    assert rec.usage is not None and rec.usage.completion_tokens == 23
