"""Per-deployment capacity: requests in flight against `max_concurrency`, a bounded wait for
a free slot (`max_queue` waiters, each for at most `queue_timeout_ms`), and who gets a slot
when one frees up.

The counts live in the core (`Router.acquire`/`release`), whose selection passes over a
deployment without room for the request's priority class; this module owns the queue. A
freed slot is handed straight to a waiter, never left for a newcomer to take: the highest
class first, then the key that was served least recently within that class (no key starves
the others), then the earliest. A newcomer does not jump a queue that holds a waiter of its
class or above. Only the highest class may use a deployment's `reserve_percent`.

The failover policy skips a full deployment as it skips an open circuit, but a full
deployment's health is untouched: being busy is not failing. A slot is taken when an
attempt starts and given back when its answer has been read (for a stream, when the relay
ends). Counts are per process (and kept across reloads for unchanged deployments); with
shared capacity (`capacity_share`) a request this process admits also takes a lease that
every process sees, and a deployment whose lease is refused is passed over as full.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgeroute.errors import ProxyError
from edgeroute.headers import PRIORITY

if TYPE_CHECKING:
    from edgeroute._core import Router
    from edgeroute.leases import SharedSlots

POLL_S = 0.05  # with shared capacity, the head of a line asks the fleet's count this often

_seq = itertools.count()


@dataclass(slots=True)
class _Waiter:
    queue: int  # the deployment whose queue it waits in
    wanted: tuple[int, ...]  # a slot on any of these will do, in the plan's order
    rank: int  # priority class (0: highest)
    key: str  # the caller's key, for fairness within a class
    wake: asyncio.Future[int]  # the deployment whose slot it was handed
    seq: int = field(default_factory=lambda: next(_seq))


class Capacity:
    """Slots per deployment index; `None` limits mean unbounded (and cost nothing)."""

    def __init__(
        self,
        router: Router,
        limits: Sequence[int | None],
        queues: Sequence[int],
        queue_timeouts: Sequence[float],
        names: Sequence[str] = (),
        reserve_percents: Sequence[int] = (),
    ) -> None:
        self.router = router
        self.limits = list(limits)
        self.names = list(names)  # deployment names: shared leases are kept by name, across reloads
        # Slots only the highest class may use (as the core rounds them).
        self.reserved = [(lim or 0) * min(p, 100) // 100 for lim, p in zip(self.limits, reserve_percents, strict=False)]
        self.shared: SharedSlots | None = None  # set when capacity is shared (capacity_share)
        self._poller: asyncio.Task[None] | None = None
        self.queues = list(queues)
        self.queue_timeouts = list(queue_timeouts)  # seconds
        self.bounded = any(lim is not None for lim in self.limits)
        self._waiters: list[_Waiter] = []
        self._served: dict[str, int] = {}  # key -> sequence number of its last handed slot
        self._handed = itertools.count()

    def active(self, index: int) -> int:
        return self.router.slots(index)[0] if self.limits[index] is not None else 0

    def full(self, index: int, rank: int) -> bool:
        """Whether a new request of class `rank` finds no slot: none free for its class, or
        waiters of its class or above are first in line."""
        if self.limits[index] is None:
            return False
        if not self.router.has_room(index, rank):
            return True
        return any(index in w.wanted and w.rank <= rank for w in self._waiters)

    def take(self, index: int) -> None:
        if self.limits[index] is not None:
            self.router.acquire(index)

    def limit_for(self, index: int, rank: int) -> int:
        """The slots a request of class `rank` may fill (all but the reserve below the top class)."""
        lim = self.limits[index] or 0
        return lim if rank == 0 else lim - (self.reserved[index] if index < len(self.reserved) else 0)

    async def claim(self, index: int, rank: int) -> bool:
        """With shared capacity: a lease on `index` for a request this process's count admits
        (False: the fleet has it full). Without, or for an unbounded deployment: True."""
        if self.shared is None or self.limits[index] is None:
            return True
        return await self.shared.claim(self.names[index], self.limit_for(index, rank))

    def unclaim(self, index: int) -> None:
        """Gives back a lease `claim` took for an attempt that was never made."""
        if self.shared is not None and self.limits[index] is not None:
            self.shared.release(self.names[index])

    def _line(self, index: int) -> list[_Waiter]:
        return sorted(
            (w for w in self._waiters if index in w.wanted and not w.wake.done()),
            key=lambda w: (w.rank, self._served.get(w.key, -1), w.seq),
        )

    def release(self, index: int) -> None:
        """Gives a slot back, or hands it (and its shared lease) to the first waiter in line
        whose class may use it."""
        if self.limits[index] is None:
            return
        self.router.release(index)
        for w in self._line(index):
            if self.router.has_room(index, w.rank):  # a class below the top may not use the reserve
                self.router.acquire(index)
                self._served[w.key] = next(self._handed)
                w.wake.set_result(index)
                return
        self.unclaim(index)

    def waiting(self, queue: int) -> int:
        return sum(1 for w in self._waiters if w.queue == queue)

    async def wait(
        self, queue: int, wanted: Sequence[int], deadline: float, rank: int = 0, key: str = ""
    ) -> int | None:
        """Waits in `queue`'s line for a slot on one of `wanted`; returns the deployment whose
        slot it was handed (already taken for the caller, who must use or release it), or
        None at once when the line is full and at the deadline otherwise."""
        if self.queues[queue] <= self.waiting(queue):
            return None
        loop = asyncio.get_running_loop()
        w = _Waiter(queue, tuple(wanted), rank, key, loop.create_future())
        self._waiters.append(w)
        if self.shared is not None and (self._poller is None or self._poller.done()):
            self._poller = loop.create_task(self._poll())
        got: int | None = None
        try:
            async with asyncio.timeout_at(deadline):
                got = await w.wake
            return got
        except TimeoutError:
            return None
        finally:
            self._waiters.remove(w)
            if got is None and w.wake.done() and not w.wake.cancelled():
                self.release(w.wake.result())  # handed a slot as its deadline passed: pass it on
            if len(self._served) > 4096:  # bounded: forgetting old turns only resets fairness
                self._served.clear()

    async def _poll(self) -> None:
        """With shared capacity, while requests wait here: every POLL_S, the first in line for
        each deployment with room in this process asks the fleet's count (a slot freed in
        another process is not pushed to this one)."""
        while self._waiters:
            await asyncio.sleep(POLL_S)
            for index in sorted({i for w in self._waiters for i in w.wanted}):
                line = self._line(index)
                if not line or not self.router.has_room(index, line[0].rank):
                    continue
                w = line[0]
                if not await self.claim(index, w.rank):
                    continue
                if w.wake.done():  # handed a slot meanwhile, or gone: this lease is not needed
                    self.unclaim(index)
                    continue
                self.router.acquire(index)
                self._served[w.key] = next(self._handed)
                w.wake.set_result(index)


def class_name(classes: Sequence[str], rank: int) -> str:
    """The name of the class at `rank` (the core's decision gives ranks)."""
    return classes[rank] if rank < len(classes) else "default"


def spill_note(classes: Sequence[str], rank: int, spilled: Sequence[str]) -> str:
    """What `x-edgeroute-explain` adds when a request was passed over full deployments."""
    return f"; spillover: {', '.join(spilled)} at capacity for class {class_name(classes, rank)}"


def unknown_class(name: str, classes: Sequence[str]) -> str:
    """The error for a class name no class has (a client's value: cut short, printable)."""
    shown = name[:40].encode("ascii", "backslashreplace").decode("ascii")
    return f"unknown priority class '{shown}' (classes: {', '.join(classes)})"


def class_ceiling(own: str | None, allowed: frozenset[str], default: str, classes: Sequence[str]) -> str:
    """The highest class a key may use: its own (else the default) or one it may ask for. A
    rule triggered by what the client chooses (tags, content) cannot raise it further."""
    best = own or default
    if allowed:
        best = min((best, *allowed), key=lambda c: classes.index(c) if c in classes else len(classes))
    return best


def request_class(
    asked: str | None, own: str | None, allowed: frozenset[str] | None, classes: Sequence[str]
) -> str | None:
    """The class a caller asks for: the `x-edgeroute-priority` header (`asked`) when its key
    may use it, else the key's own class (`own`). `allowed` is None without virtual keys (any
    class may be asked for). 400 for a class that does not exist, 403 for one the key may not use."""
    if asked is None:
        return own
    asked = asked.strip()
    if asked not in classes:
        raise ProxyError(
            400, f"x-edgeroute-priority: {unknown_class(asked, classes)}.", code="invalid_priority", param=PRIORITY
        )
    if allowed is not None and asked != own and asked not in allowed:
        raise ProxyError(403, f"This key may not use priority class '{asked}'.", code="priority_not_allowed")
    return asked
