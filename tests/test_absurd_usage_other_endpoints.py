"""A count no answer has (1e15 output tokens, a negative input) in an upstream's usage, on the
endpoints other than chat: the client sees sound counts (the total repaired, else the count
the request is charged at, or none on a stream, as chat does), never the upstream's garbage
(apps bill their users from `usage`); and a Responses stream whose chat upstream reported no
usage is recorded as estimated (edgeroute's own count was recorded as the upstream's)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai

from tests.test_answers_in_200_other_endpoints import _MESSAGE, _RESPONSE, _event
from tests.test_answers_in_200_that_are_not import DONE, Hostile, ServeRoutes, Start, _chunk, _oai, _proxy, _record

HUGE = 10**15
SOUND = 1 << 40  # `sse.MAX_COUNT`


def _sound(*counts: int | None) -> bool:
    return all(type(c) is int and 0 <= c < SOUND for c in counts)


async def test_completions_json_usage_past_any_answer_is_the_charged_count(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    usage = {"prompt_tokens": 2, "completion_tokens": HUGE, "total_tokens": HUGE + 2}
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "x", "usage": usage,
              "choices": [{"index": 0, "text": "hi there", "finish_reason": "stop", "logprobs": None}]}  # fmt: skip
    proxy = await _proxy(start_proxy, serve_routes, Hostile([], json_body=answer), Hostile([]), path="/v1/completions")
    async with _oai(proxy) as client:
        got = await client.completions.create(model="m", prompt="hi")
    rec = await _record(proxy)
    assert got.usage is not None and rec.usage is not None and rec.usage.estimated
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        rec.usage.prompt_tokens,
        rec.usage.completion_tokens,
    )
    assert _sound(got.usage.completion_tokens, got.usage.total_tokens)


async def test_completions_json_absurd_total_is_repaired(start_proxy: Start, serve_routes: ServeRoutes) -> None:
    usage = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": -1}
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "x", "usage": usage,
              "choices": [{"index": 0, "text": "hi there", "finish_reason": "stop", "logprobs": None}]}  # fmt: skip
    proxy = await _proxy(start_proxy, serve_routes, Hostile([], json_body=answer), Hostile([]), path="/v1/completions")
    async with _oai(proxy) as client:
        got = await client.completions.create(model="m", prompt="hi")
    assert got.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (2, 3, 5)


_ABSURD = {"input_tokens": -3, "output_tokens": HUGE, "total_tokens": HUGE}
_DONE_MESSAGE = {
    **_MESSAGE,
    "status": "completed",
    "content": [{"type": "output_text", "text": "hi", "annotations": []}],
}


async def test_native_responses_json_usage_past_any_answer_is_the_charged_count(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    answer = {**_RESPONSE, "status": "completed", "output": [_DONE_MESSAGE], "usage": _ABSURD}
    proxy = await _proxy(start_proxy, serve_routes, Hostile([], json_body=answer), Hostile([]), path="/v1/responses")
    async with _oai(proxy) as client:
        got = await client.responses.create(model="m", input="hi")
    rec = await _record(proxy)
    assert got.usage is not None and rec.usage is not None and rec.usage.estimated
    assert (got.usage.input_tokens, got.usage.output_tokens) == (rec.usage.prompt_tokens, rec.usage.completion_tokens)
    assert _sound(got.usage.input_tokens, got.usage.output_tokens, got.usage.total_tokens)


async def _final_usage(client: openai.AsyncOpenAI) -> Any:
    stream = await client.responses.create(model="m", input="hi", stream=True)
    events = [ev async for ev in stream]
    assert events[-1].type == "response.completed"
    return events[-1].response.usage


async def test_native_responses_stream_usage_past_any_answer_is_not_relayed(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    delta = {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1", "output_index": 0,
             "content_index": 0, "delta": "hi", "logprobs": []}  # fmt: skip
    done = {"type": "response.completed", "sequence_number": 2,
            "response": {**_RESPONSE, "status": "completed", "output": [_DONE_MESSAGE], "usage": _ABSURD}}  # fmt: skip
    writes = [_event({"type": "response.created", "sequence_number": 0, "response": _RESPONSE}), _event(delta),
              _event(done)]  # fmt: skip
    proxy = await _proxy(start_proxy, serve_routes, Hostile(writes), Hostile([]), path="/v1/responses")
    async with _oai(proxy) as client:
        usage = await _final_usage(client)
    assert usage is None  # as a chat stream's: none rather than garbage
    rec = await _record(proxy)
    assert rec.usage is not None and rec.usage.estimated and _sound(rec.usage.completion_tokens)


def _chat_stream(usage: dict[str, Any] | None) -> list[bytes]:
    writes = [_chunk({"role": "assistant", "content": "hi there"}), _chunk({}, "stop")]
    if usage is not None:
        writes.append(_chunk(usage=usage))
    return [*writes, DONE]


async def test_a_chat_deployments_responses_stream_with_absurd_usage_shows_the_count(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    absurd = {"prompt_tokens": 3, "completion_tokens": HUGE, "total_tokens": HUGE + 3}
    up = Hostile(_chat_stream(absurd))
    proxy = await _proxy(start_proxy, serve_routes, up, Hostile([]), kind="openai_compatible")
    async with _oai(proxy) as client:
        usage = await _final_usage(client)
    rec = await _record(proxy)
    assert rec.usage is not None and rec.usage.estimated
    assert (usage.input_tokens, usage.output_tokens) == (rec.usage.prompt_tokens, rec.usage.completion_tokens)
    assert _sound(usage.output_tokens, usage.total_tokens)


async def test_a_chat_deployments_responses_stream_without_usage_is_recorded_estimated(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, Hostile(_chat_stream(None)), Hostile([]), kind="openai_compatible")
    async with _oai(proxy) as client:
        usage = await _final_usage(client)
    rec = await _record(proxy)
    assert rec.usage is not None and rec.usage.estimated  # edgeroute's count, not the upstream's word
    assert (usage.input_tokens, usage.output_tokens) == (rec.usage.prompt_tokens, rec.usage.completion_tokens)
    assert json.dumps(usage.model_dump())  # a usage the SDK reads


# -- native /v1/messages (an Anthropic deployment's answer relayed as it came) ----------------------

_CACHED_SYSTEM: Any = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]  # sent natively


def _anthropic_answer(usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "hi there"}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": usage}  # fmt: skip


async def test_native_messages_json_usage_past_any_answer_is_the_charged_count(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    """Found by a red team (session 35, redA F5): a native Messages answer's usage was relayed
    as it came, `output_tokens: 1e15` and a negative cache read included."""
    usage = {"input_tokens": 4, "output_tokens": HUGE, "cache_read_input_tokens": -7}
    a = Hostile([], json_body=_anthropic_answer(usage))
    proxy = await _proxy(start_proxy, serve_routes, a, Hostile([]), kind="anthropic")
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0) as client:
        got = await client.messages.create(
            model="m", max_tokens=50, system=_CACHED_SYSTEM, messages=[{"role": "user", "content": "hi"}]
        )
    rec = await _record(proxy)
    assert rec.usage is not None and rec.usage.estimated
    assert got.usage.output_tokens == rec.usage.completion_tokens
    assert _sound(got.usage.input_tokens, got.usage.cache_read_input_tokens)


async def test_native_messages_stream_usage_past_any_answer_is_not_relayed(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    start = {"type": "message_start", "message": {**_anthropic_answer({"input_tokens": -1, "output_tokens": 1}),
                                                  "content": [], "stop_reason": None}}  # fmt: skip
    events = [
        start,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi there"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": HUGE}},
        {"type": "message_stop"},
    ]
    a = Hostile([_event(e) for e in events])
    proxy = await _proxy(start_proxy, serve_routes, a, Hostile([]), kind="anthropic")
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0) as client:
        async with client.messages.stream(
            model="m", max_tokens=50, system=_CACHED_SYSTEM, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            final = await stream.get_final_message()
    assert [b.text for b in final.content if b.type == "text"] == ["hi there"]
    assert _sound(final.usage.input_tokens, final.usage.output_tokens)
    rec = await _record(proxy)
    assert rec.usage is not None and rec.usage.estimated and _sound(rec.usage.completion_tokens)
