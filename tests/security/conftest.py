"""Fixtures for the security suite: a careless upstream that quotes the credentials it was
sent, and the proxy served exactly as `edgeroute serve` serves it (its connection protocol,
header timeout and parser-error answers), on loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgeroute import config as config_mod
from edgeroute.accounting import MemoryRecorder
from edgeroute.server import create_app
from tests.conftest import simple_config, start_routes
from tests.security.governed import ROOT
from tests.test_cost_support import CostProxy, cost_proxy


@dataclass
class Leaky:
    """An upstream that answers as `mode` says, quoting the request's credentials in its errors.

    Modes: an HTTP status (400, 404, 422, 429, 500, 401, ...) with an OpenAI-style JSON
    error; "ok"; "200-error" (a JSON 200 carrying only an error object); "stream-error"
    (a 200 stream whose first event is an error); "midstream-error" (content, then an error
    event); "text" (a plain-text 500 that quotes the headers).
    """

    mode: int | str = 400
    extra: str = ""  # appended to every error message (e.g. line breaks, terminal escapes)
    seen: list[dict[str, str]] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/v1"

    def quote(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        key = request.headers.get("x-api-key", "") or request.headers.get("api-key", "")
        return (
            f"Incorrect API key provided: {auth[7:]}. You sent Authorization: {auth}, x-api-key: {key}; "
            f"see {request.url.with_query({'key': auth[7:] or key})}{self.extra}"
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(dict(request.headers))
        body = await request.json()
        quote = self.quote(request)
        if self.mode == "text":
            return web.Response(status=500, text=f"upstream crashed: {quote}")
        if isinstance(self.mode, int):
            # A 401 is OpenAI's refusal of our key; a 4xx other than 401/403 without that code is
            # the client's error (which still quotes the key), relayed redacted.
            code = "invalid_api_key" if self.mode in (401, 403) else None
            err = {"error": {"message": quote, "type": "invalid_request_error", "code": code}}
            return web.json_response(err, status=self.mode)
        if self.mode == "200-error":
            return web.json_response({"error": {"message": quote, "type": "server_error"}})
        if body.get("stream") or self.mode in ("stream-error", "midstream-error"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            err = b"data: " + orjson.dumps({"error": {"message": quote, "type": "server_error"}}) + b"\n\n"
            content = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "x",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "partial"}, "finish_reason": None}],
            }
            if self.mode == "midstream-error":
                await resp.write(b"data: " + orjson.dumps(content) + b"\n\n")
            await resp.write(err)
            await resp.write_eof()
            return resp
        return web.json_response(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": "x",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )


async def openai_answer(request: web.Request, body: dict[str, Any], content: str, usage: Any) -> web.StreamResponse:
    """OpenAI's answer to a chat request (`body`, read from `request`): JSON, or SSE when it asked
    to stream (the content, the finish, then `usage` in a chunk of its own, then `[DONE]`).
    `usage` goes out as given: a careless provider's test writes what it likes there."""
    base = {"id": "c1", "created": int(time.time()), "model": body["model"]}
    if not body.get("stream"):
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        return web.json_response({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    base["object"] = "chat.completion.chunk"
    for choice in (
        {"index": 0, "delta": {"content": content}, "finish_reason": None},
        {"index": 0, "delta": {}, "finish_reason": "stop"},
    ):
        await resp.write(b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n")
    await resp.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def priced_config(base_url: str, input_per_mtok: float = 1.0, output_per_mtok: float = 10.0) -> dict[str, Any]:
    """Model `m` over one priced OpenAI deployment at `base_url`."""
    price = {"input_per_mtok": input_per_mtok, "output_per_mtok": output_per_mtok}
    return {
        "providers": {"p": {"kind": "openai", "base_url": base_url, "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": price}},
        "models": {"m": {"deployments": ["d"]}},
    }


async def chat_upstream(handle: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> TestServer:
    """A started upstream whose `POST /v1/chat/completions` is `handle` (a test's hostile provider)."""
    return await start_routes(web.post("/v1/chat/completions", handle))


@contextlib.asynccontextmanager
async def usage_upstream(usage: dict[str, Any]) -> AsyncIterator[str]:
    """A chat upstream answering "hello" with `usage` whatever it was asked (a careless
    provider's counts); yields its base URL."""

    async def chat(request: web.Request) -> web.StreamResponse:
        return await openai_answer(request, await request.json(), "hello", usage)

    server = await chat_upstream(chat)
    try:
        yield f"http://127.0.0.1:{server.port}/v1"
    finally:
        await server.close()


async def titan_upstream(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]], **model: Any
) -> tuple[TestServer, dict[str, Any]]:
    """A started Bedrock upstream whose Titan embeddings `invoke` is `handle`, and a config
    serving it as model `embed` (`model`: more of that model's settings)."""
    server = await start_routes(web.post("/model/{model}/invoke", handle))
    options = {"region": "us-east-1", "aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "dummy-secret"}
    cfg = {
        "providers": {"aws": {"kind": "bedrock", "base_url": server.url, "options": options}},
        "deployments": {
            "t": {"provider": "aws", "model": "amazon.titan-embed-text-v2:0", "price": {"input_per_mtok": 1}}
        },
        "models": {"embed": {"deployments": ["t"], **model}},
    }
    return server, cfg


class _Scripted:
    """Sends `first`; then, once the client has read content (`go`), `then`."""

    def __init__(self, first: bytes, then: bytes, go: asyncio.Event) -> None:
        self.first, self.then, self.go = first, then, go

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(self.first)
        if self.then:
            async with asyncio.timeout(10):
                await self.go.wait()
            await resp.write(self.then)
        await resp.write_eof()
        return resp


def failover_config(*servers: TestServer, kind: str = "openai") -> dict[str, Any]:
    """Model `m` over one deployment per server, in order, each tried once (`max_attempts`)
    with next to no retry delay: what a careless upstream sends, then what the next one does."""
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    n = len(servers)
    path = "" if kind == "anthropic" else "/v1"
    return {
        "providers": {
            f"p{i}": {"base_url": f"http://127.0.0.1:{s.port}{path}", "api_key": "k", "kind": kind}
            for i, s in enumerate(servers)
        },
        "deployments": {f"d{i}": {"provider": f"p{i}", "model": "x", "price": price} for i in range(n)},
        "models": {"m": {"deployments": [f"d{i}" for i in range(n)], "max_attempts": n}},
        "retry": {"base_ms": 1, "max_ms": 2},
    }


class ScriptedStreams:
    """Starts upstreams that stream scripted bytes at `path`: `first`, then `then` once the
    test sets `go` (when its client has read content), so an event lands after content."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.go = asyncio.Event()
        self.servers: list[TestServer] = []

    async def __call__(self, first: bytes, then: bytes = b"") -> TestServer:
        server = await start_routes(web.post(self.path, _Scripted(first, then, self.go).handle))
        self.servers.append(server)
        return server

    async def close(self) -> None:
        for s in self.servers:
            await s.close()


@pytest.fixture
async def leaky() -> AsyncIterator[Leaky]:
    up = Leaky()
    up.server = await chat_upstream(up.handle)
    yield up
    await up.server.close()


@dataclass
class Served:
    url: str
    port: int
    app: web.Application
    recorder: MemoryRecorder


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """Starts the proxy as `edgeroute serve` does (its server and connection protocol)."""
    from edgeroute.http_server import ProxyServer

    servers: list[ProxyServer] = []

    async def start(cfg_data: dict[str, Any], host: str = "127.0.0.1") -> Served:
        cfg = config_mod.parse(cfg_data, "test.yaml")
        recorder = MemoryRecorder()
        app = create_app(cfg, "test.yaml", recorder)
        server = ProxyServer(app, cfg)
        await server.setup()
        servers.append(server)
        await server.listen(host, 0)
        return Served(f"http://127.0.0.1:{server.port}", server.port, app, recorder)

    yield start
    for s in servers:
        await s.cleanup()


def leaky_config(up: Leaky, api_key: str = "sk-live-0123456789abcdefSECRET", **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {"p": {"base_url": up.base_url, "api_key": api_key}},
        "deployments": {
            "d": {"provider": "p", "model": "gpt-4o-mini", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}
        },
        "models": {"m": {"deployments": ["d"], "max_attempts": 2}},
        "retry": {"base_ms": 1, "max_ms": 2},
    }
    cfg.update(extra)
    return cfg


async def raw_exchange(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Sends raw bytes on a new connection and returns everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        return b"".join(chunks)
    finally:
        writer.close()


def _complete(resp: bytes) -> bool:
    head, _, body = resp.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


@dataclass
class LoopLag:
    """How late this event loop woke, at most, while the block ran (a 20 ms sleep's overshoot)."""

    max_s: float = 0.0


@contextlib.contextmanager
def loop_lag() -> Iterator[LoopLag]:
    lag = LoopLag()

    async def ticker() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.02)
            lag.max_s = max(lag.max_s, time.perf_counter() - t - 0.02)

    tick = asyncio.get_running_loop().create_task(ticker())
    try:
        yield lag
    finally:
        tick.cancel()


@pytest.fixture
async def governed(start_upstream: Any, tmp_path: Path) -> AsyncIterator[CostProxy]:
    """A proxy with managed keys on and `ROOT` as its admin key in the config."""
    cfg = simple_config({"a": await start_upstream()})
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db")},
    }
    async with cost_proxy(cfg) as proxy:
        yield proxy
