"""Settlements on their way to Redis: summed per key, sent as one `SETTLE` script at a time.

Under load many requests settle in one round trip, after their answers have gone out.
Deltas Redis never received (it was down: `StoreUnavailable.sent` is False) are carried
into the next batch, sent again once Redis is back: a reservation is released late, never
twice. Managed keys' counts that no settlement carries go within `COUNT_FLUSH_S`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edgeroute.cost.store_errors import StoreUnavailable

RESEND_S = 1.0  # settlements Redis never received are sent again this often while it is down
# Managed keys' counters that no other settlement carried are sent at most this long after
# (`send_later`): under any load one script a tenth of a second, not one per request.
COUNT_FLUSH_S = 0.1


@dataclass(slots=True)
class _Pending:
    """Settlements not yet sent: deltas summed per budget key and per bucket key."""

    # (key, slot) -> [key, rolling, delta, ttl, slot, create]: a rolling budget's slots are
    # fields of one key; create 1 for a managed key's counter (see SETTLE)
    budgets: dict[tuple[str, int], list[Any]] = field(default_factory=dict)
    buckets: dict[str, list[Any]] = field(default_factory=dict)  # key -> [delta, capacity]
    done: asyncio.Future[str | None] | None = None  # an error's name, or None when sent

    def __bool__(self) -> bool:
        return bool(self.budgets or self.buckets)

    def add_budget(self, key: str, rolling: int, delta: int, ttl_s: int, slot: int, create: int) -> None:
        if (have := self.budgets.get((key, slot))) is None:
            self.budgets[(key, slot)] = [key, rolling, delta, ttl_s, slot, create]
        else:
            have[2] += delta
            have[5] |= create

    def add_bucket(self, key: str, delta: float, capacity: int) -> None:
        if (have := self.buckets.get(key)) is None:
            self.buckets[key] = [delta, capacity]
        else:
            have[0] += delta


class Settlements:
    """The deltas waiting for Redis. `send(keys, args)` runs `SETTLE`; `marker` is the store's
    seeded marker, its last key."""

    def __init__(
        self, send: Callable[[list[str], list[Any]], Awaitable[object]], marker: str, resend_unsure: bool = False
    ) -> None:
        self._send = send
        self._marker = marker
        # Also send again what Redis may have applied (a timeout): for additions only, where
        # counting twice errs towards blocking (a reservation given back twice would not).
        self._resend_unsure = resend_unsure
        self._pending = _Pending()
        self._flusher: asyncio.Task[None] | None = None
        self._count_timer: asyncio.TimerHandle | None = None  # sends counts nothing else carried
        self._closing = False

    def add_budget(self, key: str, rolling: int, delta: int, ttl_s: int, slot: int, create: int = 0) -> None:
        """Adds `delta` to budget `key` (a rolling budget's `slot`); `create` 1: a managed key's
        counter, created where missing (see SETTLE)."""
        self._pending.add_budget(key, rolling, delta, ttl_s, slot, create)

    def add_bucket(self, key: str, delta: float, capacity: int) -> None:
        """Takes `delta` more from bucket `key` (gives back when negative)."""
        self._pending.add_bucket(key, delta, capacity)

    async def sent(self) -> None:
        """Waits until the pending settlements (this one among them) are in Redis: one script
        for every request settled since the last one was sent, one script in flight at a time."""
        pending = self._pending
        if not pending:
            return  # nothing to send (all deltas were zero)
        if pending.done is None:
            pending.done = asyncio.get_running_loop().create_future()
        done = pending.done
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        error = await asyncio.shield(done)
        if error is not None:
            raise StoreUnavailable(error)

    def send_later(self) -> None:
        """Sends what is pending with the next batch, or within `COUNT_FLUSH_S`, nobody waiting."""
        if self._flusher is None and self._count_timer is None:
            self._count_timer = asyncio.get_running_loop().call_later(COUNT_FLUSH_S, self._flush_counts)

    def _flush_counts(self) -> None:
        self._count_timer = None
        if self._flusher is None and self._pending and not self._closing:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # settlements of the same loop pass join this batch
            while self._pending:
                batch, self._pending = self._pending, _Pending()
                keys = [v[0] for v in batch.budgets.values()]
                args: list[Any] = [len(keys)]
                for _, rolling, delta, ttl, slot, create in batch.budgets.values():
                    args += [rolling, delta, ttl, slot, create]
                for key, (delta, cap) in batch.buckets.items():
                    keys.append(key)
                    args += [delta, cap]
                keys.append(self._marker)
                if batch.done is None:  # deltas carried over, nobody waiting for them
                    batch.done = asyncio.get_running_loop().create_future()
                try:
                    await self._send(keys, args)
                except StoreUnavailable as e:
                    batch.done.set_result(str(e))
                    if (not e.sent or self._resend_unsure) and not self._closing:
                        # Redis never saw these deltas: they go with the next batch.
                        self._carry_over(batch)
                        await asyncio.sleep(RESEND_S)
                except BaseException:
                    batch.done.set_result("not sent")
                    raise
                else:
                    batch.done.set_result(None)
        finally:
            self._flusher = None

    def forget(self) -> None:
        """Drops what is pending, not sent (counted some other way)."""
        pending, self._pending = self._pending, _Pending()
        if pending.done is not None and not pending.done.done():
            pending.done.set_result(None)

    def _carry_over(self, batch: _Pending) -> None:
        for key, rolling, delta, ttl, slot, create in batch.budgets.values():
            self._pending.add_budget(key, rolling, delta, ttl, slot, create)
        for key, (delta, cap) in batch.buckets.items():
            self._pending.add_bucket(key, delta, cap)

    async def close(self) -> None:
        """Sends the counts still waiting for their timer, then waits (5 s at most) for the
        batch in flight; nothing is carried over after this."""
        if self._count_timer is not None:
            self._count_timer.cancel()
            self._count_timer = None
            if self._flusher is None and self._pending:  # counts still waiting: sent now
                self._flusher = asyncio.get_running_loop().create_task(self._flush())
        self._closing = True
        if self._flusher is not None:
            await asyncio.wait([self._flusher], timeout=5)
