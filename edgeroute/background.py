"""Background threads run at a lower CPU priority than the event loop.

The ledger's writer and the span builder do their work in threads of the proxy's process.
When one of them and the event loop are ready to run on the same core (always so when the
proxy is pinned to one), the kernel would give each its time slice in turn, and a request
that arrives during the writer's slice waits for it: milliseconds, straight into the p99.
At a lower priority the loop runs first whenever it is ready, and the writer takes the
time the loop leaves, which at any sustainable load is most of it.
"""

from __future__ import annotations

import os
import threading

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
