"""An error inside a 200 on the endpoints other than chat, classified as chat classifies it
(`test_answers_in_200_that_are_not`): a client error is the client's 4xx in its API's format
once a second deployment says the same (no deployment's health charged, no circuit opened),
a rate limit or server error fails over.

- A `/v1/responses` stream whose upstream sends `error` or `response.failed` before content
  (native Responses deployments, and chat ones serving a Responses client): every attempt
  crashed (`'Via' object has no attribute 'classify'`), 4 calls and a 502.
- A 200 JSON body that is an error on `/v1/completions`, `/v1/embeddings` and `/v1/responses`:
  a 502 after 4 calls, and the deployment's circuit opened by one client's invalid request.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from tests.test_answers_in_200_that_are_not import (
    CLIENT_ERROR_EVENT,
    Hostile,
    ServeRoutes,
    Start,
    _deployments,
    _oai,
    _proxy,
    _record,
)


def _event(obj: dict[str, Any]) -> bytes:
    return f"event: {obj['type']}\ndata: {json.dumps(obj)}\n\n".encode()


_RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-4o-mini", "output": [],
             "status": "in_progress"}  # fmt: skip
_CREATED = _event({"type": "response.created", "sequence_number": 0, "response": _RESPONSE})
_MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
_USAGE = {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}
# A native Responses stream that answers "BB".
HEALTHY = [
    _CREATED,
    _event({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": _MESSAGE}),
    _event(
        {
            "type": "response.output_text.delta",
            "sequence_number": 2,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": "BB",
            "logprobs": [],
        }
    ),
    _event(
        {
            "type": "response.completed",
            "sequence_number": 3,
            "response": {**_RESPONSE, "status": "completed", "usage": _USAGE},
        }
    ),
]


def _failed(code: str, message: str) -> list[bytes]:
    """`response.failed` after `response.created`, as OpenAI ends a stream that failed."""
    response = {**_RESPONSE, "status": "failed", "error": {"code": code, "message": message}}
    return [_CREATED, _event({"type": "response.failed", "sequence_number": 1, "response": response})]


async def _responses_text(client: openai.AsyncOpenAI) -> str:
    stream = await client.responses.create(model="m", input="hi", stream=True)
    return "".join([ev.delta async for ev in stream if ev.type == "response.output_text.delta"])


async def _healthy_circuits(proxy: Any) -> None:
    for dep in (await _deployments(proxy)).values():  # the request's fault, not theirs
        assert dep["circuit"] == "closed" and dep["failures"] == 0


async def _agreed_client_error(proxy: Any, a: Hostile, b: Hostile) -> None:
    """Each deployment asked once (they agree), the request recorded as the client's 400, and
    no deployment's health charged."""
    assert (a.calls, b.calls) == (1, 1)
    rec = await _record(proxy)
    assert rec.status == 400 and rec.error_class == "client_error"
    await _healthy_circuits(proxy)


# -- a Responses stream that fails before content -------------------------------------------------


@pytest.mark.parametrize(
    "writes",
    [
        [_event({"type": "error", "code": "invalid_request_error", "message": "bad input", "param": "input"})],
        [_event({"type": "error", "error": {"type": "invalid_request_error", "message": "bad input"}})],
        _failed("invalid_prompt", "bad input"),
    ],
    ids=["error_event", "nested_error_event", "response_failed"],
)
async def test_a_native_responses_stream_client_error_is_the_clients_400(
    start_proxy: Start, serve_routes: ServeRoutes, writes: list[bytes]
) -> None:
    a, b = Hostile(writes), Hostile(writes)
    proxy = await _proxy(start_proxy, serve_routes, a, b, path="/v1/responses")
    async with _oai(proxy) as client:
        with pytest.raises(openai.BadRequestError, match="bad input"):
            await _responses_text(client)
    await _agreed_client_error(proxy, a, b)


