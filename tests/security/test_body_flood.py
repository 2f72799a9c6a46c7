"""Large request bodies sent at once are bounded in memory: past
`server.max_body_bytes_in_flight`, a request is refused with 503 and Retry-After before its
body is read.

Before, only each body was bounded (`max_body_bytes`, 10 MiB): a hundred clients sending
8.6 MB bodies at once held 2.9 GB of the proxy (about four times each body while it is parsed
and sent on), and a few hundred more would have had it killed, every request in flight with it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import eventually
from tests.security.conftest import Served, chat_upstream

KB = 1024


class Held:
    """An upstream that answers once `go` is set: its requests stay in flight until then."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.arrived = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrived += 1
        async with asyncio.timeout(20):
            await self.go.wait()
        return web.json_response(
            {"id": "c1", "object": "chat.completion", "created": 0, "model": "x",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        )  # fmt: skip


@pytest.fixture
async def held() -> AsyncIterator[tuple[Held, TestServer]]:
    up = Held()
    server = await chat_upstream(up.handle)
    yield up, server
    up.go.set()
    await server.close()


def _config(server: TestServer, in_flight_bytes: int) -> dict[str, Any]:
    return {
        "server": {"max_body_bytes": 1024 * KB, "max_body_bytes_in_flight": in_flight_bytes},
        "providers": {"p": {"base_url": f"http://127.0.0.1:{server.port}/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
        "models": {"m": {"deployments": ["d"]}},
    }


def _client(proxy: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30)


async def _ask(proxy: Served, size: int) -> str:
    r = await _client(proxy).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x " * (size // 2)}]
    )
    return r.choices[0].message.content or ""


async def _arrived(up: Held, n: int) -> None:
    async def seen() -> bool:
        return up.arrived >= n

    await eventually(seen, f"{n} requests at the upstream")


async def test_bodies_past_the_bound_are_refused_with_503_until_room_is_made(
    held: tuple[Held, TestServer], serve: Any
) -> None:
    up, server = held
    proxy: Served = await serve(_config(server, 2 * 1024 * KB))
    first = [asyncio.create_task(_ask(proxy, 900 * KB)) for _ in range(2)]
    await _arrived(up, 2)  # two 900 KB bodies in flight: 1.8 MB of the 2 MB
    with pytest.raises(openai.APIStatusError) as refused:
        await _ask(proxy, 900 * KB)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "overloaded"  # type: ignore[index]
    # A small request still fits beside them.
    small = asyncio.create_task(_ask(proxy, 8 * KB))
    await _arrived(up, 3)
    up.go.set()
    assert await asyncio.gather(*first, small) == ["ok", "ok", "ok"]
    # The bodies are given back once their requests end: the same request is let in now.
    assert await _ask(proxy, 900 * KB) == "ok"


async def test_a_request_alone_is_let_in_whatever_its_size(held: tuple[Held, TestServer], serve: Any) -> None:
    up, server = held
    up.go.set()
    proxy: Served = await serve(_config(server, 64 * KB))
    assert await _ask(proxy, 900 * KB) == "ok"


async def test_a_chunked_body_counts_as_the_largest_body(held: tuple[Held, TestServer], serve: Any) -> None:
    """Its size is not known before it is read: it holds `max_body_bytes` of the bound."""
    up, server = held
    proxy: Served = await serve(_config(server, 1536 * KB))
    first = asyncio.create_task(_ask(proxy, 600 * KB))  # 600 KB + 1 MiB would pass the 1.5 MiB
    await _arrived(up, 1)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "m", "messages": [{"role": "user", '
        yield b'"content": "hi"}]}'

    async with aiohttp.ClientSession() as s:
        hdrs = {"Content-Type": "application/json"}
        async with s.post(proxy.url + "/v1/chat/completions", data=chunks(), headers=hdrs) as r:
            assert r.status == 503, await r.text()
    up.go.set()
    assert await first == "ok"


HOG, OTHER = "hog-token-0123456789", "other-token-0123456789"


async def _declare(port: int, token: str, size: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request whose head declares `size` bytes of body, of which it sends ten."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    )
    writer.write(head.encode() + b'{"model": ')
    await writer.drain()
    return reader, writer


async def test_one_key_trickling_bodies_cannot_hold_every_tenants_room(
    held: tuple[Held, TestServer], serve: Any
) -> None:
    """A tenant that declares large bodies and sends them a byte at a time is never admitted
    (no RPM, no budget spent), yet it held all of `max_body_bytes_in_flight`: every other
    tenant's larger request was a 503. Once bodies hold half the room, a key holding a quarter
    gets a 429 for more, and the other tenants keep the rest."""
    up, server = held
    up.go.set()
    cfg = _config(server, 4 * 1024 * KB) | {"keys": {"hog": {"token": HOG}, "other": {"token": OTHER}}}
    proxy: Served = await serve(cfg)
    port = int(proxy.url.rsplit(":", 1)[1])
    held_open, statuses = [], []
    for _ in range(5):
        reader, writer = await _declare(port, HOG, 900 * KB)
        held_open.append(writer)
        try:
            async with asyncio.timeout(1):
                statuses.append((await reader.readline()).decode().split(" ")[1])
        except TimeoutError:
            statuses.append("waiting")  # admitted: its handler waits for the rest of the body
    try:
        assert statuses == ["waiting", "waiting", "429", "429", "429"], statuses
        # Another tenant's 900 KB request passes meanwhile (1.8 MB of the 4 MB held).
        r = await openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=OTHER, max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x " * (450 * KB)}]
        )
        assert r.choices[0].message.content == "ok"
    finally:
        for w in held_open:
            w.close()
