"""Benchmark scenarios under faults: failover (a deployment fails mid-run), hedging (a
heavy-tailed upstream) and chaos (a deployment killed and restarted under load).

Each starts its own mocks and a real `edgeroute serve` (:mod:`edgeroute.bench.stack`).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any

import aiohttp
import orjson

from edgeroute.bench import loadgen, report
from edgeroute.bench.loadgen import Load, Stats, Target
from edgeroute.bench.stack import (
    PUBLIC_MODEL,
    Common,
    Proc,
    Stack,
    admin_get,
    bench_config,
    say,
    write_result,
)


def _phased_runs(
    targets: list[Target], c: Common, rate: float, phases: list[tuple[str, float, Any]], stream: bool = False
) -> list[Stats]:
    """Back-to-back open-loop runs, one per phase; each phase's action is called just before it."""
    out = []
    for name, seconds, action in phases:
        if action is not None:
            action()
        load = Load(requests=c.requests, duration=seconds, rate=rate, grace=30.0)
        run = loadgen.run(targets, load, stream=stream, prompt_tokens=c.prompt_tokens, progress=c.progress, label=name)
        (st,) = loadgen.arun(run)
        st.name = name
        out.append(st)
    return out


def _fault(proc: Proc, **cmd: Any) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{proc.admin_port}/_fault", data=orjson.dumps(cmd), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


def failover(c: Common, rate: float = 200.0, mode: str = "refuse", outage_s: float = 5.0) -> dict[str, Any]:
    """One of two deployments fails (`mode`: refuse, 503, hang, reset, ...) mid-run: errors and latency."""
    out: dict[str, Any] = {"scenario": "failover", "mode": mode}
    with Stack(c.pin) as stack:
        a = stack.upstream("--latency", "5", name="a")
        b = stack.upstream("--latency", "5", name="b")
        cfg = bench_config(
            {"pa": f"http://127.0.0.1:{a.port}/v1", "pb": f"http://127.0.0.1:{b.port}/v1"}, deployments=2
        )
        for p in cfg["providers"].values():
            p["timeouts"] = {"first_byte": 2.0, "connect": 1.0}
        proxy, _ = stack.proxy(cfg)
        t = [Target("edgeroute", f"http://127.0.0.1:{proxy.port}/v1", PUBLIC_MODEL)]
        phases = [
            ("before", outage_s, None),
            (f"outage ({mode} on a)", outage_s, lambda: _fault(a, mode=mode)),
            ("after", outage_s, lambda: _fault(a, mode="ok")),
        ]
        stats = _phased_runs(t, c, rate, phases)
        out["phases"] = [s.summary() for s in stats]
        out["deployments"] = admin_get(f"http://127.0.0.1:{proxy.port}/admin/deployments")["deployments"]
        say(report.table(stats))
        for s in stats:
            say(f"{s.name}: failed {s.failed} {s.errors}")
    write_result(c, "failover", stats, out)
    return out


def hedging(c: Common, rate: float = 100.0, latency: str = "lognormal:20,1.0") -> dict[str, Any]:
    """A heavy-tailed upstream: p99/p99.9 with and without `hedge:`, and the extra requests spent."""
    out: dict[str, Any] = {"scenario": "hedging", "latency": latency}
    with Stack(c.pin) as stack:
        plain = stack.upstream("--latency", latency, "--seed", "1", name="plain")
        hedged = stack.upstream("--latency", latency, "--seed", "2", name="hedged")
        pu, hu = f"http://127.0.0.1:{plain.port}/v1", f"http://127.0.0.1:{hedged.port}/v1"
        cfg = bench_config({"pp": pu, "ph": hu}, deployments=2, rules=0)
        cfg["deployments"]["d2"] = {**cfg["deployments"]["d0"]}
        cfg["deployments"]["d3"] = {**cfg["deployments"]["d1"]}
        # plain -> d0 + d2 (both on the `plain` mock); hedged -> d1 + d3 (both on the `hedged` mock).
        cfg["models"] = {
            "plain": {"deployments": ["d0", "d2"]},
            "hedged": {
                "deployments": ["d1", "d3"],
                "hedge": {"percentile": 95, "min_delay_ms": 5, "budget_percent": 10, "min_samples": 20},
            },
        }
        proxy, _ = stack.proxy(cfg)
        base = f"http://127.0.0.1:{proxy.port}/v1"
        targets = [Target("no hedge", base, "plain"), Target("hedge p95", base, "hedged")]
        load = Load(requests=c.requests, duration=c.duration, rate=rate, warmup=50)
        stats = loadgen.arun(loadgen.run(targets, load, prompt_tokens=c.prompt_tokens, progress=c.progress))
        for s, m in zip(stats, (plain, hedged), strict=True):
            got = admin_get(f"http://127.0.0.1:{m.admin_port}/_fault")["requests"]
            client = s.ok + s.failed + load.warmup
            out[s.name] = {
                **s.summary(),
                "upstream_requests": got,
                "extra_requests_pct": round(100 * (got / client - 1), 2),
            }
        say(report.table(stats))
        for s in stats:
            say(f"{s.name}: extra upstream requests {out[s.name]['extra_requests_pct']}%")
    write_result(c, "hedging", stats, out)
    return out