async def test_a_chat_deployments_stream_client_error_is_a_responses_clients_400(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    a, b = Hostile([CLIENT_ERROR_EVENT]), Hostile([CLIENT_ERROR_EVENT])
    proxy = await _proxy(start_proxy, serve_routes, a, b, kind="openai_compatible")
    async with _oai(proxy) as client:
        with pytest.raises(openai.BadRequestError, match="max_tokens must be <= 2048"):
            await _responses_text(client)
    await _agreed_client_error(proxy, a, b)


@pytest.mark.parametrize(
    ("code", "outcome"), [("rate_limit_exceeded", "rate_limited"), ("server_error", "server_error")]
)
async def test_a_native_responses_stream_that_fails_upstream_fails_over(
    start_proxy: Start, serve_routes: ServeRoutes, code: str, outcome: str
) -> None:
    a, b = Hostile(_failed(code, "try later")), Hostile(HEALTHY)
    proxy = await _proxy(start_proxy, serve_routes, a, b, path="/v1/responses")
    async with _oai(proxy) as client:
        assert await _responses_text(client) == "BB"
    assert (a.calls, b.calls) == (1, 1)
    rec = await _record(proxy)
    assert rec.status == 200 and [t.outcome for t in rec.attempts] == [outcome, "success"]


# -- a 200 JSON body that is an error ---------------------------------------------------------------

_INVALID = {"error": {"message": "prompt bad", "type": "invalid_request_error", "param": None, "code": None}}


async def _completions(client: openai.AsyncOpenAI) -> str:
    return (await client.completions.create(model="m", prompt="hi")).choices[0].text


async def _embeddings(client: openai.AsyncOpenAI) -> str:
    return str((await client.embeddings.create(model="m", input="hi")).data[0].embedding)


async def _responses(client: openai.AsyncOpenAI) -> str:
    return (await client.responses.create(model="m", input="hi")).output_text


# Per endpoint: the upstream's path, the SDK call, and a healthy answer of its own.
_ENDPOINTS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "completions": (
        "/v1/completions",
        _completions,
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "text": "BB", "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
    ),
    "embeddings": (
        "/v1/embeddings",
        _embeddings,
        {
            "object": "list",
            "model": "m",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        },
    ),
    "responses": (
        "/v1/responses",
        _responses,
        {
            **_RESPONSE,
            "status": "completed",
            "usage": _USAGE,
            "output": [
                {
                    **_MESSAGE,
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "BB", "annotations": []}],
                }
            ],
        },
    ),
}


@pytest.mark.parametrize("endpoint", list(_ENDPOINTS))
async def test_a_client_error_in_a_200_json_body_is_the_clients_400(
    start_proxy: Start, serve_routes: ServeRoutes, endpoint: str
) -> None:
    path, call, _ = _ENDPOINTS[endpoint]
    a, b = Hostile([], json_body=_INVALID), Hostile([], json_body=_INVALID)
    proxy = await _proxy(start_proxy, serve_routes, a, b, path=path)
    async with _oai(proxy) as client:
        with pytest.raises(openai.BadRequestError, match="prompt bad") as got:
            await call(client)
    assert isinstance(got.value.body, dict) and got.value.body["code"] == "upstream_client_error"  # OpenAI's format
    await _agreed_client_error(proxy, a, b)


@pytest.mark.parametrize("endpoint", list(_ENDPOINTS))
async def test_a_server_error_in_a_200_json_body_fails_over(
    start_proxy: Start, serve_routes: ServeRoutes, endpoint: str
) -> None:
    path, call, healthy = _ENDPOINTS[endpoint]
    crashed = {"error": {"message": "worker crashed", "type": "server_error", "code": 500}}
    a, b = Hostile([], json_body=crashed), Hostile([], json_body=healthy)
    proxy = await _proxy(start_proxy, serve_routes, a, b, path=path)
    async with _oai(proxy) as client:
        assert "BB" in await call(client) or endpoint == "embeddings"
    assert (a.calls, b.calls) == (1, 1)
    rec = await _record(proxy)
    assert rec.status == 200 and [t.outcome for t in rec.attempts] == ["server_error", "success"]


