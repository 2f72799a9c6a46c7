"""Per-deployment capacity: requests in flight against `max_concurrency`, and a bounded
wait for a free slot (`max_queue` waiters, each for at most `queue_timeout_ms`).

The failover policy skips a full deployment as it skips an open circuit, but a full
deployment's health is untouched: being busy is not failing. A slot is taken when an
attempt starts and given back when its answer has been read (for a stream, when the
relay ends). Counts are per process: with several workers or instances each enforces
its own share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class _Waiter:
    queue: int  # the deployment whose queue it waits in
    wanted: frozenset[int]  # a slot on any of these will do
    wake: asyncio.Future[None]


class Capacity:
    """Slots per deployment index; `None` limits mean unbounded."""

    def __init__(self, limits: Sequence[int | None], queues: Sequence[int], queue_timeouts: Sequence[float]) -> None:
        self.limits = list(limits)
        self.queues = list(queues)
        self.queue_timeouts = list(queue_timeouts)  # seconds
        self.in_flight = [0] * len(self.limits)
        self.bounded = any(lim is not None for lim in self.limits)
        self._waiters: list[_Waiter] = []

    def full(self, index: int) -> bool:
        limit = self.limits[index]
        return limit is not None and self.in_flight[index] >= limit

    def take(self, index: int) -> None:
        self.in_flight[index] += 1

    def release(self, index: int) -> None:
        self.in_flight[index] -= 1
        for w in self._waiters:
            if index in w.wanted and not w.wake.done():
                w.wake.set_result(None)
                return

    def waiting(self, queue: int) -> int:
        return sum(1 for w in self._waiters if w.queue == queue)

    async def wait(self, queue: int, wanted: Sequence[int], deadline: float) -> bool:
        """Waits in `queue`'s line until a slot on one of `wanted` frees up (True), or
        returns False at once when the line is full and at the deadline otherwise. A
        woken waiter must still find the slot free: a newcomer may have taken it."""
        if self.queues[queue] <= self.waiting(queue):
            return False
        loop = asyncio.get_running_loop()
        w = _Waiter(queue, frozenset(wanted), loop.create_future())
        self._waiters.append(w)
        try:
            async with asyncio.timeout_at(deadline):
                await w.wake
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.remove(w)
