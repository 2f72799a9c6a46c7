"""A careless (or hostile) upstream that opens a stream event and never ends it.

The relay holds an unfinished error event whole (so that it is redacted whole), and the
translators hold any unfinished event: an upstream that wrote `event: error` / `data: {...`
and then kept sending bytes without the blank line was held in memory, without bound, until
a timeout. Now an error event still unfinished past 1 MiB (any event past 32 MiB) is the
upstream's protocol error: before any content, the attempt fails over to the next
deployment; after content, the client's stream ends with a well-formed error event in its
API's format (OpenAI or Anthropic). The held bytes (which quote our key) are never relayed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgeroute import sse
from tests.conftest import eventually, routes_upstream, start_routes
from tests.security.conftest import Served

KEY = "7c0ffee5ba11ad5e1f2a3b4c5d6e7f80"  # our provider key, quoted by the upstream's error
USER: Any = [{"role": "user", "content": "hello"}]
MIB = 1 << 20
PATIENCE_S = 6.0  # first-byte and idle timeouts: what the proxy waited before (and must not now)


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def _content(kind: str) -> bytes:
    if kind == "openai":
        delta = {"role": "assistant", "content": "partial"}
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
        return _sse(chunk)
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
             "model": "x", "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": 3, "output_tokens": 1}}}  # fmt: skip
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "partial"}}
    return _sse(start, "message_start") + _sse(block, "content_block_start") + _sse(delta, "content_block_delta")


def _done(kind: str) -> bytes:
    if kind == "openai":
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x",
                 "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}  # fmt: skip
        return _sse(chunk) + b"data: [DONE]\n\n"
    stop = {"type": "content_block_stop", "index": 0}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": 1}}  # fmt: skip
    return (
        _sse(stop, "content_block_stop") + _sse(delta, "message_delta") + _sse({"type": "message_stop"}, "message_stop")
    )


def _opening(kind: str, error: bool) -> bytes:
    """The start of an event the upstream never ends."""
    if not error:
        return b"event: content_block_delta\ndata: {" if kind == "anthropic" else b"data: {"
    msg = f"Incorrect API key provided: {KEY}, and then: "
    if kind == "openai":
        return b'data: {"error": {"type": "server_error", "message": "' + msg.encode()
    return b'event: error\ndata: {"type": "error", "error": {"type": "api_error", "message": "' + msg.encode()


@dataclass
class Unending:
    """Answers with `content` (maybe none), then opens an event (`opening`) and sends filler
    bytes without ever ending it, up to `total`, then holds the connection open. `good`: a
    well-behaved stream instead."""

    kind: str = "openai"
    content: bool = True
    error: bool = True
    total: int = 4 * MIB
    good: bool = False
    sent: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.good:
            await resp.write(_content(self.kind) + _done(self.kind))
            return resp
        first = (_content(self.kind) if self.content else b"") + _opening(self.kind, self.error)
        await resp.write(first)
        try:
            while self.sent < self.total:
                await resp.write(b"y" * 65536)
                self.sent += 65536
            async with asyncio.timeout(30):
                await self.stop.wait()  # a stalled upstream: the connection stays open
        except (ConnectionError, TimeoutError):
            pass
        return resp

    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}" + ("/v1" if self.kind == "openai" else "")


@pytest.fixture
async def upstreams() -> AsyncIterator[list[Unending]]:
    made: list[Unending] = []
    servers: list[TestServer] = []
    yield made
    for up in made:
        up.stop.set()
        assert up.server is not None
        servers.append(up.server)
    for s in servers:
        await s.close()


async def _start(made: list[Unending], up: Unending) -> Unending:
    up.server = await start_routes(web.post("/v1/chat/completions", up.handle), web.post("/v1/messages", up.handle))
    made.append(up)
    return up


def _config(*ups: Unending) -> dict[str, Any]:
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    providers = {
        f"p{i}": {
            "base_url": u.url(),
            "api_key": KEY,
            "timeouts": {"first_byte": PATIENCE_S, "idle": PATIENCE_S},
            **({"kind": "anthropic"} if u.kind == "anthropic" else {}),
        }
        for i, u in enumerate(ups)
    }
    return {
        "providers": providers,
        "deployments": {f"d{i}": {"provider": f"p{i}", "model": "x", "price": price} for i in range(len(ups))},
        "models": {"m": {"deployments": [f"d{i}" for i in range(len(ups))], "max_attempts": len(ups)}},
        "retry": {"base_ms": 1, "max_ms": 2},
    }


async def _chat(proxy: Served) -> tuple[str, str]:
    """(the text the OpenAI SDK gave the caller, the error it raised)."""
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    text, error = [], ""
    try:
        stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
        async for chunk in stream:
            text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    except openai.APIError as e:
        error = f"{e} {e.body!r}"
    finally:
        await client.close()
    return "".join(text), error


async def _messages(proxy: Served) -> tuple[str, str]:
    """(the text the Anthropic SDK gave the caller, the error it raised)."""
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=60)
    text, error = [], ""
    try:
        async with client.messages.stream(model="m", max_tokens=10, messages=USER) as stream:
            async for event in stream:
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    text.append(event.delta.text)
    except anthropic.APIError as e:
        error = f"{e} {e.body!r}"
    finally:
        await client.close()
    return "".join(text), error


@pytest.mark.parametrize(
    ("kind", "api"), [("openai", "chat"), ("anthropic", "chat"), ("anthropic", "messages"), ("openai", "messages")]
)
async def test_an_error_event_never_ended_after_content_ends_the_stream_with_an_error(
    upstreams: list[Unending], serve: Any, kind: str, api: str
) -> None:
    up = await _start(upstreams, Unending(kind=kind))
    proxy: Served = await serve(_config(up))
    started = time.monotonic()
    text, error = await (_chat(proxy) if api == "chat" else _messages(proxy))
    elapsed = time.monotonic() - started
    assert text == "partial"  # what came before the unending event did arrive
    # The stream ended at the bound with the API's own error, not at a timeout, and without
    # the held bytes (which quote our key).
    assert "error event still unfinished past 1 MiB" in error, error
    assert KEY not in error and "yyyy" not in error
    assert elapsed < PATIENCE_S, f"the stream ended after {elapsed:.1f} s: a timeout, not the bound"

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")
    assert rec.error_class == "upstream_protocol_error"  # (its outcome: client_gone if the SDK hung up first)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_an_error_event_never_ended_before_content_fails_over(
    upstreams: list[Unending], serve: Any, kind: str
) -> None:
    bad = await _start(upstreams, Unending(kind=kind, content=False))
    good = await _start(upstreams, Unending(kind=kind, good=True))
    proxy: Served = await serve(_config(bad, good))
    started = time.monotonic()
    text, error = await _chat(proxy)
    elapsed = time.monotonic() - started
    assert (text, error) == ("partial", "")  # the second deployment's whole answer, nothing of the first

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    first = (await eventually(recorded, "the request's record")).attempts[0]
    assert first.outcome == "server_error" and "error event still unfinished past 1 MiB" in (first.error or "")
    assert elapsed < PATIENCE_S, f"failed over after {elapsed:.1f} s: a timeout, not the bound"


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_any_event_never_ended_is_bounded_too(
    upstreams: list[Unending], serve: Any, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """An event that is no error is bounded by the event bound (32 MiB; 2 MiB here): a
    translator held it to the idle timeout, however large; a chat stream relayed as it is
    sent it on in pieces up to the answer's bound (128 MiB), as one line."""
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 2 * MIB)
    up = await _start(upstreams, Unending(kind=kind, error=False, total=64 * MIB))
    proxy: Served = await serve(_config(up))
    text, error = await _chat(proxy)
    assert text == "partial" and "stream event still unfinished past 2 MiB" in error, error
    assert up.sent < up.total  # the proxy stopped reading at the bound


