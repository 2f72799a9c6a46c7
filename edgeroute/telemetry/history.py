"""`GET /admin/deployments/history`: each deployment's recent state, sampled every few seconds.

An in-memory ring buffer (the last hour by default): at each sample, the circuit state
and in-flight count from the core, and the attempts, error rate and latency percentiles
of the slot just ended (from `window`). Lost on restart; the request log keeps the rest.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from edgeroute.errors import ProxyError
from edgeroute.state import Live
from edgeroute.telemetry.window import SLOT_S, Window, by_deployment, percentile

KEEP_S = 3600.0


class DeploymentHistory:
    def __init__(self, keep_s: float = KEEP_S) -> None:
        self.interval_s = SLOT_S
        self._maxlen = max(1, int(keep_s / SLOT_S))
        self.samples: dict[str, deque[dict[str, Any]]] = {}

    def sample(self, live: Live, window: Window, now: float) -> None:
        """One sample per deployment: the core's state now, the traffic of the slot just ended."""
        ended = [s for s in window.slots if s.start + SLOT_S <= now and s.start + 2 * SLOT_S > now]
        stats = by_deployment(ended)
        t = round(now - now % SLOT_S, 3)
        for d in live.deployments:
            h = live.router.health(d.index)
            st = stats.get(d.name)
            lat = st.latencies_ms if st else []
            p50, p95 = percentile(lat, 0.5), percentile(lat, 0.95)
            row = {
                "t": t,
                "circuit": h["circuit"],
                "in_flight": h["in_flight"],
                "error_rate": round(st.error_rate, 4) if st else 0.0,
                "p50_ms": round(p50, 3) if p50 is not None else None,
                "p95_ms": round(p95, 3) if p95 is not None else None,
                "requests": st.attempts if st else 0,
            }
            ring = self.samples.get(d.name)
            if ring is None:
                ring = self.samples[d.name] = deque(maxlen=self._maxlen)
            ring.append(row)
        # Deployments a reload removed keep their past until it ages out; then they go.
        for name in [n for n, ring in self.samples.items() if ring and ring[-1]["t"] < now - KEEP_S]:
            del self.samples[name]

    def since(self, t: float) -> dict[str, list[dict[str, Any]]]:
        return {name: [r for r in ring if r["t"] >= t] for name, ring in self.samples.items()}


def parse_since(value: str | None, now: float) -> float:
    """`since`: epoch seconds, or a relative `90s` / `15m` / `1h`; default the whole buffer."""
    if value is None or value == "":
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if value[-1] in units:
            ago = float(value[:-1]) * units[value[-1]]
            if not 0 <= ago < 1e9:
                raise ValueError
            return now - ago
        t = float(value)
        if t != t or t < 0:  # NaN or negative
            raise ValueError
        return t
    except (ValueError, IndexError):
        raise ProxyError(
            400, f"Invalid 'since': {value[:40]!r}; use epoch seconds or 90s, 15m, 1h.", param="since"
        ) from None
