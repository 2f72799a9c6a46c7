"""Settlements on their way to Redis: summed per key, sent as one `SETTLE` script at a time.

Under load many requests settle in one round trip, after their answers have gone out.
Deltas Redis never received (it was down: `StoreUnavailable.sent` is False) are carried
into the next batch, sent again once Redis is back: a reservation is released late, never
twice. Managed keys' counts that no settlement carries go within `COUNT_FLUSH_S`.

Deltas are summed per key and per generation of the counters their reservations were made in
(`redis_scripts`); each request's part is kept beside the sum, so that a sum Redis finds stale
(it restarted empty and was seeded again meanwhile) is sent again request by request
(`SETTLE_STALE`): one more round trip, only after a seed. A sum of reservations that Redis
receives while it holds no budgets (it restarted empty, not seeded yet) is held, carried into
the next batch once Redis is seeded again, where it is stale.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from edgeroute.cost.store_errors import StoreUnavailable

RESEND_S = 1.0  # settlements Redis never received are sent again this often while it is down
# Managed keys' counters that no other settlement carried are sent at most this long after
# (`send_later`): under any load one script a tenth of a second, not one per request.
COUNT_FLUSH_S = 0.1


# A stale delta sent request by request: key, rolling, delta, ttl, slot, request id.
Stale = tuple[str, int, int, int, int, str]


@dataclass(slots=True)
class _Pending:
    """Settlements not yet sent: deltas summed per budget key and per bucket key."""

    # (key, slot, generation) -> [key, rolling, delta, ttl, slot, create, generation, parts]: a
    # rolling budget's slots are fields of one key; create 1 for a managed key's counter (see
    # SETTLE); generation '' for a delta of no reservation; parts: (request id, delta) each
    budgets: dict[tuple[str, int, str], list[Any]] = field(default_factory=dict)
    buckets: dict[str, list[Any]] = field(default_factory=dict)  # key -> [delta, capacity]
    done: asyncio.Future[str | None] | None = None  # an error's name, or None when sent

    def __bool__(self) -> bool:
        return bool(self.budgets or self.buckets)

    def add_budget(
        self, key: str, rolling: int, delta: int, ttl_s: int, slot: int, create: int, gen: str, request_id: str
    ) -> None:
        if (have := self.budgets.get((key, slot, gen))) is None:
            have = self.budgets[(key, slot, gen)] = [key, rolling, delta, ttl_s, slot, create, gen, []]
        else:
            have[2] += delta
            have[5] |= create
        if gen:
            have[7].append((request_id, delta))

    def stale(self, indices: list[int]) -> tuple[_Pending, list[Stale]]:
        """The budget entries `SETTLE` did not apply (1-based), as a batch and request by request."""
        left, parts = _Pending(), []
        entries = list(self.budgets.items())
        for i in indices:
            where, have = entries[int(i) - 1]
            left.budgets[where] = have
            key, rolling, _, ttl, slot = have[:5]
            parts += [(key, rolling, delta, ttl, slot, request_id) for request_id, delta in have[7]]
        return left, parts

    def add_bucket(self, key: str, delta: float, capacity: int) -> None:
        if (have := self.buckets.get(key)) is None:
            self.buckets[key] = [delta, capacity]
        else:
            have[0] += delta


def _left_of(answer: Any, entries: int) -> list[int]:
    """`SETTLE`'s answer, checked: nothing, or 1 (stale) or 0 (held) then the 1-based indices of
    budget entries it did not apply, each once, in order. Anything else (a Redis that is not
    one, a proxy in the way) is an answer of unknown effect: as a timeout, not sent again. (An
    index 0 read as the last entry had one applied delta sent again, counted twice.)"""
    if answer == []:
        return []
    if isinstance(answer, list) and all(type(i) is int for i in answer) and answer[0] in (0, 1):
        indices = answer[1:]
        if indices and 0 < indices[0] and indices[-1] <= entries and all(a < b for a, b in pairwise(indices)):
            return answer
    raise StoreUnavailable(f"Redis answered SETTLE with {str(answer)[:80]!r}, not its indices")


class Settlements:
    """The deltas waiting for Redis. `send(keys, args)` runs `SETTLE` and answers the entries
    it did not apply (see SETTLE): stale ones `send_stale` sends request by request, held ones
    wait for `refilled` (Redis seeded again) and go with the next batch; `marker` is the
    store's seeded marker, its last key."""

    def __init__(
        self,
        send: Callable[[list[str], list[Any]], Awaitable[list[int]]],
        send_stale: Callable[[list[Stale]], Awaitable[None]],
        refilled: Callable[[], Awaitable[None]],
        marker: str,
        resend_unsure: bool = False,
    ) -> None:
        self._send = send
        self._send_stale = send_stale
        self._refilled = refilled
        self._marker = marker
        # Also send again what Redis may have applied (a timeout): for additions only, where
        # counting twice errs towards blocking (a reservation given back twice would not).
        self._resend_unsure = resend_unsure
        self._pending = _Pending()
        self._flusher: asyncio.Task[None] | None = None
        self._count_timer: asyncio.TimerHandle | None = None  # sends counts nothing else carried
        self._closing = False

    def add_budget(
        self,
        key: str,
        rolling: int,
        delta: int,
        ttl_s: int,
        slot: int,
        create: int = 0,
        gen: str = "",
        request_id: str = "",
    ) -> None:
        """Adds `delta` to budget `key` (a rolling budget's `slot`); `create` 1: a managed key's
        counter, created where missing (see SETTLE); `gen`: the generation of the counters
        request `request_id` reserved in ('': a delta of no reservation)."""
        self._pending.add_budget(key, rolling, delta, ttl_s, slot, create, gen, request_id)

    def add_bucket(self, key: str, delta: float, capacity: int) -> None:
        """Takes `delta` more from bucket `key` (gives back when negative)."""
        self._pending.add_bucket(key, delta, capacity)

    async def sent(self) -> None:
        """Waits until the pending settlements (this one among them) are in Redis, or held there
        for its refill (see SETTLE): one script for every request settled since the last one was
        sent, one script in flight at a time."""
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
                for _, rolling, delta, ttl, slot, create, gen, _ in batch.budgets.values():
                    args += [rolling, delta, ttl, slot, create, gen]
                for key, (delta, cap) in batch.buckets.items():
                    keys.append(key)
                    args += [delta, cap]
                keys.append(self._marker)
                if batch.done is None:  # deltas carried over, nobody waiting for them
                    batch.done = asyncio.get_running_loop().create_future()
                unsent, held = batch, False  # what Redis has not applied yet
                try:
                    if left := _left_of(await self._send(keys, args), len(batch.budgets)):
                        unsent, parts = batch.stale(left[1:])
                        if left[0]:
                            await self._send_stale(parts)
                        elif not self._closing:  # Redis holds no budgets: the refill decides
                            self._carry_over(unsent)
                            held = True
                except StoreUnavailable as e:
                    batch.done.set_result(str(e))
                    if (not e.sent or self._resend_unsure) and not self._closing:
                        # Redis never saw these deltas: they go with the next batch.
                        self._carry_over(unsent)
                        await asyncio.sleep(RESEND_S)
                except BaseException:
                    batch.done.set_result("not sent")
                    raise
                else:
                    batch.done.set_result(None)
                    if held:
                        await self._wait_refilled()
        finally:
            self._flusher = None

    async def _wait_refilled(self) -> None:
        """Waits for Redis to be seeded again (this instance reads the ledger back into it if no
        other does first); failing that, sends the held deltas again in `RESEND_S`."""
        try:
            await self._refilled()
        except StoreUnavailable:
            await asyncio.sleep(RESEND_S)

    def idle(self) -> bool:
        """Whether nothing is pending nor being sent."""
        return not self._pending and self._flusher is None

    def forget(self) -> None:
        """Drops what is pending, not sent (counted some other way)."""
        pending, self._pending = self._pending, _Pending()
        if pending.done is not None and not pending.done.done():
            pending.done.set_result(None)

    def _carry_over(self, batch: _Pending) -> None:
        for key, rolling, delta, ttl, slot, create, gen, parts in batch.budgets.values():
            for request_id, part in parts or [("", delta)]:
                self._pending.add_budget(key, rolling, part, ttl, slot, create, gen, request_id)
        for key, (delta, cap) in batch.buckets.items():
            self._pending.add_bucket(key, delta, cap)

    async def close(self, within: float = 5.0) -> None:
        """Sends the counts still waiting for their timer, then waits (`within` seconds at most)
        for the batch in flight; nothing is carried over after this."""
        if self._count_timer is not None:
            self._count_timer.cancel()
            self._count_timer = None
            if self._flusher is None and self._pending:  # counts still waiting: sent now
                self._flusher = asyncio.get_running_loop().create_task(self._flush())
        self._closing = True
        if self._flusher is not None:
            await asyncio.wait([self._flusher], timeout=within)
