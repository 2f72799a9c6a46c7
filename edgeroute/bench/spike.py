"""The spike scenario: capacity-aware routing under a load that outgrows the primary.

A primary deployment with `max_concurrency` 20 and a 200 ms service time, a secondary with
no limit (and, by default, a slower 300 ms service time, so that a spilled request shows
in the latency), behind one public model that prefers the primary.

1. Steps: load steps (50 -> 300 req/s by default); per step the errors, the share of
   requests that spilled to the secondary, and the latency added over the primary's
   service time. A primary that takes 20 at 200 ms serves 100 req/s at most: the rest
   must spill, none may fail.
2. Priority: interactive requests alone, then the same interactive load beside a batch
   flood (`x-edgeroute-priority: batch`), with `reserve_percent` keeping part of the
   primary for the interactive class: the interactive p99 with and without the flood.

Every process is started and stopped by the scenario (see `scenarios.Stack`); each run is
bounded in time and count, and only 127.0.0.1 is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from edgeroute.bench import loadgen, report
from edgeroute.bench.loadgen import Load, Stats, Target
from edgeroute.bench.stack import PUBLIC_MODEL, Common, Proc, Stack, admin_get, bench_config


def _fault_count(mock: Proc) -> int:
    """Requests a mock has answered so far."""
    n: int = admin_get(f"http://127.0.0.1:{mock.admin_port}/_fault")["requests"]
    return n


def _config(primary: str, secondary: str, capacity: int, reserve: int) -> dict[str, Any]:
    cfg = bench_config({"primary": primary, "secondary": secondary}, deployments=2, rules=0)
    cfg["deployments"]["d0"].update(weight=1000, max_concurrency=capacity, reserve_percent=reserve)
    cfg["deployments"]["d1"]["weight"] = 1
    cfg["models"] = {PUBLIC_MODEL: {"deployments": ["d0", "d1"]}}
    return cfg


def _p99(s: Stats) -> float | None:
    lat = s.summary()["latency_ms"]
    return None if lat is None else float(lat["p99"])


def spike(
    c: Common,
    rates: tuple[float, ...] = (50.0, 100.0, 200.0, 300.0),
    service_ms: float = 200.0,
    secondary_ms: float = 300.0,
    capacity: int = 20,
    reserve_percent: int = 40,
    interactive_rate: float = 15.0,
    batch_rate: float = 150.0,
) -> dict[str, Any]:
    """Runs both parts (`c.duration` seconds per step); returns the figures."""
    out: dict[str, Any] = {
        "scenario": "spike",
        "capacity": capacity,
        "service_ms": service_ms,
        "secondary_ms": secondary_ms,
        "reserve_percent": reserve_percent,
    }
    all_stats: list[Stats] = []
    with Stack(c.pin) as stack:
        a = stack.upstream("--latency", f"{service_ms:g}", name="primary")
        b = stack.upstream("--latency", f"{secondary_ms:g}", name="secondary")
        cfg = _config(f"http://127.0.0.1:{a.port}/v1", f"http://127.0.0.1:{b.port}/v1", capacity, reserve_percent)
        proxy, _ = stack.proxy(cfg)
        base = f"http://127.0.0.1:{proxy.port}/v1"

        steps = []
        for rate in rates:
            before = (_fault_count(a), _fault_count(b))
            load = Load(requests=c.requests, duration=c.duration, rate=rate, grace=30.0)
            target = Target(f"{rate:g} req/s", base, PUBLIC_MODEL)
            (st,) = loadgen.arun(loadgen.run([target], load, prompt_tokens=c.prompt_tokens, progress=c.progress))
            got_a, got_b = _fault_count(a) - before[0], _fault_count(b) - before[1]
            lat = st.summary()["latency_ms"] or {}
            steps.append(
                {
                    "rate": rate,
                    "ok": st.ok,
                    "failed": st.failed,
                    "errors": dict(st.errors),
                    "spillover_pct": round(100 * got_b / max(1, got_a + got_b), 1),
                    "p50_ms": lat.get("p50"),
                    "p99_ms": lat.get("p99"),
                    # Over the primary's service time: what queueing and spilling to the slower secondary add.
                    "added_p50_ms": round(lat["p50"] - service_ms, 1) if lat else None,
                    "added_p99_ms": round(lat["p99"] - service_ms, 1) if lat else None,
                }
            )
            all_stats.append(st)
        out["steps"] = steps

        interactive = Target("interactive", base, PUBLIC_MODEL, headers={"x-edgeroute-priority": "interactive"})
        batch = Target("batch", base, PUBLIC_MODEL, headers={"x-edgeroute-priority": "batch"})

        def one(t: Target, rate: float) -> Coroutine[Any, Any, list[Stats]]:
            # Twice a step's time: at a low interactive rate a p99 needs the samples.
            load = Load(requests=c.requests, duration=2 * c.duration, rate=rate, grace=30.0)
            return loadgen.run([t], load, prompt_tokens=c.prompt_tokens)

        (alone,) = loadgen.arun(one(interactive, interactive_rate))
        alone.name = "interactive alone"

        async def flood() -> tuple[list[Stats], list[Stats]]:
            got = await asyncio.gather(one(interactive, interactive_rate), one(batch, batch_rate))
            return got[0], got[1]

        (mixed,), (bulk,) = loadgen.arun(flood())
        mixed.name, bulk.name = "interactive + batch flood", "batch flood"
        all_stats += [alone, mixed, bulk]
        p_alone, p_mixed = _p99(alone), _p99(mixed)
        out["priority"] = {
            "interactive_rate": interactive_rate,
            "batch_rate": batch_rate,
            "interactive_alone": alone.summary(),
            "interactive_with_flood": mixed.summary(),
            "batch": bulk.summary(),
            "interactive_p99_ratio": round(p_mixed / p_alone, 3) if p_alone and p_mixed else None,
        }
        out["deployments"] = admin_get(f"http://127.0.0.1:{proxy.port}/admin/deployments")["deployments"]

    print(report.table(all_stats), flush=True)
    for s in steps:
        print(
            f"{s['rate']:g} req/s: failed {s['failed']}, spillover {s['spillover_pct']}%, "
            f"added p50 {s['added_p50_ms']} ms, p99 {s['added_p99_ms']} ms",
            flush=True,
        )
    pr = out["priority"]
    print(
        f"interactive p99: alone {p_alone} ms, beside a {batch_rate:g} req/s batch flood {p_mixed} ms "
        f"(ratio {pr['interactive_p99_ratio']}); batch failed {bulk.failed}",
        flush=True,
    )
    if c.json:
        report.write_json(c.json, out)
    if c.html:
        report.write_html(c.html, "edgeroute bench: spike", all_stats, out)
    return out
