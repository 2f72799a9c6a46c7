"""One client cannot open the circuits of deployments that serve everyone else: its requests
that time out (or get a 502/503/504) on every deployment, while those deployments answer other
requests meanwhile, are the request's own failures, as the same 500 from two deployments is.
A dozen hanging requests from one key opened every circuit of a model and of its fallback,
and halved its capacity for everyone for the ejection's length. An outage, where nobody is
served, still opens them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes


class Upstream:
    """Answers at once, but never a prompt that says HANG (or anything while `down`)."""

    def __init__(self) -> None:
        self.down = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.down or "HANG" in body["messages"][-1]["content"]:
            await asyncio.sleep(30)
        answer = {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        return web.json_response(answer)


async def _proxy(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, up: Upstream
) -> Proxy:
    a = await serve_routes(web.post("/v1/chat/completions", up.handle))
    b = await serve_routes(web.post("/v1/chat/completions", up.handle))
    return await start_proxy(
        {
            "providers": {
                "a": {"base_url": a.url + "/v1", "timeouts": {"first_byte": 0.4, "total": 1.5}},
                "b": {"base_url": b.url + "/v1", "timeouts": {"first_byte": 0.4, "total": 1.5}},
            },
            "deployments": {"d-a": {"provider": "a", "model": "x"}, "d-b": {"provider": "b", "model": "x"}},
            "models": {"m": {"deployments": ["d-a", "d-b"]}},
            "health": {"consecutive_failures": 3, "max_ejected_percent": 100},
        }
    )


async def _circuits(proxy: Proxy) -> dict[str, str]:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
        return {d["name"]: str(d["circuit"]) for d in (await r.json())["deployments"]}


async def _ask(client: openai.AsyncOpenAI, text: str) -> int:
    try:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}])
        return 200
    except openai.APIStatusError as e:
        return e.status_code


async def test_one_clients_hanging_requests_do_not_open_the_circuits(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, Upstream())
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    served: list[int] = []
    done = asyncio.Event()

    async def everyone_else() -> None:
        while not done.is_set():
            served.append(await _ask(client, "hello"))
            await asyncio.sleep(0.02)

    try:
        others = asyncio.ensure_future(everyone_else())
        await asyncio.sleep(0.1)
        hanging = await asyncio.gather(*(_ask(client, "HANG") for _ in range(6)))
        done.set()
        await others
        circuits = await _circuits(proxy)
    finally:
        await client.close()
    assert set(served) == {200} and len(served) > 10
    assert hanging == [504] * 6  # each timed out on both deployments: the request's, said so
    assert circuits == {"d-a": "closed", "d-b": "closed"}
    rec = next(r for r in reversed(proxy.recorder.records) if r.status == 504)
    assert sorted(a.deployment for a in rec.attempts) == ["d-a", "d-b"]  # stopped after one try of each


async def test_an_outage_where_nobody_is_served_still_opens_them(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes
) -> None:
    up = Upstream()
    proxy = await _proxy(start_proxy, serve_routes, up)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        assert await _ask(client, "hello") == 200
        up.down = True
        statuses = await asyncio.gather(*(_ask(client, "hello") for _ in range(4)))
        circuits = await _circuits(proxy)
    finally:
        await client.close()
    assert set(statuses) == {504}
    assert circuits == {"d-a": "open", "d-b": "open"}