async def test_an_anthropic_error_in_a_200_on_native_messages_is_the_clients_400(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    err = {"type": "error", "error": {"type": "invalid_request_error", "message": "prompt bad"}}
    # `cache_control`: sent natively (the chat translation would lose it), read by `answer_object`.
    system: Any = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    a, b = Hostile([], json_body=err), Hostile([], json_body=err)
    proxy = await _proxy(start_proxy, serve_routes, a, b, kind="anthropic")
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0) as client:
        with pytest.raises(anthropic.BadRequestError, match="prompt bad") as got:
            await client.messages.create(
                model="m", max_tokens=50, system=system, messages=[{"role": "user", "content": "hi"}]
            )
    assert isinstance(got.value.body, dict) and got.value.body["type"] == "error"  # Anthropic's format
    assert (a.calls, b.calls) == (1, 1)
    await _healthy_circuits(proxy)


# -- a native Messages stream that fails before content --------------------------------------------

_ANTHROPIC_START = _event(
    {
        "type": "message_start",
        "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                    "content": [], "stop_reason": None, "usage": {"input_tokens": 3, "output_tokens": 0}},
    }
)  # fmt: skip


def _anthropic_error(kind: str, message: str) -> list[bytes]:
    """An Anthropic stream's `error` event after `message_start`, before any content."""
    return [_ANTHROPIC_START, _event({"type": "error", "error": {"type": kind, "message": message}})]


async def _native_messages_text(proxy: Any) -> str:
    # `cache_control`: sent natively (the chat translation would lose it).
    system: Any = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0) as client:
        async with client.messages.stream(
            model="m", max_tokens=50, system=system, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            return "".join([text async for text in stream.text_stream])


async def test_a_native_messages_stream_client_error_is_the_clients_400(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    """Found by a red team (session 35, redA F2): the native Messages stream's error before
    content crashed every attempt like the Responses one (`'Via' object has no attribute
    'classify'`): 4 calls and a 502 for the client's own invalid request."""
    writes = _anthropic_error("invalid_request_error", "prompt bad")
    a, b = Hostile(writes), Hostile(writes)
    proxy = await _proxy(start_proxy, serve_routes, a, b, kind="anthropic")
    with pytest.raises(anthropic.BadRequestError, match="prompt bad") as got:
        await _native_messages_text(proxy)
    assert isinstance(got.value.body, dict) and got.value.body["type"] == "error"  # Anthropic's format
    await _agreed_client_error(proxy, a, b)


async def test_a_native_messages_stream_overloaded_before_content_fails_over(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    a = Hostile(_anthropic_error("overloaded_error", "Overloaded"))
    b = Hostile(
        [
            _ANTHROPIC_START,
            _event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            _event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "BB"}}),
            _event({"type": "content_block_stop", "index": 0}),
            _event({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}),
            _event({"type": "message_stop"}),
        ]
    )
    proxy = await _proxy(start_proxy, serve_routes, a, b, kind="anthropic")
    assert await _native_messages_text(proxy) == "BB"
    assert (a.calls, b.calls) == (1, 1)
    rec = await _record(proxy)
    assert rec.status == 200 and rec.attempts[-1].outcome == "success" and rec.attempts[0].outcome != "success"


# -- a completions answer that is not one ---------------------------------------------------------

_CHAT_ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "x",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip


@pytest.mark.parametrize(
    "careless",
    [
        _CHAT_ANSWER,
        {**_ENDPOINTS["completions"][2], "choices": [{"index": 0, "text": None, "finish_reason": "stop"}]},
        {**_ENDPOINTS["completions"][2], "choices": [{"index": "0", "text": "BB", "finish_reason": "stop"}]},
    ],
    ids=["chat_completion", "null_text", "string_index"],
)
async def test_a_completions_answer_a_client_cannot_read_fails_over(
    start_proxy: Start, serve_routes: ServeRoutes, careless: dict[str, Any]
) -> None:
    """Found by a red team (session 35, redA F7): a chat server's `chat.completion` (no `text`),
    `text: null` or a string `index` reached a completions client as a 200, billed as served."""
    a, b = Hostile([], json_body=careless), Hostile([], json_body=_ENDPOINTS["completions"][2])
    proxy = await _proxy(start_proxy, serve_routes, a, b, path="/v1/completions")
    async with _oai(proxy) as client:
        assert await _completions(client) == "BB"
    assert (a.calls, b.calls) == (1, 1)
    rec = await _record(proxy)
    assert rec.status == 200 and [t.outcome for t in rec.attempts] == ["server_error", "success"]
