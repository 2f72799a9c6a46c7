"""A prompt that is slow to count exactly does not stall the event loop.

Counting a piece without a space (megabytes of one letter, or of Chinese) takes ~300 ns a
byte. Before, a client that sent 4 MB of "a" and went away made the loop count it to price the
cancelled attempt (3.5 s during which no other request was served), and with token-per-minute
limits every such request was counted exactly on the loop to decide it. Now a prompt past
16 KiB is counted in a worker thread, from its first attempt on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import eventually, routes_upstream
from tests.security.conftest import Served

HOSTILE = "a" * 4_000_000  # one pre-tokenizer piece of 4 MB: seconds to count exactly
# Encoded once: the client shares the proxy's event loop here, and should not stall it itself.
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": HOSTILE}]})
JSON = {"Content-Type": "application/json"}


class Slow:
    """An upstream that answers after `delay` seconds, with usage."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(self.delay)
        return web.json_response(
            {"id": "c1", "object": "chat.completion", "created": 0, "model": "x",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}}
        )  # fmt: skip


@pytest.fixture
async def slow() -> AsyncIterator[TestServer]:
    async with routes_upstream(web.post("/v1/chat/completions", Slow(2.0).handle), client_max_size=16 << 20) as server:
        yield server


def _config(server: TestServer, **extra: Any) -> dict[str, Any]:
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    return {
        "providers": {"p": {"base_url": f"http://127.0.0.1:{server.port}/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": price}},
        "models": {"m": {"deployments": ["d"]}},
        **extra,
    }


async def _health_ms(s: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with s.get(url + "/healthz") as r:
        assert r.status == 200
    return (time.perf_counter() - started) * 1000


async def test_a_client_gone_with_a_hostile_prompt_does_not_stall_the_loop(slow: TestServer, serve: Any) -> None:
    proxy: Served = await serve(_config(slow))
    async with aiohttp.ClientSession() as s:
        with pytest.raises(TimeoutError):
            timeout = aiohttp.ClientTimeout(total=1)
            async with s.post(proxy.url + "/v1/chat/completions", data=BODY, headers=JSON, timeout=timeout):
                pass
        # The handler is cancelled and its attempt priced; the loop serves meanwhile.
        waits = [await _health_ms(s, proxy.url) for _ in range(10)]
        assert max(waits) < 500, waits

    async def priced() -> Any:
        recs = proxy.recorder.records
        return recs[-1] if recs and recs[-1].attempts and recs[-1].attempts[0].usage else None

    rec = await eventually(priced, "the cancelled request's record")
    assert rec.attempts[0].outcome == "cancelled"
    assert rec.attempts[0].usage.prompt_tokens > 100_000  # the prompt was billed, counted or estimated
    assert rec.attempts[0].cost_usd > 0


async def test_with_tpm_limits_a_hostile_prompt_is_decided_off_the_loop(slow: TestServer, serve: Any) -> None:
    """Token-per-minute limits count every prompt exactly to decide it."""
    proxy: Served = await serve(_config(slow, rate_limits={"models": {"m": {"tpm": 100_000_000}}}))
    async with aiohttp.ClientSession() as s:
        asked = asyncio.create_task(s.post(proxy.url + "/v1/chat/completions", data=BODY, headers=JSON))
        waits = []
        while not asked.done():  # while its body is read, counted and answered
            waits.append(await _health_ms(s, proxy.url))
        async with await asked as r:
            assert r.status == 200, await r.text()
    assert max(waits) < 500, waits
