"""An attempt's timer, and a relayed stream's: `asyncio.timeout_at`'s behaviour, cheaper, on a
loop already known.

`asyncio.timeout` asks for the running loop three times (each a getpid() system call on
Python 3.11) and starts a timer of its own: on uvloop a `call_at` and its `cancel` cost
~6 µs (a libuv timer made, started, stopped and closed), once per attempt, though nearly
every attempt ends long before its deadline. Here the deadlines of a loop share one timer
(`_Timers`): a deadline is an entry in a heap, and the timer is armed for the earliest; an
attempt that ends marks its entry dead (the heap is rebuilt without them once they are
most of it), so the timer is rarely moved.

What a caller sees is the same: at `when` (the same timer resolution: the loop's) the task
is cancelled; the `CancelledError` leaving the block becomes `TimeoutError` (chained to it),
unless the task was also cancelled from elsewhere meanwhile (a lost hedge, a client gone),
which then propagates as the cancellation it is. `reschedule` moves the deadline while
inside the block; a deadline already past fires on the loop's next iteration.
`tests/test_dispatch_deadline.py` runs the cases under both.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from types import TracebackType
from typing import Any

_REBUILD_AT = 64  # dead entries before the heap may be rebuilt without them (when they are most of it)


class _Timers:
    """One loop's deadlines: a heap of [when, seq, deadline or None when dead] and one timer."""

    __slots__ = ("_armed", "_armed_at", "_dead", "_heap", "_loop", "_seq")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._dead = 0
        self._armed: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def add(self, when: float, deadline: Deadline) -> list[Any]:
        entry = [when, next(self._seq), deadline]
        heapq.heappush(self._heap, entry)
        if self._armed is None or when < self._armed_at:
            self._arm(when)
        return entry

    def drop(self, entry: list[Any]) -> None:
        entry[2] = None
        self._dead += 1
        if self._dead >= _REBUILD_AT and 2 * self._dead > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._dead = 0

    def _arm(self, when: float) -> None:
        if self._armed is not None:
            self._armed.cancel()
        self._armed = self._loop.call_at(when, self._fire)
        self._armed_at = when

    def _fire(self) -> None:
        self._armed = None
        # Due: what the timer was armed for (the loop may round its wake-up a little early).
        heap, due = self._heap, max(self._loop.time(), self._armed_at)
        while heap and (heap[0][2] is None or heap[0][0] <= due):
            deadline: Deadline | None = heapq.heappop(heap)[2]
            if deadline is None:
                self._dead -= 1
            else:
                deadline._on_timeout()
        if heap:
            self._arm(heap[0][0])


_TIMERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Timers] = weakref.WeakKeyDictionary()


def _timers(loop: asyncio.AbstractEventLoop) -> _Timers:
    t = _TIMERS.get(loop)
    if t is None:
        t = _TIMERS[loop] = _Timers(loop)
    return t


class Deadline:
    __slots__ = ("_cancelling", "_entry", "_expired", "_handle", "_loop", "_task", "_timers", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._loop = loop
        self._when = when
        self._timers = _timers(loop)
        self._entry: list[Any] | None = None  # in the loop's shared timer
        self._handle: asyncio.Handle | None = None  # a deadline already past: the next iteration
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False

    def when(self) -> float:
        return self._when

    def expired(self) -> bool:
        return self._expired

    def reschedule(self, when: float) -> None:
        """The deadline moved to `when` (loop time; one past fires on the next iteration)."""
        if not self._disarm():  # not entered, expired, or exited
            raise RuntimeError("a deadline is moved only inside its block, before it expires")
        self._arm(when)

    def _arm(self, when: float) -> None:
        self._when = when
        if when <= self._loop.time():
            self._handle = self._loop.call_soon(self._on_timeout)
        else:
            self._entry = self._timers.add(when, self)

    def _disarm(self) -> bool:
        """Takes the deadline off its timer; False when it was on none."""
        if self._entry is not None:
            self._timers.drop(self._entry)
            self._entry = None
            return True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            return True
        return False

    # A plain `with` in a coroutine (the attempt's): entering and leaving await nothing, and
    # `async with` made and ran two coroutines an attempt for that. `async with` does the same.
    def __enter__(self) -> Deadline:
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("a deadline is used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._arm(self._when)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._disarm()
        if self._expired and self._task is not None:
            # Ours alone (no other cancel asked meanwhile): the block ran out of time.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    async def __aenter__(self) -> Deadline:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def _on_timeout(self) -> None:
        assert self._task is not None
        self._task.cancel()
        self._expired = True
        self._entry = self._handle = None
