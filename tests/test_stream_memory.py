"""A long stream is relayed in bounded memory, and still costed in full when it carries no usage.

Every event of a stream was kept until it ended, to count its tokens if no usage came: a
300,000-token answer held its 40 MB of events in the proxy (and a copy of them to count),
so a thousand long streams, or a client asking for long ones, grew the proxy without bound.
Now the events past 256 KiB are reduced to the text they carry as they pass."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgeroute import _core
from tests.conftest import routes_upstream, wait_ready
from tests.serve_support import start_serve

TOKENS = 300_000
BATCH = 2_000


def _chunk(delta: dict[str, str], finish: str | None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    obj = {"id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CHUNK = _chunk({"content": " word"}, None)
LAST = _chunk({}, "stop") + b"data: [DONE]\n\n"


async def _long_stream(request: web.Request) -> web.StreamResponse:
    """An upstream that streams TOKENS one-token chunks and no usage (as many servers do); one
    chunk to a request with `max_tokens`."""
    short = "max_tokens" in await request.json()  # the warm-up's: one token
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(1 if short else TOKENS // BATCH):
        await resp.write(CHUNK * (1 if short else BATCH))
    await resp.write(LAST)
    await resp.write_eof()
    return resp


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    async with routes_upstream(web.post("/v1/chat/completions", _long_stream)) as server:
        yield server


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_a_long_stream_without_usage_is_relayed_in_bounded_memory_and_costed(
    upstream: TestServer, tmp_path: Path
) -> None:
    cfg: dict[str, Any] = {
        "providers": {"p": {"base_url": f"http://127.0.0.1:{upstream.port}/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "m", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
        "models": {"m": {"deployments": ["d"]}},
        "ledger": {"backend": "sqlite", "path": str(tmp_path / "spend.db")},
    }
    serving = await start_serve(tmp_path / "c.yaml", cfg, stderr=asyncio.subprocess.DEVNULL)
    proc, url = serving.proc, serving.url
    try:
        await wait_ready(url, proc=proc)
        body = {"model": "m", "messages": [{"role": "user", "content": "go on"}], "stream": True}
        async with aiohttp.ClientSession() as s:
            # Warm up (the first stream loads the tokenizer's tables): the baseline is after it.
            async with s.post(url + "/v1/chat/completions", json={**body, "max_tokens": 1}) as r:
                await r.read()
            base = peak = _rss_mb(proc.pid)
            got, carry = 0, b""
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                async for chunk in r.content.iter_any():
                    data = carry + chunk
                    got += data.count(b'" word"')
                    carry = data[-6:] if not data.endswith(b'" word"') else b""
                    peak = max(peak, _rss_mb(proc.pid))
        await asyncio.sleep(0.5)  # counting the tokens, once the stream has ended
        peak = max(peak, _rss_mb(proc.pid))
        assert got == TOKENS  # the client read the whole answer
        streamed_mb = TOKENS * len(CHUNK) / 2**20
        assert streamed_mb > 35
        # The proxy held the text (1.4 MB), not the events (40 MB, and a copy to count them).
        assert peak - base < 12, f"RSS grew {peak - base:.1f} MB relaying {streamed_mb:.0f} MB"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    # Costed in full: every token counted, though no usage came.
    with sqlite3.connect(tmp_path / "spend.db") as db:
        rows = db.execute("SELECT completion_tokens FROM spend ORDER BY ts").fetchall()
    assert rows[-1][0] == _core.Router.count_tokens(" word" * TOKENS, "o200k_base")
