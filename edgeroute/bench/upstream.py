"""Mock OpenAI upstreams cheap enough not to dominate what the bench measures.

A :class:`MockUpstream` answers `POST /v1/chat/completions` (JSON or SSE, with
`stream_options.include_usage`) and `GET /v1/models` in OpenAI's wire format, built
by the same functions as :mod:`edgeroute.mock.openai`, on the raw HTTP/1.1 server of
:mod:`edgeroute.bench.http1`. Per server (:class:`UpstreamOptions`) it draws the delay before the
response headers from a latency distribution (:class:`Latency`: fixed, normal,
log-normal), paces stream tokens at ``tokens_per_s``, and fails a fraction of
requests with 5xx or 429 + ``Retry-After``.

:class:`BackgroundServer` runs any of these servers on its own event loop in a
thread, for synchronous callers. Fault injection lives in :mod:`edgeroute.bench.faults`.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import orjson

from edgeroute.bench.http1 import Conn, HttpServer, Request
from edgeroute.mock.openai import (
    DONE_EVENT,
    chunk_base,
    chunk_event,
    completion_body,
    new_completion_id,
    usage_event,
)

_WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "requests",
}


@dataclass(frozen=True, slots=True)
class Latency:
    """A delay distribution in milliseconds.

    Specs: ``"5"`` or ``"fixed:5"``; ``"normal:50,10"`` (mean, standard deviation,
    clamped at 0); ``"lognormal:50,1.0"`` (median, sigma of the log: sigma 1 gives
    p99 ≈ 10x the median, a heavy tail).
    """

    kind: str = "fixed"
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Latency:
        kind, _, rest = spec.partition(":")
        if not rest:
            return cls("fixed", float(kind))
        nums = [float(x) for x in rest.split(",")]
        if kind == "fixed":
            return cls("fixed", nums[0])
        if kind in ("normal", "lognormal") and len(nums) == 2:
            return cls(kind, nums[0], nums[1])
        raise ValueError(f"bad latency spec {spec!r}: fixed:MS | normal:MEAN,SD | lognormal:MEDIAN,SIGMA")

    def sample_ms(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "normal":
            return max(0.0, rng.gauss(self.a, self.b))
        return self.a * math.exp(rng.gauss(0.0, self.b))

    def __str__(self) -> str:
        return f"{self.kind}:{self.a:g}" + (f",{self.b:g}" if self.kind != "fixed" else "")


@dataclass(slots=True)
class UpstreamOptions:
    latency: Latency = field(default_factory=Latency)
    tokens: int = 16  # completion tokens (one stream chunk each)
    tokens_per_s: float = 0.0  # stream pacing; 0 sends every token at once
    error_rate: float = 0.0
    error_status: int = 500
    rate_limit_rate: float = 0.0
    retry_after: str = "1"
    api_key: str | None = None
    seed: int | None = None


def error_json(status: int, message: str, code: str | None = None) -> bytes:
    etype = _ERROR_TYPES.get(status, "server_error")
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})


class Server(Protocol):
    http: HttpServer

    async def start(self) -> int: ...

    async def stop(self) -> None: ...


class MockUpstream:
    """An OpenAI-format upstream on 127.0.0.1; `url` is the base URL (ending in /v1)."""

    def __init__(self, options: UpstreamOptions | None = None, port: int = 0, host: str = "127.0.0.1") -> None:
        self.options = options or UpstreamOptions()
        self.http = HttpServer(self.handle, host, port)
        self.rng = random.Random(self.options.seed)
        self.requests = 0  # chat requests received
        self.streams_open = 0

    @property
    def port(self) -> int:
        return self.http.port

    @property
    def url(self) -> str:
        return f"http://{self.http.host}:{self.http.port}/v1"

    async def start(self) -> int:
        return await self.http.start()

    async def stop(self) -> None:
        await self.http.stop()

    # -- dispatch --------------------------------------------------------------

    async def handle(self, req: Request, conn: Conn) -> None:
        path = req.path.split("?", 1)[0]
        if req.method == "POST" and path.endswith("/chat/completions"):
            self.requests += 1
            await self.chat(req, conn)
        elif req.method == "GET" and path.endswith("/models"):
            data = [{"id": "gpt-4o-mini", "object": "model", "created": 1700000000, "owned_by": "bench"}]
            conn.respond(200, orjson.dumps({"object": "list", "data": data}))
        elif req.method == "POST" and path == "/v1/traces":
            # An OTLP/HTTP trace sink, so that benchmarks with tracing on pay for a real export.
            conn.respond(200, b"", "application/x-protobuf")
        else:
            conn.respond(404, error_json(404, f"Unknown request URL: {req.method} {path}."))

    def parse_chat(self, req: Request, conn: Conn) -> dict[str, Any] | None:
        """The request body, or None after answering an OpenAI-format 4xx."""
        key = self.options.api_key
        if key is not None and req.headers.get("authorization") != f"Bearer {key}":
            conn.respond(401, error_json(401, "Incorrect API key provided.", "invalid_api_key"))
            return None
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            conn.respond(400, error_json(400, "We could not parse the JSON body of your request."))
            return None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            conn.respond(400, error_json(400, "you must provide a model parameter"))
            return None
        return body

    async def chat(self, req: Request, conn: Conn) -> None:
        body = self.parse_chat(req, conn)
        if body is None:
            return
        o = self.options
        delay = o.latency.sample_ms(self.rng)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if o.error_rate or o.rate_limit_rate:
            x = self.rng.random()
            if x < o.error_rate:
                conn.respond(o.error_status, error_json(o.error_status, f"Mock error {o.error_status}."))
                return
            if x < o.error_rate + o.rate_limit_rate:
                conn.respond(
                    429,
                    error_json(429, "Rate limit reached.", "rate_limit_exceeded"),
                    headers=[("Retry-After", o.retry_after)],
                )
                return
        await self.answer(req, conn, body)

    async def answer(
        self,
        req: Request,
        conn: Conn,
        body: dict[str, Any],
        *,
        tokens: int | None = None,
        stop_after: int | None = None,
        done: bool = True,
    ) -> bool:
        """A successful answer. For streams, `stop_after` returns after that many content
        chunks (headers and those chunks sent, body unfinished); `done=False` ends the
        stream cleanly but without the `[DONE]` event. Returns True when complete."""
        n = self.options.tokens if tokens is None else tokens
        pieces = [_WORDS[i % len(_WORDS)] for i in range(n)]
        prompt_tokens = max(1, len(req.body) // 4)
        model = body["model"]
        cid = new_completion_id()
        created = int(time.time())
        if not body.get("stream"):
            data = completion_body(cid, created, model, "".join(pieces), "stop", prompt_tokens, n)
            if stop_after is not None:
                conn.write_raw(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%b" % (len(data), data[: len(data) // 2])
                )
                return False
            conn.respond(200, data)
            return True
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = chunk_base(cid, created, model)
        conn.start(200)
        conn.chunk(chunk_event(base, {"role": "assistant", "content": "", "refusal": None}, None, include_usage))
        interval = 1.0 / self.options.tokens_per_s if self.options.tokens_per_s > 0 else 0.0
        self.streams_open += 1
        try:
            for i, piece in enumerate(pieces):
                if stop_after is not None and i >= stop_after:
                    return False
                if interval and i:
                    await asyncio.sleep(interval)
                    if conn.closed:
                        return False
                conn.chunk(chunk_event(base, {"content": piece}, None, include_usage))
                await conn.drain()
            if stop_after is not None and stop_after >= n:
                return False
            conn.chunk(chunk_event(base, {}, "stop", include_usage))
            if include_usage:
                conn.chunk(usage_event(base, prompt_tokens, n))
            if done:
                conn.chunk(DONE_EVENT)
            conn.end()
            return True
        finally:
            self.streams_open -= 1


S = TypeVar("S", bound=Server)
T = TypeVar("T")


class BackgroundServer(Generic[S]):
    """Runs a server (MockUpstream, FaultUpstream, ...) on its own event loop in a daemon thread."""

    def __init__(self, server: S) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-upstream", daemon=True)

    def start(self) -> int:
        self._thread.start()
        return self.call(self.server.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def call_soon(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        async def run() -> T:
            return fn()

        return self.call(run(), timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    def __enter__(self) -> BackgroundServer[S]:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
