"""How workers read each other's metrics: each serves its own on a private Unix socket.

A scrape of `/metrics` lands on one worker (the kernel picks); that worker asks every
sibling for its own exposition over the socket in the run directory (mode 0600, only the
server's user) and merges them (`merge.py`). A sibling that does not answer within
`PEER_TIMEOUT_S` (restarting, stuck) is left out of that scrape and counted as down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from edgeroute.workers.worker import Worker, die_with_parent

PEER_TIMEOUT_S = 2.0
OWN_PATH = "/metrics/own"


async def serve_own(worker: Worker, render: Callable[[], Awaitable[bytes]]) -> web.AppRunner:
    """Serves this worker's own metrics on its socket until the runner is cleaned up."""

    async def own(_: web.Request) -> web.Response:
        return web.Response(body=await render(), content_type="text/plain")

    app = web.Application()
    app.router.add_get(OWN_PATH, own)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    path = worker.socket(worker.id)
    path.unlink(missing_ok=True)
    await web.UnixSite(runner, str(path)).start()
    os.chmod(path, 0o600)
    return runner


async def _fetch(path: str) -> bytes | None:
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        conn = aiohttp.UnixConnector(path=path)
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            async with s.get(f"http://worker{OWN_PATH}") as r:
                if r.status == 200:
                    return await r.read()
    return None


async def siblings(worker: Worker) -> dict[int, bytes | None]:
    """Every other worker's own exposition (None: it did not answer)."""
    others = [i for i in range(worker.count) if i != worker.id]
    bodies = await asyncio.gather(*(_fetch(str(worker.socket(i))) for i in others))
    return dict(zip(others, bodies, strict=True))


async def join(worker: Worker, render: Callable[[], Awaitable[bytes]]) -> web.AppRunner:
    """Called once the worker listens: serves its own metrics to its siblings, then tells
    the supervisor it is ready. Returns the metrics runner, to clean up after the drain."""
    die_with_parent()
    runner = await serve_own(worker, render)
    worker.ready_file(worker.id).write_text(str(os.getpid()))
    return runner