def chaos(
    c: Common,
    rate: float = 250.0,
    total: int = 10_000,
    kill_at: float = 0.3,
    restart_at: float = 0.6,
    base_ejection_ms: int | None = 2000,
) -> dict[str, Any]:
    """`total` requests at `rate` over two deployments; one is SIGKILLed at `kill_at` of the run and
    restarted at `restart_at`. Failed requests, p50/p99 during the outage, time for traffic to return.

    The proxy ejects the dead deployment for `base_ejection_ms` (the config's `health.base_ejection_ms`;
    None keeps edgeroute's default, 30 s, longer than the default run's recovery phase)."""
    out: dict[str, Any] = {"scenario": "chaos", "rate": rate, "requests": total, "base_ejection_ms": base_ejection_ms}
    run_s = total / rate
    with Stack(c.pin) as stack:
        a = stack.upstream("--latency", "5", name="a")
        b = stack.upstream("--latency", "5", name="b")
        cfg = bench_config(
            {"pa": f"http://127.0.0.1:{a.port}/v1", "pb": f"http://127.0.0.1:{b.port}/v1"},
            deployments=2,
            health={"base_ejection_ms": base_ejection_ms} if base_ejection_ms is not None else None,
        )
        for p in cfg["providers"].values():
            p["timeouts"] = {"first_byte": 2.0, "connect": 1.0}
        proxy, _ = stack.proxy(cfg)
        admin = f"http://127.0.0.1:{proxy.port}/admin/deployments"
        phase_stats = {k: Stats(k) for k in ("before", "outage", "recovery")}
        timeline: dict[str, float | None] = {"killed_at_s": None, "restarted_at_s": None}
        events: list[dict[str, Any]] = []
        state = {"a": a}

        async def main() -> None:
            start = time.perf_counter()
            kill_t, restart_t = start + run_s * kill_at, start + run_s * restart_at

            def phase(intended: float) -> Stats:
                if intended < kill_t:
                    return phase_stats["before"]
                return phase_stats["outage"] if intended < restart_t else phase_stats["recovery"]

            async def monitor(session: aiohttp.ClientSession) -> None:
                last_a = None
                while time.perf_counter() < start + run_s + 5:
                    now = time.perf_counter()
                    if timeline["killed_at_s"] is None and now >= kill_t:
                        state["a"].stop(kill=True)
                        timeline["killed_at_s"] = round(now - start, 3)
                    if timeline["restarted_at_s"] is None and now >= restart_t:
                        state["a"] = await asyncio.to_thread(stack.restart, state["a"])
                        timeline["restarted_at_s"] = round(time.perf_counter() - start, 3)
                    try:
                        async with session.get(admin) as r:
                            deps = (await r.json())["deployments"]
                        da = next(d for d in deps if d["name"] == "d0")
                        db = next(d for d in deps if d["name"] == "d1")
                        ev = {"t": round(now - start, 3), "a_circuit": da["circuit"], "a_requests": da["requests"],
                              "b_requests": db["requests"], "a_failures": da["failures"]}  # fmt: skip
                        if last_a is not None:
                            ev["a_delta"] = da["requests"] - last_a[0]
                            ev["b_delta"] = db["requests"] - last_a[1]
                        last_a = (da["requests"], db["requests"])
                        events.append(ev)
                    except (aiohttp.ClientError, OSError, KeyError, StopIteration):
                        pass
                    await asyncio.sleep(0.1)

            stats = [Stats("edgeroute")]
            t = Target("edgeroute", f"http://127.0.0.1:{proxy.port}/v1", PUBLIC_MODEL)
            body = [loadgen.chat_body(PUBLIC_MODEL, c.prompt_tokens, False, i) for i in range(8)]
            async with loadgen.make_session() as session, loadgen.make_session() as admin_session:
                mon = asyncio.ensure_future(monitor(admin_session))

                async def send(ti: int, intended: float, st: Stats | None) -> None:
                    ps = phase(intended)
                    ps.sent += 1
                    await loadgen.send_one(session, t, body[ps.sent % len(body)], False, intended, ps)
                    if st is not None:  # progress counts
                        st.ok = sum(s.ok for s in phase_stats.values())
                        st.errors = {"all": sum(s.failed for s in phase_stats.values())}

                load = Load(requests=total, duration=run_s + 1, rate=rate, grace=30.0)
                prog = loadgen.Progress(total, load.duration, c.progress, "chaos ", rate)
                await loadgen.open_loop(send, stats, load, prog)
                await mon
            phase_stats["before"].elapsed_s = run_s * kill_at
            phase_stats["outage"].elapsed_s = run_s * (restart_at - kill_at)
            phase_stats["recovery"].elapsed_s = run_s * (1 - restart_at)

        loadgen.arun(main())
        out["timeline"] = timeline
        out["phases"] = {k: s.summary() for k, s in phase_stats.items()}
        out["failed_requests"] = sum(s.failed for s in phase_stats.values())
        restarted = timeline["restarted_at_s"] or 0.0
        back = [e for e in events if e["t"] >= restarted and e.get("a_delta", 0) > 0]
        half = [e for e in back if e["a_delta"] >= 0.3 * (e["a_delta"] + e.get("b_delta", 0))]
        out["traffic_returned_after_s"] = round(back[0]["t"] - restarted, 3) if back else None
        out["traffic_rebalanced_after_s"] = round(half[0]["t"] - restarted, 3) if half else None
        out["monitor"] = events
        say(report.table(list(phase_stats.values())))
        say(
            f"failed requests: {out['failed_requests']} of {total}; killed at {timeline['killed_at_s']} s, "
            f"restarted at {restarted} s; first traffic to the restarted deployment after "
            f"{out['traffic_returned_after_s']} s, ≥30% share after {out['traffic_rebalanced_after_s']} s"
        )
        for k, s in phase_stats.items():
            say(f"  {k}: errors {s.errors}")
    write_result(c, "chaos", list(phase_stats.values()), {k: v for k, v in out.items() if k != "monitor"})
    return out
