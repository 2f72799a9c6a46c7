"""Spend escape: an upstream stream that goes on after its end, in the same read.

A careless server (a gateway, a self-hosted one) that sends a second answer's events after the
first one's end (`response.completed`, Anthropic's `message_stop`, Gemini's `finishReason`,
Bedrock's `metadata`) in one read: the client was relayed the first answer alone (its stream
ends there: `test_careless_upstream_after_the_end`), but the translators went on reading what
followed, and the request was priced at the last usage read, so a second answer reporting 1
and 1 tokens booked a 1,000 + 1,000-token answer at 2. What the client received is what is
priced; what follows the end is not read.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.mock.bedrock import event_frame
from tests.conftest import simple_config

IN_PRICE, OUT_PRICE = 1.0, 2.0  # simple_config's prices, USD a million tokens
SENT = {"input_tokens": 1000, "output_tokens": 1000, "total_tokens": 2000}
AFTER = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
BEDROCK = {"region": "us-east-1", "aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "dummy-secret"}


class _Root:
    def __init__(self, url: str) -> None:
        self.base_url = url


def _event(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _response(rid: str, status: str, text: str | None = None, usage: Any = None) -> dict[str, Any]:
    output = []
    if text is not None:
        part = {"type": "output_text", "text": text, "annotations": []}
        output = [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": [part]}]
    return {
        "id": rid, "object": "response", "created_at": 1, "status": status, "model": "gpt-4o-mini",
        "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage,
    }  # fmt: skip


def _delta(text: str) -> dict[str, Any]:
    return {
        "type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
        "delta": text, "sequence_number": 1, "logprobs": [],
    }  # fmt: skip


def _completed(seq: int, response: dict[str, Any]) -> dict[str, Any]:
    return {"type": "response.completed", "sequence_number": seq, "response": response}


async def _answers_twice(request: web.Request) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    await out.write(  # one read: the proxy finds both answers' events in one chunk
        _event({"type": "response.created", "sequence_number": 0, "response": _response("resp_1", "in_progress")})
        + _event(_delta("hello"))
        + _event(_completed(2, _response("resp_1", "completed", "hello", SENT)))
        + _event(_delta(" and more"))
        + _event(_completed(4, _response("resp_2", "completed", "x", AFTER)))
    )  # fmt: skip
    await out.write_eof()
    return out


async def test_a_responses_stream_is_priced_at_the_end_the_client_got(serve_routes: Any, start_proxy: Any) -> None:
    up = await serve_routes(web.post("/v1/responses", _answers_twice))

    class Upstream:
        base_url = up.url + "/v1"

    proxy = await start_proxy(simple_config({"a": Upstream}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    events = [e async for e in await client.responses.create(model="m", input="hi", stream=True)]
    assert [e.type for e in events][-1] == "response.completed"
    final = events[-1].response
    assert final.id == "resp_1" and final.usage is not None and final.usage.total_tokens == 2000
    assert not any(getattr(e, "delta", None) == " and more" for e in events)
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (1000, 1000)
    assert rec.cost_usd == pytest.approx((1000 * IN_PRICE + 1000 * OUT_PRICE) / 1e6)


# The same through chat, translated from each provider's stream: the answer the client got,
# then a second one in the same read (its usage 1 and 1).
def _anthropic_answer(mid: str, tokens: int, text: str) -> bytes:
    usage = {"input_tokens": tokens, "output_tokens": 1}
    msg = {"id": mid, "type": "message", "role": "assistant", "model": "claude", "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": usage}  # fmt: skip
    return b"".join(
        _event(e)
        for e in (
            {"type": "message_start", "message": msg},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": tokens}},
            {"type": "message_stop"},
        )
    )


def _gemini_answer(tokens: int, text: str) -> bytes:
    answer = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": tokens, "candidatesTokenCount": tokens},
    }
    return b"data: " + orjson.dumps(answer) + b"\r\n\r\n"


def _bedrock_answer(tokens: int, text: str) -> bytes:
    return (
        event_frame("messageStart", {"role": "assistant"})
        + event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}})
        + event_frame("contentBlockStop", {"contentBlockIndex": 0})
        + event_frame("messageStop", {"stopReason": "end_turn"})
        + event_frame("metadata", {"usage": {"inputTokens": tokens, "outputTokens": tokens}, "metrics": {}})
    )


ANTHROPIC = _anthropic_answer("msg_1", 1000, "hello") + _anthropic_answer("msg_2", 1, " and more")
STREAMS = {
    "anthropic": (ANTHROPIC, "text/event-stream"),
    "gemini": (_gemini_answer(1000, "hello") + _gemini_answer(1, " and more"), "text/event-stream"),
    "bedrock": (_bedrock_answer(1000, "hello") + _bedrock_answer(1, " and more"), "application/vnd.amazon.eventstream"),
}  # fmt: skip


def _twice_in(kind: str) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        body, content_type = STREAMS[kind]
        out = web.StreamResponse(headers={"Content-Type": content_type})
        await out.prepare(request)
        await out.write(body)
        await out.write_eof()
        return out

    return handle


@pytest.mark.parametrize("kind", sorted(STREAMS))
async def test_a_translated_chat_stream_is_priced_at_the_end_the_client_got(
    kind: str, serve_routes: Any, start_proxy: Any
) -> None:
    up = await serve_routes(web.post("/{tail:.*}", _twice_in(kind)))
    cfg = simple_config({"a": _Root(up.url)})
    cfg["providers"]["a"] = {
        "anthropic": {"kind": "anthropic", "base_url": up.url, "api_key": "k"},
        "gemini": {"kind": "gemini", "base_url": up.url + "/v1beta", "api_key": "k"},
        "bedrock": {"kind": "bedrock", "base_url": up.url, "options": BEDROCK},
    }[kind]
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    ]  # fmt: skip
    # Without `include_usage` (the SDK's default): what is priced is the translator's usage.
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (1000, 1000)
    assert rec.cost_usd == pytest.approx((1000 * IN_PRICE + 1000 * OUT_PRICE) / 1e6)
