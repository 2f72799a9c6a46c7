"""An upstream's own error event mid-stream (Anthropic's `overloaded_error`) ends the client's
stream with exactly that one error event, in the client's API format.

The relay took the upstream's error event for content, kept reading, and at the upstream's
end of stream added its own "The upstream ended the stream early" error: two error events on
/v1/messages passed through and two error chunks on /v1/chat/completions. An upstream that
went on after its error event had that continuation spliced in after the error. On
/v1/messages translated, the upstream's error type was lost (`api_error`, not
`overloaded_error`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgeroute import sse
from tests.conftest import eventually, routes_upstream
from tests.security.conftest import Served

USER: Any = [{"role": "user", "content": "hello"}]


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + orjson.dumps(obj) + b"\n\n"


def _anthropic_delta(text: str) -> bytes:
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    return _sse(delta, "content_block_delta")


START = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
         "model": "x", "content": [], "stop_reason": None, "stop_sequence": None,
         "usage": {"input_tokens": 3, "output_tokens": 1}}}  # fmt: skip
BLOCK = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
END = (
    _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    + _sse(
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}, "message_delta"
    )
    + _sse({"type": "message_stop"}, "message_stop")
)


def _chunk(text: str) -> bytes:
    delta = {"role": "assistant", "content": text}
    return _sse({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})  # fmt: skip


class Overloaded:
    """Streams "partial", then the provider's error event; `goes_on`: then " spliced" and a normal end."""

    def __init__(self, kind: str, goes_on: bool) -> None:
        self.kind, self.goes_on = kind, goes_on

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.kind == "anthropic":
            await resp.write(_sse(START, "message_start") + _sse(BLOCK, "content_block_start"))
            await resp.write(_anthropic_delta("partial"))
            await resp.write(_sse(OVERLOADED, "error"))
            if self.goes_on:
                await resp.write(_anthropic_delta(" spliced") + END)
        else:
            await resp.write(_chunk("partial"))
            await resp.write(_sse({"error": {"message": "Overloaded", "type": "overloaded_error", "code": None}}))
            if self.goes_on:
                await resp.write(_chunk(" spliced") + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, TestServer]]:
    kind, goes_on = request.param
    handler = Overloaded(kind, goes_on).handle
    async with routes_upstream(web.post("/v1/messages", handler), web.post("/v1/chat/completions", handler)) as server:
        yield kind, server


def _config(kind: str, server: TestServer) -> dict[str, Any]:
    base = f"http://127.0.0.1:{server.port}" + ("" if kind == "anthropic" else "/v1")
    provider: dict[str, Any] = {"base_url": base, "api_key": "k", **({"kind": kind} if kind == "anthropic" else {})}
    if kind != "anthropic":
        provider["options"] = {"unsupported_params": "drop"}
    return {
        "providers": {"p": provider},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
        "models": {"m": {"deployments": ["d"]}},
    }


# (path, extra request fields): /v1/messages translated, /v1/messages passed through (top_k), chat
APIS = [("/v1/messages", {"max_tokens": 10}), ("/v1/messages", {"max_tokens": 10, "top_k": 3}),
        ("/v1/chat/completions", {})]  # fmt: skip
UPSTREAMS = [("anthropic", False), ("anthropic", True), ("openai", False), ("openai", True)]


async def _raw(proxy: Served, path: str, extra: dict[str, Any]) -> list[bytes]:
    body = {"model": "m", "messages": USER, "stream": True, **extra}
    async with aiohttp.ClientSession() as s, s.post(proxy.url + path, json=body) as r:
        assert r.status == 200
        events, rest = sse.split_events(await r.read())
    return events + ([rest] if rest.strip() else [])


@pytest.mark.parametrize("upstream", UPSTREAMS, indirect=True, ids=lambda p: f"{p[0]}{'-goes-on' * p[1]}")
@pytest.mark.parametrize(("path", "extra"), APIS, ids=["messages", "messages-passthrough", "chat"])
async def test_one_error_event_and_nothing_after_it(
    upstream: tuple[str, TestServer], serve: Any, path: str, extra: dict[str, Any]
) -> None:
    kind, server = upstream
    proxy: Served = await serve(_config(kind, server))
    events = await _raw(proxy, path, extra)
    errors = [e for e in events if b'"error"' in e]
    assert len(errors) == 1, events
    assert events[-1] == errors[0], events  # nothing spliced in after it
    assert b"Overloaded" in errors[0] and b"spliced" not in b"".join(events)

    if path == "/v1/chat/completions":
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        text: list[str] = []
        with pytest.raises(openai.APIError) as raised:
            stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
            async for chunk in stream:
                text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        assert "Overloaded" in str(raised.value)
    else:
        aclient = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
        text = []
        with pytest.raises(anthropic.APIStatusError) as araised:
            top_k = {"top_k": extra["top_k"]} if "top_k" in extra else None
            async with aclient.messages.stream(model="m", messages=USER, max_tokens=10, extra_body=top_k) as astream:
                async for event in astream:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        text.append(event.delta.text)
        # the upstream's own type, which the SDK reports (it was api_error when translated)
        assert araised.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}  # type: ignore[index]
    assert "".join(text) == "partial"

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if len(proxy.recorder.records) >= 2 else None

    rec = await eventually(recorded, "the SDK request's record")
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_error")


async def _odd_type(request: web.Request) -> web.StreamResponse:
    """ "partial", then an error event whose `type` is not a string (a careless upstream's)."""
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_chunk("partial"))
    await resp.write(_sse({"error": {"message": "Overloaded", "type": {"kind": "overloaded"}, "code": None}}))
    await resp.write_eof()
    return resp


async def test_an_error_event_of_an_odd_type_reaches_the_anthropic_sdk_as_the_upstreams(serve: Any) -> None:
    """Its `type`, unhashable, was looked up in a set of Anthropic's types: the relay's encoder
    raised, and the client got "a stream edgeroute could not read" instead of the upstream's error."""
    async with routes_upstream(web.post("/v1/chat/completions", _odd_type)) as server:
        proxy: Served = await serve(_config("openai", server))
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as raised:
            async with client.messages.stream(model="m", messages=USER, max_tokens=10) as stream:
                async for _ in stream:
                    pass
        assert raised.value.body["error"] == {"type": "api_error", "message": "Overloaded"}  # type: ignore[index]
