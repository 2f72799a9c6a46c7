"""A deployment's capacity shared by every process that serves it: the instances that share
Redis (`shared_state`), or the workers of one `serve --workers N` without it (a SQLite file
in the supervisor's run directory). `max_concurrency` then bounds the fleet, not each process.

Each slot is a lease (`edgeroute.leases`): a member of one set per deployment, with an
expiry, taken in one round trip when under the limit for the request's class, given back off
the request path, renewed in the background, so the slots of a process killed with -9 come
back by themselves within `LEASE_S`.

This process's own count (the core's, `Capacity`) still decides first and costs nothing: a
deployment full here is never asked about. A request it admits then takes a lease; refused,
the deployment is passed over as full. A slot freed in another process is not pushed to this
one's queue: the request first in line here asks again every `POLL_S`.

Best effort, and its bounds:
- The store down or slower than `shared_state.timeout_ms`: fail open. Each process still
  holds its own `max_concurrency`, so in flight is at most N x processes; counted in
  `edgeroute_shared_capacity_total{result="unavailable"}`.
- A lease not renewed for `LEASE_S` (the store unreachable that long) expires while its
  request still runs: others may take that slot, an overshoot of at most the leases so lost.
- A killed process's slots stay taken until their leases expire (under, never over, the limit).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from edgeroute import background
from edgeroute.config import Config
from edgeroute.leases import LeaseStore, RedisLeases, SharedSlots, SqliteLeases
from edgeroute.metrics import METRICS
from edgeroute.state import STATE
from edgeroute.workers import worker as workers

SHARED_SLOTS = web.AppKey("shared_slots", SharedSlots)


def install(app: web.Application, config: Config) -> None:
    """Shares capacity with the other instances (`shared_state`) or the sibling workers
    (`serve --workers N`), also when no deployment has a `max_concurrency` yet (a reload may
    set one; an unbounded deployment never takes a lease). Call after METRICS."""
    worker = workers.current()
    store: LeaseStore
    if config.shared_state is not None:
        store = RedisLeases(config.shared_state)
    elif worker is not None and worker.count > 1:
        store = SqliteLeases(worker.dir / "capacity.sqlite")
    else:
        return
    slots = app[SHARED_SLOTS] = SharedSlots(store)
    app[STATE].live.capacity.shared = slots
    app[METRICS].sources.append(slots.metrics)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        renew = asyncio.create_task(slots.renew_forever())
        yield
        await background.stop(renew)
        await slots.close()

    app.cleanup_ctx.append(lifecycle)
