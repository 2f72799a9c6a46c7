"""What sharing state through Redis costs per request, in CPU and in latency.

Two `edgeroute serve` processes on the same config (budgets, per-key limits, the exact cache
on, every request a hit after warm-up), one with its state in process and one with
`shared_state` on the Redis at `--redis`; sequential requests, alternating between them, so
that each pays each check once and both see the same moment of the machine. Prints each
proxy's p50, the paired median difference, and the CPU per request of each proxy and of
the Redis server (when its PID is given): CPU does not wait for a core, so on a busy
machine it is the steadier figure.

    python -m edgeroute.bench.redis_cost --redis redis://127.0.0.1:6379/14 --requests 1000 [--tree OTHER]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import aiohttp
import orjson

from edgeroute.bench import scenarios as S
from edgeroute.bench import stack as ST

WARMUP = 200


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _alternate(urls: list[str], n: int) -> list[list[float]]:
    """Latencies (ms) of `n` requests to each URL in turn, after a warm-up."""
    body = orjson.dumps(
        {"model": ST.PUBLIC_MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
    )
    out: list[list[float]] = [[] for _ in urls]
    async with aiohttp.ClientSession() as s:
        for i in range(WARMUP + n):
            for j, url in enumerate(urls):
                t0 = time.perf_counter()
                async with s.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url} answered {r.status}")
                if i >= WARMUP:
                    out[j].append((time.perf_counter() - t0) * 1000)
    return out


def measure(redis_url: str, n: int, redis_pid: int | None, tree: str | None = None) -> dict[str, float]:
    with ST.Stack() as stack:
        mock = stack.upstream("--latency", "0")
        cfg = ST.bench_config({"p0": f"http://127.0.0.1:{mock.port}/v1"}, rules=50)
        cfg["models"][ST.PUBLIC_MODEL]["cache"] = S.CACHE_EVERYTHING
        cfg["budgets"], cfg["rate_limits"] = S.BENCH_BUDGETS, S.BENCH_LIMITS
        # A ledger each: a server that counts budgets alone refuses to share its ledger.
        local, _ = stack.proxy(
            {**cfg, "ledger": {"path": f"{stack.tmp.name}/local-ledger.db"}}, name="local", tree=tree
        )
        shared_cfg = {
            **cfg,
            "ledger": {"path": f"{stack.tmp.name}/redis-ledger.db"},
            "shared_state": {"redis_url": redis_url, "prefix": f"edgeroute-bench-{os.getpid()}"},
        }
        shared, _ = stack.proxy(shared_cfg, name="redis", tree=tree)
        urls = [f"http://127.0.0.1:{p.port}/v1/chat/completions" for p in (local, shared)]
        # CPU counted over the whole run less the warm-up's share (both are sequential and alike).
        cpu0 = [local.cpu_seconds(), shared.cpu_seconds(), _cpu_s(redis_pid) if redis_pid else 0.0]
        a, b = asyncio.run(_alternate(urls, n))
        cpu1 = [local.cpu_seconds(), shared.cpu_seconds(), _cpu_s(redis_pid) if redis_pid else 0.0]
    per = 1000 / (n + WARMUP)
    out = {
        "local_p50_ms": statistics.median(a),
        "redis_p50_ms": statistics.median(b),
        "added_p50_ms": statistics.median(b) - statistics.median(a),
        "paired_median_ms": statistics.median(y - x for x, y in zip(a, b, strict=True)),
        "local_cpu_ms_per_request": (cpu1[0] - cpu0[0]) * per,
        "redis_proxy_cpu_ms_per_request": (cpu1[1] - cpu0[1]) * per,
    }
    if redis_pid:
        out["redis_server_cpu_ms_per_request"] = (cpu1[2] - cpu0[2]) * per
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeroute.bench.redis_cost", description=__doc__)
    p.add_argument("--redis", default=os.environ.get("EDGEROUTE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    p.add_argument("--requests", type=int, default=1000, help="measured requests per proxy (after 200 to warm up)")
    p.add_argument("--redis-pid", type=int, help="the redis-server's PID, to count its CPU too")
    p.add_argument("--tree", help="serve both proxies from this source tree (a before/after comparison)")
    a = p.parse_args(argv)
    out = measure(a.redis, a.requests, a.redis_pid, a.tree)
    print(", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
