"""A splice after content in a translated stream (Anthropic, Bedrock upstreams) or a native
Responses stream is not charged to health.

A second `message_start` (`messageStart`) after content ends the stream with the splice's error
event, as a chat chunk of another completion does; the chat stream's splice was not charged to the
deployment's health (an honest server the check misread would have been taken out for everyone),
but the translated one was, by one failure each: the relay read only the chat check's flag. So
was a Responses upstream's second `response.created` (or an event of another response's id)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded
from tests.test_answers_in_200_that_are_not import Hostile, _anthropic_event, _deployments
from tests.test_answers_in_200_that_are_not import _proxy as _two_deployments
from tests.test_native_stream_error_classes import BR_START, HI, _bedrock_text, _openai_stream
from tests.test_native_stream_error_classes import _proxy as _native

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]

A_START = _anthropic_event(
    "message_start",
    {
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "x",
            "content": [],
            "usage": {"input_tokens": 3, "output_tokens": 0},
        }
    },
)
A_BLOCK = _anthropic_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
A_HALF = _anthropic_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "half"}})


async def _spliced_proxy(start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str) -> tuple[Proxy, str]:
    """A proxy whose model `m` streams "half", then a second answer's start; its deployment's name."""
    if kind == "bedrock":
        events = [BR_START, _bedrock_text("half"), BR_START, _bedrock_text("other")]
        return await _native(start_proxy, serve_routes, "bedrock", events), "d0"
    a = Hostile([A_START, A_BLOCK, A_HALF, A_START, A_BLOCK, A_HALF])
    return await _two_deployments(start_proxy, serve_routes, a, Hostile([]), kind="anthropic"), "d-a"


async def _not_charged(proxy: Proxy, deployment: str) -> None:
    rec = await recorded(proxy)
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_error"), rec
    health = (await _deployments(proxy))[deployment]
    assert health["failures"] == 0, f"the splice was charged to {deployment}'s health: {health}"


@pytest.mark.parametrize("kind", ["bedrock", "anthropic"])
async def test_a_splice_after_content_in_a_translated_stream_is_not_charged(
    start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str
) -> None:
    proxy, deployment = await _spliced_proxy(start_proxy, serve_routes, kind)
    text, error = await _openai_stream(proxy)
    assert text == "half"
    assert error is not None and error.code == "upstream_protocol_error" and "second answer" in error.message, error
    await _not_charged(proxy, deployment)


async def _claude_stream(proxy: Proxy) -> tuple[str, anthropic.APIStatusError | None]:
    """The text an Anthropic SDK client read on /v1/messages, and the error its stream ended with."""
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    parts: list[str] = []
    try:
        async with claude.messages.stream(model="m", max_tokens=50, messages=HI) as stream:
            async for t in stream.text_stream:
                parts.append(t)
    except anthropic.APIStatusError as e:
        return "".join(parts), e
    finally:
        await claude.close()
    return "".join(parts), None


@pytest.mark.parametrize("kind", ["bedrock", "anthropic"])
async def test_an_anthropic_client_gets_the_splice_error_and_health_is_not_charged(
    start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str
) -> None:
    proxy, deployment = await _spliced_proxy(start_proxy, serve_routes, kind)
    text, error = await _claude_stream(proxy)
    assert text == "half"
    assert error is not None and "second answer" in str(error), error
    await _not_charged(proxy, deployment)


def _r_event(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _r_response(rid: str) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": 1, "status": "in_progress", "model": "gpt-4o-mini",
        "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": None,
    }  # fmt: skip


def _r_delta(seq: int, text: str) -> bytes:
    return _r_event(
        {
            "type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
            "delta": text, "sequence_number": seq, "logprobs": [],
        }
    )  # fmt: skip


def _r_item(seq: int) -> bytes:
    item = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}
    return _r_event({"type": "response.output_item.added", "output_index": 0, "item": item, "sequence_number": seq})


RESPONSES_SPLICED = [
    _r_event({"type": "response.created", "sequence_number": 0, "response": _r_response("resp_1")}),
    _r_item(1),
    _r_delta(2, "half"),
    _r_event({"type": "response.created", "sequence_number": 0, "response": _r_response("resp_2")}),
    _r_delta(2, "other"),
]


async def test_a_splice_after_content_in_a_responses_stream_is_not_charged(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    a = Hostile(RESPONSES_SPLICED)
    proxy = await _two_deployments(start_proxy, serve_routes, a, Hostile([]), path="/v1/responses")
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        events = [ev async for ev in await client.responses.create(model="m", input="hi", stream=True)]
    finally:
        await client.close()
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "half"
    last = events[-1]  # the Responses stream's own error event, which the SDK yields
    assert last.type == "error" and last.code == "upstream_protocol_error" and "second answer" in last.message, last
    await _not_charged(proxy, "d-a")
