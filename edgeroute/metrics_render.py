"""One `/metrics` render shared by the scrapes that ask for it, formatted off the event loop.

A scrape formatted every series on the loop (40 ms for 3,000 series): 20 clients looping on
`/metrics` held every request for seconds. Now a render reads the numbers on the loop (a copy
of the counters' tables and the state gauges: a fraction of a millisecond) and formats the text
in a thread of its own, which the loop takes the GIL back from within the switch interval
(`looplag.SWITCH_INTERVAL_S`).

Every scrape is answered by a render that began after it arrived (what it shows is never older
than the scrape), and the scrapes that arrive together share it. A render begins at least
`GAP_FACTOR` times the previous one's duration after that one ended (at most `GAP_MAX_S`): a
scrape waits for that gap, so however many clients loop on `/metrics`, renders take about a
tenth of the time at most, and each client gets at most one answer a gap.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from edgeroute.background import lower_priority

GAP_FACTOR = 10
GAP_MAX_S = 1.0
# Fast enough to stay small off the loop: level 1 is 4x faster than 6 and within 20% of its size.
GZIP_LEVEL = 1

T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None


async def in_thread(fn: Callable[[], T]) -> T:
    """`fn()` run on the renders' own thread (one: renders wait for each other, not for the
    loop's default executor, which DNS lookups and file reads share)."""
    global _pool
    if _pool is None:
        # At a lower priority: with the GIL shared, the loop wins the CPU when both want it.
        _pool = ThreadPoolExecutor(1, thread_name_prefix="metrics-render", initializer=lower_priority)
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
    """The render being made, and the next one, which every scrape that arrives meanwhile awaits."""

    def __init__(self) -> None:
        self._making: asyncio.Future[Body] | None = None
        self._next: asyncio.Future[Body] | None = None
        self._not_before = 0.0  # when the gap after the last render ends
        self.made = 0  # renders made (for tests: N concurrent scrapes make one)

    async def get(self, make: Callable[[], Awaitable[bytes]], paced: bool = True) -> Body:
        """A render begun after now (`paced=False`: without waiting for the gap, where the caller
        is paced already)."""
        if self._next is None:
            self._next = asyncio.ensure_future(self._after_the_gap(make, paced))
            # A render whose scrapers all went away: its outcome is nobody's to read.
            self._next.add_done_callback(lambda t: t.cancelled() or t.exception())
        # Shielded: a scraper that goes away does not cancel the others' render.
        return await asyncio.shield(self._next)

    async def _after_the_gap(self, make: Callable[[], Awaitable[bytes]], paced: bool) -> Body:
        if self._making is not None:
            await asyncio.wait([self._making])
        if paced and (gap := self._not_before - time.monotonic()) > 0:
            await asyncio.sleep(gap)
        # From here the numbers are read (`make` reads them before it first awaits): a scrape that
        # arrives now waits for the render after this one.
        self._making, self._next = self._next, None
        started = time.monotonic()
        try:
            body = Body(await make())
            self.made += 1
            return body
        finally:
            now = time.monotonic()
            self._not_before = now + min(GAP_MAX_S, GAP_FACTOR * (now - started))
            self._making = None
