"""Loopback upstreams for the request-path tests: one server per handler, a config over them,
and the answer shapes an OpenAI-compatible upstream sends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from edgeroute.accounting import RequestRecord
from edgeroute.state import STATE
from tests.conftest import Proxy, ServeRoutes, eventually

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HELLO: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def upstreams(serve_routes: ServeRoutes) -> AsyncIterator[Callable[..., Awaitable[dict[str, Any]]]]:
    """Starts one server per handler; returns a config with one deployment per server, in order."""

    async def start(*handlers: Handler, kinds: tuple[str, ...] = ()) -> dict[str, Any]:
        names = []
        cfg: dict[str, Any] = {"providers": {}, "deployments": {}, "models": {}}
        for i, h in enumerate(handlers):
            srv = await serve_routes(web.post("/v1/chat/completions", h), web.post("/v1/messages", h))
            name = "abcdefgh"[i]
            kind = kinds[i] if i < len(kinds) else "openai"
            cfg["providers"][name] = {"kind": kind, "base_url": srv.url + "/v1", "api_key": "sk-up"}
            price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
            cfg["deployments"][f"d-{name}"] = {"provider": name, "model": "gpt-4o-mini", "price": price}
            names.append(f"d-{name}")
        cfg["models"]["m"] = {"deployments": names}
        return cfg

    yield start


def answer(usage: Any = None) -> web.Response:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}],
        "usage": usage if usage is not None else {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def chunk(content: str) -> bytes:
    obj = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def sse_response(request: web.Request) -> web.StreamResponse:
    """An event stream, prepared, for a request whose body has been read."""
    await request.read()
    r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await r.prepare(request)
    return r


async def ok(request: web.Request) -> web.Response:
    await request.read()
    return answer()


async def recorded(proxy: Proxy, n: int = 1) -> RequestRecord:
    """The latest record once the proxy holds `n`: a request is recorded when its handler ends,
    which may be after the client saw its end (a slow host can take longer than any fixed sleep)."""

    async def enough() -> bool:
        return len(proxy.recorder.records) >= n

    await eventually(enough, f"{n} request(s) recorded", within=10)
    return proxy.recorder.records[-1]


def in_flight(proxy: Proxy) -> dict[str, int]:
    live = proxy.app[STATE].live
    return {d.name: live.router.health(d.index)["in_flight"] for d in live.deployments}
