"""A careless (or hostile) upstream that sends more than any answer needs: an error body that
never ends, a response head that never ends, a stream that never stops.

Each was read in full (until a timeout: the first-byte timeout for an error body or a head,
the total timeout for a stream) into the proxy's memory. Each is now bounded, and past the
bound it is the upstream's failure with a message that says so: before an answer was
committed the request fails over; a stream already relayed ends with an error event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.dispatch import attempt
from tests.conftest import ServeRoutes, eventually
from tests.security.conftest import Served, titan_upstream

KEY = "7c0ffee5ba11ad5e1f2a3b4c5d6e7f80"  # our provider key: an upstream may quote it
USER: Any = [{"role": "user", "content": "hello"}]
MIB = 1 << 20
PATIENCE_S = 6.0  # first-byte and idle timeouts: what the proxy waited before (and must not now)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def good(request: web.Request) -> web.StreamResponse:
    """A well-behaved upstream: "fine", streamed or not."""
    body = await request.json()
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    if not body.get("stream"):
        message = {"role": "assistant", "content": "fine"}
        return web.json_response({"id": "c1", "object": "chat.completion", "created": 0, "model": "x",
                                  "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                                  "usage": usage})  # fmt: skip
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_chunk({"role": "assistant", "content": "fine"}) + _chunk({}, "stop") + b"data: [DONE]\n\n")
    return resp


class Flood:
    """Sends `first`, then `piece` over and over up to `total` bytes, then holds the connection
    open until the test ends; counts what it could send."""

    def __init__(self, status: int, first: bytes, piece: bytes, total: int = 64 * MIB) -> None:
        self.status, self.first, self.piece, self.total = status, first, piece, total
        self.sent = 0
        self.stop = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        ctype = "text/event-stream" if self.status == 200 else "application/json"
        resp = web.StreamResponse(status=self.status, headers={"Content-Type": ctype})
        await resp.prepare(request)
        try:
            await resp.write(self.first)
            while self.sent < self.total:
                await resp.write(self.piece)
                self.sent += len(self.piece)
            async with asyncio.timeout(30):
                await self.stop.wait()
        except (ConnectionError, TimeoutError):
            pass
        return resp


@pytest.fixture
async def upstream(serve_routes: ServeRoutes) -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:

    async def start(handle: Handler) -> str:
        return (await serve_routes(web.post("/v1/chat/completions", handle))).url + "/v1"

    yield start


def _config(*urls: str) -> dict[str, Any]:
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    timeouts = {"first_byte": PATIENCE_S, "idle": PATIENCE_S}
    return {
        "providers": {f"p{i}": {"base_url": u, "api_key": KEY, "timeouts": timeouts} for i, u in enumerate(urls)},
        "deployments": {f"d{i}": {"provider": f"p{i}", "model": "x", "price": price} for i in range(len(urls))},
        "models": {"m": {"deployments": [f"d{i}" for i in range(len(urls))], "max_attempts": len(urls)}},
        "retry": {"base_ms": 1, "max_ms": 2},
    }


async def _record(proxy: Served) -> Any:
    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    return await eventually(recorded, "the request's record")


def _client(proxy: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_server_error_whose_body_never_ends_fails_over_at_the_bound(
    upstream: Callable[[Handler], Awaitable[str]], serve: Any, stream: bool
) -> None:
    flood = Flood(500, b'{"error": {"message": "overloaded ', b"x" * 65536)
    proxy: Served = await serve(_config(await upstream(flood.handle), await upstream(good)))
    client = _client(proxy)
    started = time.monotonic()
    try:
        if stream:
            chunks = await client.chat.completions.create(model="m", messages=USER, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        else:
            answer = await client.chat.completions.create(model="m", messages=USER)
            text = answer.choices[0].message.content or ""
    finally:
        flood.stop.set()
        await client.close()
    elapsed = time.monotonic() - started
    assert text == "fine"  # the next deployment's answer
    first = (await _record(proxy)).attempts[0]
    assert (
        first.outcome == "server_error" and first.error == "the upstream's error answer (HTTP 500) is larger than 1 MiB"
    )
    assert elapsed < PATIENCE_S, f"failed over after {elapsed:.1f} s: a timeout, not the bound"
    assert flood.sent < flood.total  # the proxy stopped reading


async def test_a_client_error_whose_body_never_ends_is_answered_at_the_bound(
    upstream: Callable[[Handler], Awaitable[str]], serve: Any
) -> None:
    flood = Flood(400, b'{"error": {"message": "Incorrect API key provided: ' + KEY.encode() + b" ", b"y" * 65536)
    proxy: Served = await serve(_config(await upstream(flood.handle)))
    client = _client(proxy)
    try:
        with pytest.raises(openai.BadRequestError) as got:
            await client.chat.completions.create(model="m", messages=USER)
    finally:
        flood.stop.set()
        await client.close()
    assert "the upstream's error answer (HTTP 400) is larger than 1 MiB" in str(got.value)
    assert KEY not in str(got.value.body) and "yyyy" not in str(got.value.body)


@pytest.mark.parametrize("shape", ["headers", "one-header-line"])
async def test_a_response_head_that_never_ends_fails_over_at_the_bound(
    upstream: Callable[[Handler], Awaitable[str]], serve: Any, shape: str
) -> None:
    """An upstream that answers a status line and then headers without end (many, or one
    endless line): the parser held them all until the first-byte timeout."""
    sent = 0
    stop = asyncio.Event()

    async def endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Junk: ")
            piece = b"y" * 1000 + (b"\r\nX-Junk: " if shape == "headers" else b"")
            while sent < 64 * MIB:
                writer.write(piece)
                sent += len(piece)
                await writer.drain()
            async with asyncio.timeout(30):
                await stop.wait()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    raw = await asyncio.start_server(endless_head, "127.0.0.1", 0)
    port = raw.sockets[0].getsockname()[1]
    proxy: Served = await serve(_config(f"http://127.0.0.1:{port}/v1", await upstream(good)))
    client = _client(proxy)
    started = time.monotonic()
    try:
        answer = await client.chat.completions.create(model="m", messages=USER)
    finally:
        stop.set()
        await client.close()
        raw.close()
    elapsed = time.monotonic() - started
    assert answer.choices[0].message.content == "fine"  # the next deployment's answer
    first = (await _record(proxy)).attempts[0]
    assert first.outcome == "server_error" and first.error == "the upstream sent a response head larger than 64 KiB"
    assert elapsed < PATIENCE_S, f"failed over after {elapsed:.1f} s: a timeout, not the bound"
    assert sent < 64 * MIB  # the proxy stopped reading


async def test_a_stream_that_never_stops_ends_at_the_answer_bound(
    upstream: Callable[[Handler], Awaitable[str]], serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's text is kept (to count it when it reports no usage) as a non-streamed answer
    is read: up to `MAX_ANSWER_BYTES` (128 MiB; 2 MiB here). A stream of well-formed content
    that never stopped was kept whole until the total timeout."""
    monkeypatch.setattr(attempt, "MAX_ANSWER_BYTES", 2 * MIB)
    flood = Flood(200, _chunk({"role": "assistant", "content": ""}), _chunk({"content": "z" * 65536}), 16 * MIB)
    proxy: Served = await serve(_config(await upstream(flood.handle)))
    client = _client(proxy)
    got: list[str] = []
    try:
        with pytest.raises(openai.APIError) as raised:
            async for c in await client.chat.completions.create(model="m", messages=USER, stream=True):
                got.append(c.choices[0].delta.content or "" if c.choices else "")
    finally:
        flood.stop.set()
        await client.close()
    assert raised.value.message == "The upstream's answer passed 2 MiB; it is incomplete."
    assert 2 * MIB - 65536 < len("".join(got)) <= 2 * MIB  # relayed up to the bound, then the error
    rec = await _record(proxy)
    assert rec.error_class == "answer_too_large" and rec.usage is not None and rec.usage.completion_tokens > 0
    assert flood.sent < flood.total  # the proxy stopped reading


async def test_embeddings_split_over_calls_are_bounded_together(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch for Titan (one text per call) is answered as one list: its calls' answers are
    held until the last one, so they are bounded together as one answer is (128 MiB; 1 MiB
    here). Each call's answer was bounded alone, so a batch of 2,048 could hold 2,048 times it."""
    monkeypatch.setattr(attempt, "MAX_ANSWER_BYTES", 1 * MIB)
    calls = 0

    async def titan(request: web.Request) -> web.StreamResponse:  # a careless Titan: huge vectors
        nonlocal calls
        await request.read()
        calls += 1
        return web.json_response({"embedding": [0.125] * 20_000, "inputTextTokenCount": 1})

    server, cfg = await titan_upstream(titan, max_attempts=1)
    proxy: Served = await serve(cfg)
    client = _client(proxy)
    try:
        with pytest.raises(openai.APIStatusError) as got:
            await client.embeddings.create(model="embed", input=[f"text {i}" for i in range(64)])
    finally:
        await client.close()
        await server.close()
    assert got.value.status_code == 502 and "the upstream's answers are larger than 1 MiB" in str(got.value.body)
    assert calls < 32  # no more calls once the bound was passed (about 8 answers, 8 more in flight)
