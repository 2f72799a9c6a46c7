"""What shared capacity costs a request: ``python -m edgeroute.bench.shared_capacity --redis URL``.

Takes and gives back `--n` leases one after another on a real Redis, as a request on a
deployment with `max_concurrency` under `shared_state` does (one round trip each; the give
back is off the request path), and prints the latency percentiles of both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from edgeroute.config import SharedState
from edgeroute.leases import RedisLeases


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def measure(url: str, n: int) -> dict[str, float]:
    cfg = SharedState(redis_url=url, prefix=f"edgeroute-bench-{os.getpid()}", timeout_ms=2000)
    store = RedisLeases(cfg)
    take: list[float] = []
    back: list[float] = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            await store.take_lease("d", n + 1, f"lease-{i}")
            t1 = time.perf_counter()
            await store.give_back("d", f"lease-{i}")
            take.append((t1 - t0) * 1000)
            back.append((time.perf_counter() - t1) * 1000)
    finally:
        await store.pipe.call("DEL", f"{cfg.prefix}:cap:d")
        await store.close()
    return {"take_p50_ms": _pct(take, 0.5), "take_p99_ms": _pct(take, 0.99), "give_back_p50_ms": _pct(back, 0.5)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeroute.bench.shared_capacity", description=__doc__)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    p.add_argument("--n", type=int, default=2000)
    a = p.parse_args(argv)
    out = asyncio.run(measure(a.redis, a.n))
    print(", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
