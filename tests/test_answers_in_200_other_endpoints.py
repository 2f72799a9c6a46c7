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
    assert (a.calls, b.calls) == (1, 1)  # each deployment asked once: they agree
    rec = await _record(proxy)
    assert rec.status == 400 and rec.error_class == "client_error"
    await _healthy_circuits(proxy)


async def test_a_chat_deployments_stream_client_error_is_a_responses_clients_400(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    a, b = Hostile([CLIENT_ERROR_EVENT]), Hostile([CLIENT_ERROR_EVENT])
    proxy = await _proxy(start_proxy, serve_routes, a, b, kind="openai_compatible")
    async with _oai(proxy) as client:
        with pytest.raises(openai.BadRequestError, match="max_tokens must be <= 2048"):
            await _responses_text(client)
    assert (a.calls, b.calls) == (1, 1)
    assert (await _record(proxy)).status == 400
    await _healthy_circuits(proxy)


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
