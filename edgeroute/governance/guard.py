"""The rollback guard: a config applied by reload (file, SIGHUP or API) is watched for a
window; if its answers' error rate or p95 latency passes the configured bound, the previous
version is rolled back to, with an ERROR log line and an audit entry (`config.auto_rollback`)
for alerting. A rollback itself is not watched (no flapping between two bad versions).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from edgeroute.governance.settings import RollbackGuard

log = logging.getLogger("edgeroute.governance")

_MAX_SAMPLES = 10_000
# Answers a client chose that say nothing of the config: an `only-if-cached` request's miss
# (504) is what the client asked for, so any client could roll back whatever an operator had
# just applied (a key's budget or rule, a model taken away) with min_requests of them.
NOT_THE_CONFIGS = frozenset({"cache_miss"})


@dataclass(slots=True)
class GenerationStats:
    """Answers of one config generation, as the request path records them (an append)."""

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    def observe(self, status: int, latency_ms: float, error_class: str | None = None) -> None:
        if error_class in NOT_THE_CONFIGS:
            return
        self.requests += 1
        if status >= 500:
            self.errors += 1
        if len(self.latencies) < _MAX_SAMPLES:
            self.latencies.append(latency_ms)

    def p95(self) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(len(xs) * 0.95))] if xs else 0.0


def verdict(stats: GenerationStats, guard: RollbackGuard) -> str | None:
    """Why the generation must go, or None."""
    if stats.requests < guard.min_requests:
        return None
    rate = stats.errors / stats.requests
    if guard.max_error_rate is not None and rate > guard.max_error_rate:
        return f"error rate {rate:.0%} over {stats.requests} answers passed {guard.max_error_rate:.0%}"
    if guard.max_p95_ms is not None and (p95 := stats.p95()) > guard.max_p95_ms:
        return f"p95 latency {p95:.0f} ms over {stats.requests} answers passed {guard.max_p95_ms:.0f} ms"
    return None


async def watch(stats: GenerationStats, guard: RollbackGuard, still_running: object) -> str | None:
    """Checks every half second until the window ends; returns the reason to roll back, if any.
    `still_running()` says whether the watched generation is still the live one."""
    loop = asyncio.get_running_loop()
    end = loop.time() + guard.window_s
    while loop.time() < end:
        await asyncio.sleep(min(0.5, max(0.0, end - loop.time())))
        if not still_running():  # type: ignore[operator]
            return None
        if (why := verdict(stats, guard)) is not None:
            return why
    return None
