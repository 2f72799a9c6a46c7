"""After a burst of large request bodies the proxy's memory comes back to about its idle size.

glibc raises its mapping threshold each time a large block is freed, so after the first
bodies of megabytes the next ones came from the heap, which it does not give back: twenty
8 MB bodies left `edgeroute serve` 150 to 200 MB above its idle size for good. `serve` now fixes
the threshold (`edgeroute/memory.py`). Measured on a real `serve` process, whose RSS the test
reads from /proc."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edgeroute.bench import attacks
from tests.conftest import eventually, simple_config
from tests.governance_support import instances, write_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc (Linux)")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_memory_returns_after_a_burst_of_large_bodies(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x " * (4 << 20)}]})  # 8 MB
    with instances(write_config(tmp_path / "edgeroute.yaml", simple_config({"a": up})), 1) as (proxy,):
        async with aiohttp.ClientSession() as s:

            async def one() -> int:
                headers = {"Content-Type": "application/json"}
                async with s.post(proxy.url + "/v1/chat/completions", data=body, headers=headers) as r:
                    await r.read()
                    return r.status

            await one()  # warm: the tokenizer, the pools
            idle = _rss_mb(proxy.proc.pid)
            for _ in range(2):  # 160 MB at once (6 MB bodies, or fewer, left nothing behind)
                assert await asyncio.gather(*(one() for _ in range(20))) == [200] * 20

            async def back_near_idle() -> float | None:
                rss = _rss_mb(proxy.proc.pid)
                return rss if rss <= idle + 50 else None

            await eventually(back_near_idle, f"RSS within 50 MB of its {idle:.0f} MB before the bodies", within=5)


async def test_memory_returns_after_a_flood_of_slow_large_bodies(start_upstream: Any, tmp_path: Path) -> None:
    """`edgeroute bench attack`'s body flood: sixty clients sending 8 MB bodies at 2 MB/s each,
    over and over, more than `server.max_body_bytes_in_flight` lets in at once. A body read from
    a slow client arrives in pieces of 64 KiB or less, each a block of the heap, and the flood
    left 130 to 340 MB of them freed inside the heap for good (glibc returns only a free stretch
    at the heap's very top). The proxy now hands such memory back (`memory.keep_trimmed`)."""
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["models"] = {attacks.BULK_MODEL: cfg["models"]["m"]}
    with instances(write_config(tmp_path / "edgeroute.yaml", cfg), 1) as (proxy,):
        port = int(proxy.url.rsplit(":", 1)[1])
        idle = _rss_mb(proxy.proc.pid)
        stop = asyncio.Event()
        flood = asyncio.create_task(attacks.big_bodies(port, stop, clients=60))
        await asyncio.sleep(6)
        stop.set()
        statuses = (await flood)["statuses"]
        grown = _rss_mb(proxy.proc.pid)

        async def back_near_idle() -> float | None:
            rss = _rss_mb(proxy.proc.pid)
            return rss if rss <= idle + 50 else None

        await eventually(
            back_near_idle,
            f"RSS within 50 MB of its {idle:.0f} MB before the flood (after it: {grown:.0f}; answers {statuses})",
            within=20,
        )