async def test_a_megabyte_of_events_without_content_is_relayed_not_held(upstreams: list[Unending], serve: Any) -> None:
    """Events before the first content are held (an error among them fails over): a stream
    that sends a megabyte of them with nothing a user would see (a long reasoning phase, or
    keep-alives) is relayed from there. It was held, however much came, until content or the
    first-byte timeout."""
    go = asyncio.Event()  # set by the client once it has read something: the upstream then answers
    waited: list[bool] = []  # whether the upstream heard from the client before its patience ran out

    async def reasoning(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        delta = {"reasoning_content": "think " * 1000}
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
        for _ in range(MIB // 6000 + 10):
            await resp.write(_sse(chunk))
        try:
            async with asyncio.timeout(PATIENCE_S - 1):
                await go.wait()
            waited.append(True)
        except TimeoutError:  # the client saw nothing (held): answer anyway, the test reports it
            waited.append(False)
        await resp.write(_content("openai") + _done("openai"))
        return resp

    async with routes_upstream(web.post("/v1/chat/completions", reasoning)) as server:
        proxy: Served = await serve(_config(Unending(server=server)))
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        text = []
        async for chunk in await client.chat.completions.create(model="m", messages=USER, stream=True):
            go.set()
            text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        await client.close()
    assert waited == [True], "the client read nothing before the upstream's content: the events were held"
    assert "".join(text) == "partial"
