"""Event-loop lag: how late the loop runs a timer, the measure of a stall.

Every request's latency includes the time the loop spent on something else: a long
callback, a collection pass, a synchronous call that should have been in a thread. A
sampler asks to be woken every `INTERVAL_S` and records how late it was; `/metrics`
exports the distribution (`edgeroute_event_loop_lag_seconds`) and its maximum since the
last scrape, and a stall past `STALL_S` is logged (at most once a minute) so that an
operator sees a p99 regression's cause, not only its effect.

While the app runs, the interpreter's GIL switch interval is `SWITCH_INTERVAL_S` (0.5 ms)
rather than Python's 5 ms: a background thread holding the GIL (the ledger's writer
building rows, a scrape's exposition) would otherwise keep a woken loop waiting up to
5 ms, a stall straight into the tail latency (`python -m edgeroute.bench.requestlog stall`).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterable

from aiohttp import web
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric

from edgeroute.metrics import METRICS

log = logging.getLogger("edgeroute.loop")

INTERVAL_S = 0.1
STALL_S = 0.1
SWITCH_INTERVAL_S = 0.0005
# Seconds: a healthy loop is late by tens of microseconds; a stall by milliseconds or more.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class LoopLag:
    """The lag distribution (cumulative since start) and the worst lag since the last scrape."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.worst = 0.0
        self._logged_at = 0.0

    def observe(self, lag: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, lag)] += 1
        self.total += lag
        self.worst = max(self.worst, lag)
        if lag >= STALL_S and (now := time.monotonic()) - self._logged_at >= 60:
            self._logged_at = now
            log.warning("the event loop stalled for %.0f ms (see edgeroute_event_loop_lag_seconds)", lag * 1000)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + INTERVAL_S
            await asyncio.sleep(INTERVAL_S)
            self.observe(max(0.0, loop.time() - due))

    def families(self) -> Iterable[Metric]:
        hist = HistogramMetricFamily(
            "edgeroute_event_loop_lag_seconds", "How late the event loop ran a timer (sampled every 100 ms)."
        )
        acc, buckets = 0, []
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            acc += n
            buckets.append((bound, acc))
        hist.add_metric([], buckets, self.total)
        worst = GaugeMetricFamily(
            "edgeroute_event_loop_lag_max_seconds", "The worst event-loop lag since the previous scrape."
        )
        worst.add_metric([], self.worst)
        self.worst = 0.0
        return (hist, worst)


LOOP_LAG = web.AppKey("loop_lag", LoopLag)


_apps_running = 0
_python_switch = sys.getswitchinterval()


def _short_switch(delta: int) -> None:
    """The short switch interval while any app runs (apps may overlap: tests, reloads); the
    interpreter's own again once the last one stops."""
    global _apps_running, _python_switch
    if _apps_running == 0 and delta > 0:
        _python_switch = sys.getswitchinterval()
    _apps_running = max(0, _apps_running + delta)
    sys.setswitchinterval(min(_python_switch, SWITCH_INTERVAL_S) if _apps_running else _python_switch)


def install(app: web.Application) -> None:
    """Starts the sampler with the app (and the short GIL switch interval), and adds its
    families to `/metrics`."""
    lag = app[LOOP_LAG] = LoopLag()
    app[METRICS].sources.append(lambda a: a[LOOP_LAG].families())

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        _short_switch(+1)
        task = asyncio.create_task(lag.run())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            _short_switch(-1)

    app.cleanup_ctx.append(ctx)
