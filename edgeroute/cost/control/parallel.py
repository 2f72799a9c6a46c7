"""A key's requests in flight at once (`limits.max_parallel`): taken at admission, given back
once at settlement, when the answer has been handed to the client (a stream: when it ended, the
client went away or a send timed out), on every path.

The keys that made a managed key share its cap as they share its rate limits: a request takes
a slot of its key and of each key above it that has a `max_parallel`, all or nothing.

This process's count decides first and costs nothing: a key full here is refused without a
round trip, and a request whose key has no cap costs a dict lookup. With `shared_state`
(Redis), or the workers of one `serve --workers N`, a request this process admits also takes a
lease (`edgeroute.leases`, its own sets, `{prefix}:par:{key}`) so the cap holds across the
fleet: with Redis in the admission script, in the same round trip as its rate limits and
budgets (`cost.redis_scripts.ADMIT`), else in one of its own. The leases are renewed while
held, so a process killed with -9 frees its slots within `LEASE_S` (15 s). The store down:
`on_unavailable: open` counts on this process alone (the slots taken meanwhile are leased at
the next renewal, once the store answers), `closed` refuses with 503 (as budgets do).

Refused: 429 `parallel_limit` with `Retry-After: 1`, naming the key's id, never its token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from edgeroute import background
from edgeroute.cost.keys import Identity
from edgeroute.cost.redis_store import Lease
from edgeroute.errors import ProxyError
from edgeroute.leases import RedisLeases, SharedSlots

RETRY_AFTER_S = 1  # a slot frees when any of the key's requests ends: worth asking again soon


def caps(ident: Identity, own: int | None) -> list[tuple[str, int]]:
    """(key id, cap) for each key whose cap a request of `ident` counts against: its own
    (`own`: its limits', or `rate_limits.per_key`'s), then those of the keys that made it."""
    out = [(ident.key, own)] if own else []
    out += [(k, lim.max_parallel) for k, lim in ident.ancestor_limits if lim.max_parallel]
    return out


def refused(key: str, cap: int) -> ProxyError:
    return ProxyError(
        429,
        f"Too many requests in flight for key '{key}': its limit is {cap} at once (max_parallel). "
        "Try again when one of its requests has finished.",
        code="parallel_limit",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class ParallelSlots:
    """The slots held in this process, by key id, and the shared leases behind them.

    `shared` makes the shared slots the first time a cap is taken (a gateway without any
    `max_parallel` opens no store for them). A request takes its slots in two steps: this
    process's count (`count_here`), then the fleet's: leased in the admission script with
    Redis up (`in_script`, then `adopt`), else in a round trip of their own (`lease`)."""

    def __init__(self, shared: Callable[[], SharedSlots] | None) -> None:
        self.local: dict[str, int] = {}
        self._make_shared = shared
        self.shared: SharedSlots | None = None
        self._renew: asyncio.Task[None] | None = None

    def _shared(self) -> SharedSlots | None:
        if self.shared is None and self._make_shared is not None:
            self.shared = self._make_shared()
            self._renew = asyncio.get_running_loop().create_task(self.shared.renew_forever())
        return self.shared

    def count_here(self, wanted: list[tuple[str, int]]) -> list[str]:
        """Counts a slot of each key in `wanted` in this process (all or nothing) and returns
        their ids, to give back with `release`; the 429 of the first key full here."""
        for key, cap in wanted:
            if self.local.get(key, 0) >= cap:
                raise refused(key, cap)
        keys = [k for k, _ in wanted]
        for key in keys:
            self.local[key] = self.local.get(key, 0) + 1
        return keys

    def in_script(self, wanted: list[tuple[str, int]]) -> list[Lease] | None:
        """The leases for the admission script to take, when the slots are shared in Redis."""
        shared = self._shared()
        if shared is None or not isinstance(shared.store, RedisLeases):
            return None
        return [(shared.store.prefix + key, cap, shared.lease_id()) for key, cap in wanted]

    def adopt(self, leases: list[Lease], keys: list[str]) -> None:
        """Holds the leases the admission script took (renewed, given back on `release`)."""
        assert self.shared is not None
        for (_, _, lease), key in zip(leases, keys, strict=True):
            self.shared.adopt(key, lease)

    async def lease(self, wanted: list[tuple[str, int]]) -> bool:
        """Takes the fleet's slots in a round trip of their own (all or nothing): False without
        shared slots. Raises the 429 of the first key the fleet has full, or `StoreUnavailable`
        when the store cannot answer and `on_unavailable` is closed."""
        shared = self._shared()
        if shared is None:
            return False
        leased: list[str] = []
        try:
            for key, cap in wanted:
                if not await shared.claim(key, cap):
                    raise refused(key, cap)
                leased.append(key)
        except BaseException:
            for key in leased:
                shared.release(key)
            raise
        return True

    def unleased(self, keys: list[str]) -> bool:
        """Holds the slots `count_here` counted as the shared slots' too, unleased (the store
        could not answer): leased at their next renewal. False without shared slots."""
        shared = self._shared()
        if shared is None:
            return False
        for key in keys:
            shared.hold_unleased(key)
        return True

    def release(self, keys: list[str], leased: bool) -> None:
        """Gives back the slots `count_here` counted and, when `leased`, their leases (once)."""
        if leased and self.shared is not None:
            for key in keys:
                self.shared.release(key)
        for key in keys:
            left = self.local.get(key, 0) - 1
            if left > 0:
                self.local[key] = left
            else:
                self.local.pop(key, None)

    async def close(self) -> None:
        if self._renew is not None:
            await background.stop(self._renew)
        if self.shared is not None:
            await self.shared.close()
