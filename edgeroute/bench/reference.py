"""A machine reference measured in the same run as the figures beside it.

The same proxy measured on two days can differ by 2x because the machine did (other
tenants, frequency scaling). A figure is comparable across runs only as a ratio to a
reference taken in the same sitting: here a fixed CPU-bound Python workload (interpreter
speed, the proxy's own bottleneck) timed a few times, its best run kept.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import orjson

_ROUNDS = 5


def _workload() -> int:
    # Dict, string and JSON work in the proportions of a request's Python path; fixed size.
    acc = 0
    for i in range(20_000):
        d = {"model": "m", "i": i, "messages": [{"role": "user", "content": f"hello {i}"}]}
        acc += len(orjson.dumps(d)) + len(str(i)) + len(d)
    return acc


def calibration_ms(rounds: int = _ROUNDS) -> float:
    """Milliseconds of the fixed workload (best of `rounds`): lower is a faster machine."""
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        _workload()
        best = min(best, time.perf_counter() - t)
    return round(best * 1000, 2)


def machine(rounds: int = _ROUNDS) -> dict[str, Any]:
    """The reference reported beside a run's figures."""
    try:
        load1 = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not available
        load1 = None
    return {
        "calibration_ms": calibration_ms(rounds),
        "load_avg_1m": load1,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def per_reference(value_ms: float | None, ref: dict[str, Any]) -> float | None:
    """A latency or CPU figure as a multiple of the calibration workload's time."""
    cal = ref.get("calibration_ms")
    if value_ms is None or not cal:
        return None
    return round(value_ms / float(cal), 5)
