"""A request still waiting before its dispatch when the drain ends (`server.drain_timeout`):
inside admission (a shared-state round trip that has not come back), or queued for a
deployment's capacity. Each gets a 503 `server_shutdown` in its API's format with
`Retry-After: 1` and is recorded as the drain's cut, as a request waiting on its upstream is
(tests/test_drain_cut_waiting.py). The one inside admission got a bare connection close: only
the dispatch was cut (session 36's report left it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anthropic
import openai
import pytest

from tests.conftest import eventually, simple_config
from tests.serve_support import killed, start_serve
from tests.test_drain_cut_waiting import assert_drain_cut
from tests.test_serve import wait_ready

HELLO = [{"role": "user", "content": "hi"}]


class StallingProxy:
    """A TCP proxy to Redis that, once `stall()`ed, forwards no more commands (their replies
    never come): a store that stopped answering, as a client waiting on it sees it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.stalled = asyncio.Event()
        self.commands_held = 0
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def stall(self) -> None:
        self.stalled.set()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, commands: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                if commands and self.stalled.is_set():
                    self.commands_held += 1
                    await asyncio.Event().wait()  # held for good
                dst.write(data)
                await dst.drain()
        dst.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for src, dst, commands in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.ensure_future(self._pipe(src, dst, commands))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StallingProxy]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _redis() -> tuple[tuple[str, int], str]:
    url = urlsplit(os.environ.get("EDGEROUTE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    return (url.hostname or "127.0.0.1", url.port or 6379), url.path


def _ask(url: str, api: str) -> Any:
    if api == "anthropic":
        client: Any = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0, timeout=20)
        return client.messages.create(model="m", messages=HELLO, max_tokens=5)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=20)
    return client.chat.completions.create(model="m", messages=HELLO)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_request_waiting_inside_admission_at_the_drains_end_gets_an_error_and_is_recorded_cut(
    api: str, start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream(record=True)
    target, db = _redis()
    async with StallingProxy(target).running() as redis:
        cfg = simple_config({"a": up}, server={"drain_timeout": 0.5})
        # A shared rate limit: admission asks Redis, for as long as `timeout_ms` allows.
        cfg["rate_limits"] = {"models": {"m": {"rpm": 100_000}}}
        cfg["shared_state"] = {
            "redis_url": f"redis://127.0.0.1:{redis.port}{db}",
            "timeout_ms": 30_000,
            "prefix": f"drain-cut-{os.getpid()}-{api}",
        }
        serving = await start_serve(tmp_path / "c.yaml", cfg, stderr=None)
        proc, url = serving.proc, serving.url
        try:
            await wait_ready(url)
            await _ask(url, api)  # admitted and served while the store answers
            redis.stall()
            asked = asyncio.ensure_future(_ask(url, api))
            await eventually(lambda: asyncio.sleep(0, redis.commands_held), "admission waiting on the store")
            os.kill(proc.pid, signal.SIGTERM)
            with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as got:
                await asyncio.wait_for(asked, 10)
            assert_drain_cut(got.value, api)
            assert len(up.options.requests) == 1  # the waiting one was never sent
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            with sqlite3.connect(tmp_path / "edgeroute-ledger.db") as ledger:
                got_outcomes = ledger.execute("SELECT outcome FROM spend ORDER BY ts").fetchall()
                assert got_outcomes == [("ok",), ("drain_cut",)]
        finally:
            await killed(proc)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_request_queued_for_capacity_at_the_drains_end_gets_an_error_and_is_recorded_cut(
    api: str, start_upstream: Any, tmp_path: Path
) -> None:
    """A guard (it held before): the capacity queue is part of the dispatch."""
    up = await start_upstream(latency_ms=30_000, record=True)  # answers long after the drain
    cfg = simple_config({"a": up}, server={"drain_timeout": 0.5})
    cfg["deployments"]["d-a"] |= {"max_concurrency": 1, "max_queue": 4, "queue_timeout_ms": 30_000}
    serving = await start_serve(tmp_path / "c.yaml", cfg, stderr=None)
    proc, url = serving.proc, serving.url
    try:
        await wait_ready(url)
        holding = asyncio.ensure_future(_ask(url, "openai"))
        await eventually(lambda: asyncio.sleep(0, up.options.requests), "the upstream called")
        queued = asyncio.ensure_future(_ask(url, api))

        async def in_queue() -> bool:
            async with aiohttp.ClientSession() as s, s.get(url + "/admin/deployments") as r:
                return bool((await r.json())["deployments"][0]["queued"])

        await eventually(in_queue, "the second request queued")
        os.kill(proc.pid, signal.SIGTERM)
        for task, its_api in ((holding, "openai"), (queued, api)):
            with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as got:
                await asyncio.wait_for(task, 10)
            assert_drain_cut(got.value, its_api)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert len(up.options.requests) == 1  # the queued one was never sent
        with sqlite3.connect(tmp_path / "edgeroute-ledger.db") as db:
            assert db.execute("SELECT outcome FROM spend").fetchall() == [("drain_cut",), ("drain_cut",)]
    finally:
        await killed(proc)
