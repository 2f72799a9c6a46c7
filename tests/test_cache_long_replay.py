"""A long cached answer replayed as an Anthropic stream held the event loop for seconds per hit:
the stream encoder grew its output with `bytes +=` (each event copied all before it), a replay
feeds it the whole answer at once, and the memo keeps small renders only, so every hit of a
900 KB answer rendered it again, twice. Free for the caller (a hit costs nothing) and every
tenant's requests waited. Now the encoders join their parts once, a hit renders once, and a
large one off the event loop. The replayed stream is the stored answer, whole."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes

WORDS = 150_000  # about 900 KB of text: what a long-output model writes in one answer
TEXT = " ".join(f"w{i % 997}" for i in range(WORDS))


async def _long_answer(request: web.Request) -> web.Response:
    await request.read()
    choice = {"index": 0, "message": {"role": "assistant", "content": TEXT}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 5, "completion_tokens": WORDS, "total_tokens": WORDS + 5}
    answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "x", "choices": [choice], "usage": usage}
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


class LoopLag:
    """The longest the event loop went without running this ticker (every 10 ms)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.worst = max(self.worst, now - last - 0.01)
            last = now

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_a_long_cached_answer_streams_whole_without_holding_everyone_up(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes
) -> None:
    up = await serve_routes(web.post("/v1/chat/completions", _long_answer))
    proxy = await start_proxy(
        {
            "providers": {"p": {"base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"], "cache": {"ttl": 300, "deterministic_only": False}}},
        }
    )
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0, timeout=60)
    oa = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=60)
    ask: dict[str, Any] = {"model": "m", "max_tokens": 200_000, "messages": [{"role": "user", "content": "write"}]}
    try:
        stored = await claude.messages.create(**ask)  # a miss: the answer is stored
        assert stored.content[0].type == "text" and stored.content[0].text == TEXT
        with LoopLag() as lag:
            for _ in range(3):
                async with claude.messages.stream(**ask) as stream:
                    message = await stream.get_final_message()
                assert message.content[0].type == "text" and message.content[0].text == TEXT
                assert message.stop_reason == "end_turn"
            chunks = await oa.chat.completions.create(
                model="m", messages=ask["messages"], max_tokens=200_000, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            assert text == TEXT
    finally:
        await claude.close()
        await oa.close()
    hits = [r for r in proxy.recorder.records if r.cache == "hit"]
    assert len(hits) == 4 and all(r.status == 200 for r in hits)
    # Before: one render took seconds of the event loop (every other request waited); now a
    # hit's encoding is linear and off the loop. The bound is generous for a loaded CI host.
    assert lag.worst < 1.0, f"the event loop stalled {lag.worst:.2f} s during the hits"
