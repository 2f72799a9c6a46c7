"""One `/metrics` render shared by the scrapes that ask for it, formatted off the event loop.

A scrape formatted every series on the loop (40 ms for 3,000 series): 20 clients looping on
`/metrics` held every request for seconds. Now a render reads the numbers on the loop (a copy
of the counters' tables and the state gauges: a fraction of a millisecond) and formats the text
in a thread of its own, which the loop takes the GIL back from within the switch interval
(`looplag.SWITCH_INTERVAL_S`). Scrapes that arrive while a render is made wait for it, and a
finished render also answers the scrapes that arrive within `REUSE_FACTOR` times the time it
took (at most `REUSE_MAX_S`): however many clients loop on `/metrics`, renders take about a
tenth of the time at most, and what a scrape shows is at most that old.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

REUSE_FACTOR = 10
REUSE_MAX_S = 1.0
# Fast enough to stay small off the loop: level 1 is 4x faster than 6 and within 20% of its size.
GZIP_LEVEL = 1

T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None


async def in_thread(fn: Callable[[], T]) -> T:
    """`fn()` run on the renders' own thread (one: renders wait for each other, not for the
    loop's default executor, which DNS lookups and file reads share)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="metrics-render")
    return await asyncio.get_running_loop().run_in_executor(_pool, fn)


class Body:
    """A render's exposition, and the same gzipped (made once, off the loop, when first asked for)."""

    __slots__ = ("_gzipped", "text")

    def __init__(self, text: bytes) -> None:
        self.text = text
        self._gzipped: asyncio.Future[bytes] | None = None

    async def gzipped(self) -> bytes:
        if self._gzipped is None:  # the scrapes that share the render share its compression too
            self._gzipped = asyncio.ensure_future(in_thread(lambda: gzip.compress(self.text, GZIP_LEVEL, mtime=0)))
        return await asyncio.shield(self._gzipped)


class Renders:
    """The last render, reused for a window, and the one being made, awaited by every scrape
    that arrives meanwhile."""

    def __init__(self) -> None:
        self._last: Body | None = None
        self._fresh_until = 0.0
        self._making: asyncio.Task[Body] | None = None
        self.made = 0  # renders made (for tests: N concurrent scrapes make one)

    async def get(self, make: Callable[[], Awaitable[bytes]]) -> Body:
        if self._last is not None and time.monotonic() < self._fresh_until:
            return self._last
        if self._making is None:
            self._making = asyncio.ensure_future(self._make(make))
            # A render whose scrapers all went away: its outcome is nobody's to read.
            self._making.add_done_callback(lambda t: t.cancelled() or t.exception())
        # Shielded: a scraper that goes away does not cancel the others' render.
        return await asyncio.shield(self._making)

    async def _make(self, make: Callable[[], Awaitable[bytes]]) -> Body:
        started = time.monotonic()
        try:
            body = Body(await make())
            now = time.monotonic()
            self._last, self._fresh_until = body, now + min(REUSE_MAX_S, REUSE_FACTOR * (now - started))
            self.made += 1
            return body
        finally:
            self._making = None
