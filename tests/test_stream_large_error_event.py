"""An upstream's huge error event after content: relayed small, without stalling the event loop.

The relay held an upstream's error event whole (up to 1 MiB) and redacted it whole: one made of
150,000 short escaped JSON strings took the event loop about a second, every other request waiting.
An error event past `sse.ERROR_EVENT_BYTES` now goes rebuilt from its fields, in the API's own shape,
its message cut with a marker before the word (or our key) the cut would split, then redacted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from edgeroute import sse
from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded
from tests.test_answers_in_200_that_are_not import DONE, Hostile, _chunk
from tests.test_cache_long_replay import LoopLag

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]
KEY = "sk-live-9f8e7d6c5b4a39281706aa"  # the provider's key, which the upstream quotes
# Our key at the start, and glued to the text where the message is cut (4,096 characters): half
# of it must not stay behind the cut. Then 150,000 short escaped strings (~900 KB).
MESSAGE = f"the upstream refused {KEY} then " + "x" * 4060 + KEY + " and more" * 10_000
DETAILS = ["a\n"] * 150_000


def _openai_error() -> bytes:
    err = {"message": MESSAGE, "type": "server_error", "param": None, "code": "overloaded", "details": DETAILS}
    return b"data: " + orjson.dumps({"error": err}) + b"\n\n"


class WarmThenHostile(Hostile):
    """A whole answer first (the client SDK's first use builds its models: no part of the
    measure), then `half`, and `error` once the client has read it (`read`): the error event
    reaches the relay alone, after content, as the stream's next read."""

    def __init__(self, whole: list[bytes], half: list[bytes], error: bytes) -> None:
        super().__init__(half)
        self.whole, self.error = whole, error
        self.read = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.calls == 1:
            await resp.write(b"".join(self.whole))
            return resp
        await resp.write(b"".join(self.writes))
        await self.read.wait()
        await resp.write(self.error)
        return resp


async def _proxy(start_proxy: StartProxy, serve_routes: ServeRoutes, up: Hostile) -> Proxy:
    server = await serve_routes(web.post("/v1/chat/completions", up.handle))
    return await start_proxy(
        {
            "providers": {"p": {"api_key": KEY, "base_url": server.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )


def _check_message(message: str) -> None:
    assert "9f8e7d6c" not in message and "sk-live" not in message, message[-300:]
    assert message.startswith("the upstream refused [REDACTED] then xxx"), message[:100]
    assert message.endswith("characters cut]"), message[-100:]
    assert len(message) < 4200


async def test_an_openai_client_gets_the_error_cut_and_the_loop_is_not_held(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    half = _chunk({"role": "assistant", "content": "half"})
    up = WarmThenHostile([half, _chunk({}, "stop"), DONE], [half], _openai_error())
    proxy = await _proxy(start_proxy, serve_routes, up)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=60)
    text = ""
    try:
        async for _c in await client.chat.completions.create(model="m", messages=HI, stream=True):
            pass
        with LoopLag() as lag:
            with pytest.raises(openai.APIError) as raised:
                stream = await client.chat.completions.create(model="m", messages=HI, stream=True)
                async for c in stream:
                    text += "".join(ch.delta.content or "" for ch in c.choices)
                    up.read.set()
    finally:
        await client.close()
    # Before: 1 to 2 s redacting the event whole (a loaded host); now 0.1 to 0.2 s (the stream check's parse).
    assert lag.worst < 0.5, f"the event loop stalled {lag.worst:.2f} s"
    assert text == "half"
    _check_message(raised.value.message)
    body: Any = raised.value.body
    assert (body["type"], body["code"], body["param"]) == ("server_error", "overloaded", None), body
    assert "details" not in body  # 150,000 strings no client reads
    rec = await recorded(proxy, 2)
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_error")


def test_a_small_error_event_goes_as_it_was_spelled() -> None:
    """Below the bound nothing changes: every field (a `details` list too) as the upstream wrote it."""
    ev = b'data: {"error":{"message":"no","type":"server_error","details":["a\\nb"]}}\n\n'
    assert sse.RelayGuard().feed(ev) == ev


def test_a_large_event_that_is_no_error_goes_whole() -> None:
    """A Responses event carrying `"error": null` beside a long output is content, not cut."""
    obj = {"type": "response.completed", "response": {"error": None, "output": ["a" * 40_000]}}
    ev = b"event: response.completed\ndata: " + orjson.dumps(obj) + b"\n\n"
    assert sse.RelayGuard().feed(ev) == ev
