"""A streaming client that reads nothing is let go after `server.send_timeout`.

Before, a client that asked for a stream and stopped reading held the stream, its upstream
connection and its capacity slot for the provider's total timeout (600 s): a few hundred such
clients took every connection of a provider's pool from everyone else. The upstream was not at
fault, and is not reported so."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgeroute.state import STATE
from tests.conftest import eventually
from tests.security.conftest import Served, chat_upstream

CHUNK = (
    b"data: "
    + orjson.dumps(
        {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "x",
         "choices": [{"index": 0, "delta": {"content": "word " * 50}, "finish_reason": None}]}
    )
    + b"\n\n"
)  # fmt: skip


class Endless:
    """Streams content as fast as it is taken, for up to 60 s; notes when its client left."""

    def __init__(self) -> None:
        self.left = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            async with asyncio.timeout(60):
                while True:
                    await resp.write(CHUNK * 50)
        except (ConnectionError, asyncio.CancelledError):
            self.left.set()
            raise
        return resp


@pytest.fixture
async def endless() -> AsyncIterator[tuple[Endless, TestServer]]:
    up = Endless()
    server = await chat_upstream(up.handle)
    yield up, server
    await server.close()


def _ask_and_never_read(port: int) -> socket.socket:
    body = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "go on"}]})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    s.sendall(head.encode() + body)
    return s


async def test_a_client_that_reads_nothing_is_let_go(endless: tuple[Endless, TestServer], serve: Any) -> None:
    up, server = endless
    proxy: Served = await serve(
        {
            "server": {"send_timeout": 1},
            "providers": {"p": {"base_url": f"http://127.0.0.1:{server.port}/v1", "api_key": "k"}},
            "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    client = _ask_and_never_read(proxy.port)
    try:
        # The upstream fills every buffer on the way, then the proxy waits for the client:
        # after a second of that, the stream ends and the upstream connection with it.
        async with asyncio.timeout(30):
            await up.left.wait()

        async def recorded() -> Any:
            return proxy.recorder.records[-1] if proxy.recorder.records else None

        rec = await eventually(recorded, "the stream's record")
        assert (rec.outcome, rec.error_class) == ("client_gone", "slow_client")
        assert rec.attempts[0].usage.completion_tokens > 0  # what was sent is paid for
        live = proxy.app[STATE].live
        health = live.router.health(live.deployments[0].index)
        assert health["circuit"] == "closed"  # the deployment is not blamed
    finally:
        client.close()
