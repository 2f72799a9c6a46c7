"""The ledger writer's CPU, spread out: a batch is written in slices of about `SLICE_S` of CPU,
each followed by a rest as long, so the writer never holds a core for milliseconds on end.

Why: at 1,000 req/s a batch is about 450 records, 15 ms of CPU. Taken at once, it left the
event loop, the client and the upstream one core between them for 15 ms twice a second, and
the requests that arrived meanwhile queued behind each other: that was most of the proxy's p99
(`edgeroute bench overhead --rates 1000 --no-pin`: added p99 2.3 to 3.2 ms with whole batches,
0.4 to 1.4 ms in slices; the same CPU per request). A batch now takes about twice as long to
write, which `WriterPace` counts as write time, so a record still lands within the flush
interval.

Rests stop once a batch has rested for `MAX_REST_SHARE` of the flush interval: a writer that
falls behind (a burst, a slow store) writes flat out rather than lose more to a `kill -9`.
Only the writer thread rests: a flush asked for by another thread (shutdown, a test, an
admin read-back) runs at once.
"""

from __future__ import annotations

import threading
import time

SLICE_S = 0.0005  # CPU seconds between rests: well under the 1 ms a request may add
MAX_REST_SHARE = 0.25  # of the flush interval, per batch


class Breather:
    def __init__(self, flush_interval: float, slice_s: float = SLICE_S) -> None:
        self.slice_s = slice_s
        self.max_rest_s = MAX_REST_SHARE * flush_interval
        self.thread: int | None = None  # the writer thread's ident, set by the writer itself
        self.rested_s = 0.0  # in the current batch
        self._cpu = 0.0

    def begin(self) -> None:
        """A new batch (called by the writer thread): its rests count from zero."""
        self.thread = threading.get_ident()
        self.rested_s = 0.0
        self._cpu = time.thread_time()

    def rest(self) -> None:
        """Called between pieces of a batch's work: sleeps as long as the CPU used since the last
        rest once that reaches a slice (in the writer thread, within the batch's allowance)."""
        if threading.get_ident() != self.thread or self.rested_s >= self.max_rest_s:
            return
        used = time.thread_time() - self._cpu
        if used < self.slice_s:
            return
        pause = min(used, self.max_rest_s - self.rested_s)
        time.sleep(pause)
        self.rested_s += pause
        self._cpu = time.thread_time()


def never() -> None:
    """A `rest` for writes that nothing paces (tests, tools)."""
