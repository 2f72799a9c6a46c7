"""Background work: threads run at a lower CPU priority than the event loop, and background
tasks end when stopped.

The ledger's writer and the span builder do their work in threads of the proxy's process.
When one of them and the event loop are ready to run on the same core (always so when the
proxy is pinned to one), the kernel would give each its time slice in turn, and a request
that arrives during the writer's slice waits for it: milliseconds, straight into the p99.
At a lower priority the loop runs first whenever it is ready, and the writer takes the
time the loop leaves, which at any sustainable load is most of it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

# Added to the process's nice value (Linux: per thread). 10 gives a thread about a tenth of a
# contended core's time: the writer still keeps up when the loop is busy.
NICE = 10


def lower_priority() -> None:
    """Lowers the calling thread's scheduling priority (a no-op where that cannot be done)."""
    if not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
    except OSError:  # not permitted, or threads share one priority on this platform
        pass


async def stop(*tasks: asyncio.Task[Any]) -> None:
    """Cancels `tasks` and waits until they have ended, cancelling again any that ran on.

    Python 3.11's `asyncio.wait_for` returns its inner call's result when a cancellation
    arrives just as that call completes, and the cancelled task carries on: redis-py writes
    every command through it when a socket timeout is set, so a loop of Redis calls swallows
    a cancel() now and then (most of the time when cancelled mid-command), and one `await`
    after one `cancel()` would wait for ever (a shutdown that hangs)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for t in tasks:  # as `await` would: a task that failed (rather than ended) raises here
        if not t.cancelled() and (e := t.exception()) is not None:
            raise e
