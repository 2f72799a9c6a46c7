"""A client that opens connections and sends nothing does not lock everyone else out.

Before, each idle connection held one of the process's open files until its header timeout
(10 s): under the usual soft limit of 1,024, a few hundred connections a second left no file
for a new client (reset at once), an upstream call or the ledger. Now `serve` raises the soft
limit to the hard one, and at its connection cap closes the longest-idle connections first."""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import simple_config, wait_ready
from tests.serve_support import Serving, start_serve


def _limit(soft: int, hard: int) -> Any:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return set_limit


async def _serve(tmp_path: Path, up: Any, soft: int, hard: int, **server: Any) -> Serving:
    cfg = simple_config({"a": up}, server=server, ledger={"backend": "memory"})
    serving = await start_serve(tmp_path / "c.yaml", cfg, preexec_fn=_limit(soft, hard))
    await wait_ready(serving.url, proc=serving.proc)
    return serving


def _open_idle(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(1) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


async def _ask(url: str) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=5)
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return r.choices[0].message.content or ""


def _open_files_line(pid: int) -> str:
    limits = Path(f"/proc/{pid}/limits").read_text()
    return next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))


async def _stop(proc: Any) -> None:
    proc.terminate()
    await asyncio.wait_for(proc.wait(), 15)


@pytest.mark.parametrize(
    ("open_files", "server", "idle"),
    [
        (300, {}, 250),  # the cap from the limit: half of 300 files (the rest kept for upstreams)
        (1000, {"max_client_connections": 100}, 150),
    ],
)
async def test_idle_connections_past_the_cap_make_room_for_a_client(
    start_upstream: Any, tmp_path: Path, open_files: int, server: dict[str, Any], idle: int
) -> None:
    up = await start_upstream()
    serving = await _serve(tmp_path, up, soft=open_files, hard=open_files, **server)
    proc, url, port = serving.proc, serving.url, serving.port
    cap = server.get("max_client_connections", open_files // 2)
    socks: list[socket.socket] = []
    try:
        socks = await asyncio.to_thread(_open_idle, port, idle)  # well within the header timeout
        # A client arriving now is answered, though more idle connections than the cap hold it.
        assert await _ask(url)
        await asyncio.sleep(0.2)
        closed = [_closed_by_server(s) for s in socks]
        # The longest idle went first: the earliest opened are closed, the latest still open.
        assert sum(closed) >= idle - cap
        assert all(closed[:40]), closed[:40]
        assert not any(closed[-10:]), closed[-10:]
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/metrics") as r:
                text = await r.text()
        shed = [ln for ln in text.splitlines() if ln.startswith("edgeroute_client_connections_shed_total ")]
        assert shed and float(shed[0].split()[1]) >= 50, shed
    finally:
        for s in socks:
            s.close()
        await _stop(proc)


async def test_serve_raises_the_soft_open_file_limit(start_upstream: Any, tmp_path: Path) -> None:
    """With a soft limit of 256 (hard 4,096) and no cap configured, 600 idle connections
    do not lock a client out: the process raised its soft limit to the hard one."""
    up = await start_upstream()
    serving = await _serve(tmp_path, up, soft=256, hard=4096)
    proc, url, port = serving.proc, serving.url, serving.port
    socks: list[socket.socket] = []
    try:
        line = _open_files_line(proc.pid)
        assert line.split()[3:5] == ["4096", "4096"], line
        socks = await asyncio.to_thread(_open_idle, port, 600)
        started = time.monotonic()
        assert await _ask(url)
        assert time.monotonic() - started < 5
        assert not any(_closed_by_server(s) for s in socks[-100:])
    finally:
        for s in socks:
            s.close()
        await _stop(proc)
