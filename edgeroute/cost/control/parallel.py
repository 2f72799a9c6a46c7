"""A key's requests in flight at once (`limits.max_parallel`): taken at admission, given back
once at settlement, when the answer has been handed to the client (a stream: when it ended, the
client went away or a send timed out), on every path.

The keys that made a managed key share its cap as they share its rate limits: a request takes
a slot of its key and of each key above it that has a `max_parallel`, all or nothing.

This process's count decides first and costs nothing: a key full here is refused without a
round trip, and a request whose key has no cap costs a dict lookup. With `shared_state`
(Redis), or the workers of one `serve --workers N`, a request this process admits also takes a
lease (`edgeroute.leases`, its own sets, `{prefix}:par:{key}`) so the cap holds across the
fleet; the leases are renewed while held, so a process killed with -9 frees its slots within
`LEASE_S` (15 s). The store down: `on_unavailable: open` counts on this process alone, `closed`
refuses with 503 (as budgets do).

Refused: 429 `parallel_limit` with `Retry-After: 1`, naming the key's id, never its token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from edgeroute import background
from edgeroute.config import Limit
from edgeroute.cost.keys import Identity
from edgeroute.errors import ProxyError
from edgeroute.leases import SharedSlots

RETRY_AFTER_S = 1  # a slot frees when any of the key's requests ends: worth asking again soon


def caps(ident: Identity, own: Limit | None) -> list[tuple[str, int]]:
    """(key id, cap) for each key whose cap a request of `ident` counts against: its own
    (`own`: its limits, or `rate_limits.per_key`), then those of the keys that made it."""
    out = [(ident.key, own.max_parallel)] if own is not None and own.max_parallel else []
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
    `max_parallel` opens no store for them)."""

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

    async def take(self, wanted: list[tuple[str, int]]) -> list[str]:
        """Takes a slot of each key in `wanted` (all or nothing) and returns their ids, to give
        back with `release`. Raises the 429 of the first key at its cap, or `StoreUnavailable`
        when the shared store cannot answer and `on_unavailable` is closed."""
        for key, cap in wanted:
            if self.local.get(key, 0) >= cap:
                raise refused(key, cap)
        keys = [k for k, _ in wanted]
        for key in keys:  # counted before the round trip: this process's next request sees it
            self.local[key] = self.local.get(key, 0) + 1
        shared = self._shared()
        if shared is None:
            return keys
        leased: list[str] = []
        try:
            for key, cap in wanted:
                if not await shared.claim(key, cap):
                    raise refused(key, cap)
                leased.append(key)
        except BaseException:
            for key in leased:
                shared.release(key)
            self._uncount(keys)
            raise
        return keys

    def release(self, keys: list[str]) -> None:
        """Gives back the slots `take` returned (call once)."""
        if self.shared is not None:
            for key in keys:
                self.shared.release(key)
        self._uncount(keys)

    def _uncount(self, keys: list[str]) -> None:
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
