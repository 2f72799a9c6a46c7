"""A 200 that is not an answer: an error sent inside it, or a stream with nothing in it.

- A client error inside a 200 (a stream's `{"error": {"code": 400}}` as vLLM/TGI/LiteLLM-style
  servers send it, an Anthropic `error` event of type `invalid_request_error`, a 200 JSON body
  that is an error) is the client's 400 with the upstream's message once a second deployment
  says the same (or none is left), never counted against their health; one another deployment
  answers was the first one's failure (vLLM labels its own crashes `"code": 400`: a sick
  replica answered half the traffic with 400s, never ejected). A server error inside a 200
  still fails over.
- A stream that ends (`[DONE]`) before any content or finish, and a JSON answer with no choice
  holding anything, are the deployment's failure: failed over, the client having seen nothing.
  An empty answer that says it finished (`finish_reason: "stop"` with "") is an answer.
- A 200 stream that breaks before content is a server error (not a connection that failed),
  priced by the usage it carried.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes, eventually

Writes = list[bytes]


def _chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, int] | None = None
) -> bytes:
    obj: dict[str, Any] = {"id": "c-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    obj["choices"] = (
        [] if delta is None and finish is None else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    )
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
ROLE = _chunk({"role": "assistant", "content": ""})
HEALTHY = [_chunk({"role": "assistant", "content": "BB"}), _chunk({}, "stop"), DONE]
CLIENT_ERROR_EVENT = (
    b'data: {"error": {"message": "Input validation error: max_tokens must be <= 2048",'
    b' "type": "invalid_request_error", "code": 400}}\n\n'
)


def _anthropic_event(name: str, obj: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **obj})}\n\n".encode()


class Hostile:
    """An upstream that answers each request with 200 and `writes` (then, with `abort`, breaks the connection)."""

    def __init__(self, writes: Writes, abort: bool = False, json_body: dict[str, Any] | None = None) -> None:
        self.writes = writes
        self.abort = abort
        self.json_body = json_body
        self.calls = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        await request.read()
        if self.json_body is not None:
            return web.json_response(self.json_body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for w in self.writes:
            await resp.write(w)
        if self.abort:
            assert request.transport is not None
            request.transport.abort()
        return resp


Start = Callable[[dict[str, Any]], Awaitable[Proxy]]


async def _proxy(
    start_proxy: Start, serve_routes: ServeRoutes, a: Hostile, b: Hostile, kind: str = "openai", path: str = ""
) -> Proxy:
    """Model `m` on `a`, falling back to `b`."""
    providers, deployments = {}, {}
    for name, up in (("a", a), ("b", b)):
        route = path or ("/v1/messages" if kind == "anthropic" else "/v1/chat/completions")
        server = await serve_routes(web.post(route, up.handle))
        providers[name] = {
            "kind": kind,
            "api_key": f"key-{name}",
            "base_url": server.url + ("" if kind == "anthropic" else "/v1"),
        }
        deployments[f"d-{name}"] = {
            "provider": name,
            "model": "claude-sonnet-4-5" if kind == "anthropic" else "gpt-4o-mini",
            "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
        }
    cfg = {
        "providers": providers,
        "deployments": deployments,
        "models": {
            "m": {"deployments": ["d-a"], "fallbacks": ["m-b"], "max_attempts": 4},
            "m-b": {"deployments": ["d-b"]},
        },
        "retry": {"base_ms": 1, "max_ms": 5, "max_retry_after_s": 0},
    }
    return await start_proxy(cfg)


def _oai(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)


async def _record(proxy: Proxy, n: int = 1) -> Any:
    async def probe() -> Any:
        return proxy.recorder.records[n - 1] if len(proxy.recorder.records) >= n else None

    return await eventually(probe, "the request's record")


async def _deployments(proxy: Proxy) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
        return {d["name"]: d for d in (await r.json())["deployments"]}


async def _stream_text(client: openai.AsyncOpenAI) -> str:
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


# -- a client error inside a 200 --------------------------------------------------------------


async def test_a_client_error_event_in_a_stream_is_the_clients_400(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    a, b = Hostile([CLIENT_ERROR_EVENT]), Hostile([CLIENT_ERROR_EVENT])
    proxy = await _proxy(start_proxy, serve_routes, a, b)
    async with _oai(proxy) as client:
        for _ in range(6):
            with pytest.raises(openai.BadRequestError, match="max_tokens must be <= 2048"):
                await _stream_text(client)
    assert (a.calls, b.calls) == (6, 6)  # each deployment asked once a request: they agree
    rec = await _record(proxy, 6)
    assert rec.status == 400 and [t.outcome for t in rec.attempts] == ["server_error", "server_error"]
    assert rec.error_class == "client_error"  # the client's error: no poison alert counts it
    for dep in (await _deployments(proxy)).values():  # the request's fault, not theirs
        assert dep["circuit"] == "closed" and dep["failures"] == 0


async def test_a_client_error_in_a_200_json_body_is_the_clients_400(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    err = {"error": {"message": "Input validation error: max_tokens must be <= 2048", "type": "invalid_request_error",
                     "code": 400}}  # fmt: skip
    a, b = Hostile([], json_body=err), Hostile([], json_body=err)
    proxy = await _proxy(start_proxy, serve_routes, a, b)
    async with _oai(proxy) as client:
        with pytest.raises(openai.BadRequestError, match="max_tokens must be <= 2048"):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert (a.calls, b.calls) == (1, 1)


async def test_an_anthropic_invalid_request_error_event_is_the_clients_400(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    usage = {"input_tokens": 10, "output_tokens": 1}
    msg: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                           "content": [], "stop_reason": None, "usage": usage}  # fmt: skip
    writes = [
        _anthropic_event("message_start", {"message": msg}),
        _anthropic_event("error", {"error": {"type": "invalid_request_error", "message": "tools.0: name is invalid"}}),
    ]
    a, b = Hostile(writes), Hostile(writes)
    proxy = await _proxy(start_proxy, serve_routes, a, b, kind="anthropic")
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0) as client:
        with pytest.raises(anthropic.BadRequestError, match="name is invalid"):
            async with client.messages.stream(
                model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                await stream.get_final_message()
    assert (a.calls, b.calls) == (1, 1)


async def test_a_replica_that_calls_its_own_crash_a_400_is_failed_over_and_charged(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    """vLLM reports any exception in a stream as `{"type": "BadRequestError", "code": 400}`: a
    sick replica's CUDA error was the client's 400, half the traffic failed and it was never ejected."""
    crash = {"error": {"message": "CUDA error: an illegal memory access", "type": "BadRequestError", "code": 400}}
    a = Hostile([b"data: " + json.dumps(crash).encode() + b"\n\n"])
    proxy = await _proxy(start_proxy, serve_routes, a, Hostile(HEALTHY))
    async with _oai(proxy) as client:
        assert await _stream_text(client) == "BB"
    rec = await _record(proxy)
    assert rec.status == 200 and [t.outcome for t in rec.attempts] == ["server_error", "success"]
    deployments = await _deployments(proxy)
    assert deployments["d-a"]["failures"] >= 1  # the replica's failure, counted against it


async def test_a_server_error_event_in_a_stream_still_fails_over(start_proxy: Start, serve_routes: ServeRoutes) -> None:
    a = Hostile([b'data: {"error": {"message": "worker crashed", "type": "server_error", "code": 500}}\n\n'])
    proxy = await _proxy(start_proxy, serve_routes, a, Hostile(HEALTHY))
    async with _oai(proxy) as client:
        assert await _stream_text(client) == "BB"
    rec = await _record(proxy)
    assert [t.outcome for t in rec.attempts] == ["server_error", "success"]


# -- a 200 with nothing in it ---------------------------------------------------------------


@pytest.mark.parametrize(
    "writes",
    [[DONE], [ROLE, DONE], [ROLE, _chunk(usage=USAGE), DONE]],
    ids=["done_only", "role_then_done", "role_usage_done"],
)
async def test_a_stream_ended_before_any_content_fails_over(
    start_proxy: Start, serve_routes: ServeRoutes, writes: Writes
) -> None:
    a, b = Hostile(writes), Hostile(HEALTHY)
    proxy = await _proxy(start_proxy, serve_routes, a, b)
    async with _oai(proxy) as client:
        assert await _stream_text(client) == "BB"
    assert a.calls == 1 and b.calls == 1
    rec = await _record(proxy)
    assert rec.deployment == "d-b"
    assert (rec.attempts[0].outcome, rec.attempts[0].error) == (
        "server_error",
        "upstream stream ended before any content",
    )


async def test_an_empty_finished_stream_is_an_answer(start_proxy: Start, serve_routes: ServeRoutes) -> None:
    a, b = Hostile([ROLE, _chunk({}, "stop"), DONE]), Hostile(HEALTHY)
    proxy = await _proxy(start_proxy, serve_routes, a, b)
    async with _oai(proxy) as client:
        assert await _stream_text(client) == ""
    assert b.calls == 0


@pytest.mark.parametrize(
    "choices",
    [[], [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": None}]],
    ids=["no_choices", "empty_unfinished_choice"],
)
async def test_a_json_answer_with_nothing_in_it_fails_over(
    start_proxy: Start, serve_routes: ServeRoutes, choices: list[dict[str, Any]]
) -> None:
    empty = {"id": "c-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini", "choices": choices,
             "usage": USAGE}  # fmt: skip
    whole = {
        **empty,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "BB"}, "finish_reason": "stop"}],
    }
    a, b = Hostile([], json_body=empty), Hostile([], json_body=whole)
    proxy = await _proxy(start_proxy, serve_routes, a, b)
    async with _oai(proxy) as client:
        got = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert got.choices[0].message.content == "BB"
    assert b.calls == 1


async def test_a_legacy_completions_stream_of_done_only_fails_over(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    choice = {"index": 0, "text": "BB", "finish_reason": "stop", "logprobs": None}
    event = {"id": "cmpl-b", "object": "text_completion", "created": 1, "model": "x", "choices": [choice]}
    text = b"data: " + json.dumps(event).encode() + b"\n\n"
    a, b = Hostile([DONE]), Hostile([text, DONE])
    proxy = await _proxy(start_proxy, serve_routes, a, b, path="/v1/completions")
    async with _oai(proxy) as client:
        stream = await client.completions.create(model="m", prompt="hi", stream=True)
        assert "".join([c.choices[0].text async for c in stream if c.choices]) == "BB"
    assert a.calls == 1 and b.calls == 1


# -- a 200 stream broken before content --------------------------------------------------------


async def test_a_stream_broken_before_content_is_a_server_error_priced_by_its_usage(
    start_proxy: Start, serve_routes: ServeRoutes
) -> None:
    a, b = Hostile([ROLE, _chunk(usage=USAGE)], abort=True), Hostile(HEALTHY)
    proxy = await _proxy(start_proxy, serve_routes, a, b)
    async with _oai(proxy) as client:
        assert await _stream_text(client) == "BB"
    first = (await _record(proxy)).attempts[0]
    assert (first.outcome, first.status) == ("server_error", 200)
    assert first.usage is not None and (first.usage.prompt_tokens, first.usage.completion_tokens) == (10, 5)
