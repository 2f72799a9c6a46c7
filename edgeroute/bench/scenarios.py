"""Benchmark scenarios of the proxy's cost: overhead (added latency, open loop), throughput,
compare (source trees in turn), streaming, resources (memory) and peer (another gateway).

Each starts its own mocks and a real `edgeroute serve` (:mod:`edgeroute.bench.stack`),
measures, stops them, returns a JSON-able dict and prints a table. Outage scenarios
(failover, hedging, chaos) are in :mod:`edgeroute.bench.outages`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from edgeroute.bench import loadgen, report, wrk
from edgeroute.bench.loadgen import Load, Stats, Target
from edgeroute.bench.stack import (
    MOCK_MODEL,
    PUBLIC_MODEL,
    Common,
    Proc,
    Stack,
    added,
    bench_config,
    rss_sampler,
    say,
    write_result,
)


def overhead(
    c: Common,
    rates: list[float],
    *,
    rules: int = 50,
    stream: bool = False,
    upstream_latency: str = "0",
    floor: bool = False,
    floor_interleaved: bool = False,
    trace_ratio: float | None = None,
    request_log: bool = True,
    cache: bool = False,
    budgets: bool = False,
    limits: bool = False,
    beside: str | None = None,
    workers: int = 1,
    upstream: str = "mock",
) -> dict[str, Any]:
    """Direct-to-mock vs through edgeroute, interleaved at each rate; added latency per percentile.
    With `upstream` "nginx", the upstream is nginx with a canned answer (`nginx_upstream`): it
    costs the shared cores next to nothing, so less of what is measured is the bench's own load
    (non-streaming chat only; no OTLP sink, no upstream latency).
    With `workers` > 1, the proxy is `serve --workers N` (unpinned, on every CPU).
    With `budgets`, a global monthly budget (never reached) admits every request, as a
    deployment with spend limits does; with `limits`, per-key RPM and TPM limits (never reached).
    `beside` (one of `BESIDE`) adds a second edgeroute with one setting changed, interleaved
    with the first: the setting's cost, in the same sitting (`redis`: budgets, limits and
    cache in Redis, `shared_state`).
    With `floor`, a bare aiohttp pass-through is measured the same way, in its own phase right
    after edgeroute's; with `floor_interleaved` as well, in edgeroute's phase as a third target,
    so a slow moment of the machine falls on both alike (the gate's choice, at a rate where the
    generator can carry three targets).
    With `trace_ratio`, tracing is on at that sampling ratio, exporting to the mock's OTLP sink.
    The proxy writes its ledger and request log (no content) as `serve` does, unless `request_log`
    is False. With `cache`, the response cache is on (the bench's few distinct bodies are hits
    after warm-up)."""
    out: dict[str, Any] = {"scenario": "overhead", "rates": {}, "upstream_latency": upstream_latency}
    out["request_log"] = request_log
    if upstream == "nginx" and (stream or trace_ratio is not None or upstream_latency != "0"):
        raise ValueError("the nginx upstream answers non-streaming chat at once, and has no OTLP sink")
    out["upstream"] = upstream
    with Stack(c.pin) as stack:
        mock = stack.nginx() if upstream == "nginx" else stack.upstream("--latency", upstream_latency)
        url = f"http://127.0.0.1:{mock.port}/v1"
        cfg = bench_config({"p0": url, "p1": url}, rules=rules)
        if cache:
            cfg["models"][PUBLIC_MODEL]["cache"] = CACHE_EVERYTHING
            out["cache"] = True
        if trace_ratio is not None:
            sink = f"http://127.0.0.1:{mock.port}/v1/traces"
            cfg["tracing"] = {"enabled": True, "sample_ratio": trace_ratio, "endpoint": sink}
            out["trace_ratio"] = trace_ratio
        if not request_log:
            cfg["request_log"] = {"enabled": False}
        if budgets:
            cfg["budgets"] = BENCH_BUDGETS
            out["budgets"] = True
        if limits:
            cfg["rate_limits"] = BENCH_LIMITS
            out["limits"] = True
        proxy, startup = stack.proxy(cfg, workers=workers)
        out["startup_s"], out["workers"] = round(startup, 3), workers
        out["proxy_rss_idle_mb"] = round(proxy.rss_mb(), 1)
        targets = [
            Target("direct", url, MOCK_MODEL),
            Target("edgeroute", f"http://127.0.0.1:{proxy.port}/v1", PUBLIC_MODEL),
        ]
        if beside is not None:
            other, _ = stack.proxy(BESIDE[beside](cfg, f"http://127.0.0.1:{mock.port}/v1/traces"), name="beside")
            targets.append(Target(f"edgeroute {beside}", f"http://127.0.0.1:{other.port}/v1", PUBLIC_MODEL))
            out["beside"] = beside
        # By default the floor runs in its own phase right after edgeroute's, interleaved with the
        # mock the same way: a third target in one phase loads the generator by half again.
        floor_proc = stack.floor(url) if floor else None
        if floor_proc is not None and floor_interleaved:
            targets.append(Target("bare aiohttp", f"http://127.0.0.1:{floor_proc.port}/v1", MOCK_MODEL))
        all_stats: list[Stats] = []
        for rate in rates:
            load = Load(requests=c.requests, duration=c.duration, rate=rate, warmup=c.warmup)
            spy = stack.profiler(proxy, c.duration, c.profile if rate == rates[0] else None)
            cpu0 = proxy.cpu_seconds()
            fcpu0 = floor_proc.cpu_seconds() if floor_proc is not None else 0.0
            stats = loadgen.arun(
                loadgen.run(targets, load, stream=stream, prompt_tokens=c.prompt_tokens, progress=c.progress,
                            label=f"{rate:g}/s ", distinct=not cache)
            )  # fmt: skip
            cpu = proxy.cpu_seconds() - cpu0
            if spy is not None:
                spy.wait(30)
                say(f"profile of the proxy at {rate:g}/s: {c.profile}")
            d, p = stats[0], stats[1]
            res: dict[str, Any] = {
                "added_ms": added(p, d, "ttft_ms" if stream else "latency_ms"),
                "direct": d.summary(),
                "proxy": p.summary(),
                "proxy_cpu_ms_per_request": round(1000 * cpu / max(1, p.ok + p.failed + load.warmup), 4),
            }
            if beside is not None:
                res["beside_added_ms"] = added(stats[2], d, "ttft_ms" if stream else "latency_ms")
                res["beside"] = stats[2].summary()
                say(f"edgeroute {beside} adds {res['beside_added_ms']}")
            if floor_proc is not None:
                if floor_interleaved:
                    fd, f = d, stats[-1]
                else:
                    pair = [targets[0], Target("bare aiohttp", f"http://127.0.0.1:{floor_proc.port}/v1", MOCK_MODEL)]
                    fcpu0 = floor_proc.cpu_seconds()
                    fd, f = loadgen.arun(
                        loadgen.run(pair, load, stream=stream, prompt_tokens=c.prompt_tokens, progress=c.progress,
                                    label=f"floor {rate:g}/s ", distinct=not cache)
                    )  # fmt: skip
                fcpu = floor_proc.cpu_seconds() - fcpu0
                res["floor_added_ms"] = added(f, fd, "ttft_ms" if stream else "latency_ms")
                res["floor"] = f.summary()
                res["floor_cpu_ms_per_request"] = round(1000 * fcpu / max(1, f.ok + f.failed + load.warmup), 4)
                if not floor_interleaved:
                    stats.append(f)
                say(
                    f"bare aiohttp pass-through adds {res['floor_added_ms']}, "
                    f"{res['floor_cpu_ms_per_request']} ms CPU/req"
                )
            out["rates"][f"{rate:g}"] = res
            say(report.table(stats, "ttft_ms" if stream else "latency_ms"))
            a = res["added_ms"]
            say(
                f"rate {rate:g}/s: added p50 {a.get('p50')} ms  p90 {a.get('p90')}  p99 {a.get('p99')}  "
                f"p99.9 {a.get('p99.9')}  | proxy {p.rps:.0f} req/s, {res['proxy_cpu_ms_per_request']} ms CPU/req, "
                f"late sends {d.late_sends + p.late_sends}\n"
            )
            for s in stats:
                s.name = f"{s.name} @{rate:g}/s"
            all_stats += stats
        out["proxy_rss_after_mb"] = round(proxy.rss_mb(), 1)
    write_result(c, "overhead", all_stats, out)
    return out


# A budget every request is admitted under (reserved, settled, journaled), never reached.
BENCH_BUDGETS = {"limits": [{"name": "bench-month", "scope": "global", "limit_usd": 1e9, "period": "month"}]}
BENCH_LIMITS = {"per_key": {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000}}


def _shared_state(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with budgets, limits and cache in Redis (`EDGEROUTE_BENCH_REDIS_URL`, default the
    loopback server's db 14), under a prefix of this run's own; its keys expire on their own."""
    url = os.environ.get("EDGEROUTE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    shared = {"redis_url": url, "prefix": f"edgeroute-bench-{os.getpid()}", "timeout_ms": 500}
    # A ledger of its own (beside the config): the first proxy counts budgets alone on the default one.
    return _with(cfg, shared_state=shared, ledger={"path": "beside-ledger.db"})


def _with(cfg: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**cfg, **changes}


# The second proxy of `overhead(beside=...)`: the first one's config with one setting changed
# (its argument: the mock's OTLP sink, for tracing).
BESIDE: dict[str, Any] = {
    "budgets": lambda cfg, sink: _with(cfg, budgets=BENCH_BUDGETS),
    "redis": lambda cfg, sink: _shared_state(cfg),
    "no-budgets": lambda cfg, sink: {k: v for k, v in cfg.items() if k != "budgets"},
    "request-log-off": lambda cfg, sink: _with(cfg, request_log={"enabled": False}),
    "tracing-10": lambda cfg, sink: _with(cfg, tracing={"enabled": True, "sample_ratio": 0.1, "endpoint": sink}),
}

# The bench's requests are sampled (temperature 0.2) and from several keys' worth of bodies:
# cache them all, for everyone, for the length of a run.
CACHE_EVERYTHING = {"ttl": 3600, "deterministic_only": False, "scope": "global"}


def throughput(
    c: Common,
    concurrency: int = 64,
    cache: bool = False,
    workers: int = 1,
    generator: str = "python",
    upstream: str = "mock",
) -> dict[str, Any]:
    """Maximum req/s of one proxy process (closed loop), and of the mock directly; with `cache`,
    of cache hits; with `workers`, of `serve --workers N`; with `generator` "wrk", the load
    comes from wrk (`bench/wrk.py`) instead of this process; with `upstream` "nginx", the
    upstream is nginx with a canned answer (`nginx_upstream`) instead of the Python mock."""
    out: dict[str, Any] = {"scenario": "throughput", "cache": cache, "workers": workers, "generator": generator,
                           "upstream": upstream}  # fmt: skip
    # The same placement whatever the worker count, so that one worker and two compare: each worker
    # on a CPU of its own (serve --cpu-affinity), the generator and upstream on every CPU. Two
    # workers leave them no core to themselves; one worker shielded from them (the other
    # scenarios' placement) paid for none of their wake-ups on its core.
    with Stack(c.pin, shield=False) as stack:
        mock = stack.nginx() if upstream == "nginx" else stack.upstream()
        url = f"http://127.0.0.1:{mock.port}/v1"
        cfg = bench_config({"p0": url, "p1": url})
        if cache:
            cfg["models"][PUBLIC_MODEL]["cache"] = CACHE_EVERYTHING
        proxy, _ = stack.proxy(cfg, workers=workers, cpu_affinity=True)
        out["placement"] = stack.placement(workers, cpu_affinity=True)
        say(f"placement: {out['placement']}")
        all_stats = []
        for name, t in (
            ("direct", Target("direct", url, MOCK_MODEL)),
            ("edgeroute", Target("edgeroute", f"http://127.0.0.1:{proxy.port}/v1", PUBLIC_MODEL)),
        ):
            load = Load(requests=c.requests, duration=c.duration, rate=None, concurrency=concurrency, warmup=50)
            if generator == "wrk":
                _wrk_phase(c, t, load, stack, proxy, mock, name, out, workers, cache)
                continue
            spy = stack.profiler(proxy, c.duration, c.profile if name == "edgeroute" else None)
            cpu0, gen0, mock0 = proxy.cpu_seconds(), time.process_time(), mock.cpu_seconds()
            (st,) = loadgen.arun(
                loadgen.run(
                    [t], load, prompt_tokens=c.prompt_tokens, progress=c.progress, label=name + " ", distinct=not cache
                )
            )
            cpu = proxy.cpu_seconds() - cpu0
            # Who else used the cores: the load generator (this process) and the mock, per request.
            per = 1000 / max(1, st.ok + load.warmup)
            gen_ms, mock_ms = (time.process_time() - gen0) * per, (mock.cpu_seconds() - mock0) * per
            if spy is not None:
                spy.wait(30)
            out[name] = {**st.summary(), "proxy_cpu_s": round(cpu, 2), "generator_cpu_ms_per_request": round(gen_ms, 4),
                         "mock_cpu_ms_per_request": round(mock_ms, 4)}  # fmt: skip
            if name == "edgeroute" and cpu > 0:
                _cpu_split(out, cpu * per, gen_ms, mock_ms, workers)
            say(f"{name}: {st.rps:.0f} req/s ({st.ok} ok, {st.failed} failed, concurrency {concurrency}); "
                   f"proxy CPU {cpu / max(st.elapsed_s, 1e-9) * 100:.0f}%")  # fmt: skip
            all_stats.append(st)
        if all_stats:  # wrk reports no latency percentiles here
            say(report.table(all_stats))
    write_result(c, "throughput", all_stats, out)
    return out


def _cpu_split(out: dict[str, Any], proxy_ms: float, gen_ms: float, mock_ms: float, workers: int) -> None:
    """CPU per request of the proxy, the generator and the mock, and the rates they bound: the
    machine's cores shared by all three (CPU-bound, no idle time), and the proxy's workers alone."""
    cores = os.cpu_count() or 1
    out["proxy_cpu_ms_per_request"] = round(proxy_ms, 4)
    out["proxy_capacity_rps_per_core"] = round(1000 / proxy_ms)
    out["machine_bound_rps"] = round(1000 * cores / (proxy_ms + gen_ms + mock_ms))
    out["workers_bound_rps"] = round(1000 * min(workers, cores) / proxy_ms)
    say(f"CPU per request: proxy {proxy_ms:.3f} ms, generator {gen_ms:.3f} ms, mock {mock_ms:.3f} ms; "
           f"{cores} cores shared by all three bound the rate at {out['machine_bound_rps']} req/s, "
           f"{workers} worker(s) alone at {out['workers_bound_rps']} req/s")  # fmt: skip


def _wrk_phase(
    c: Common, t: Target, load: Load, stack: Stack, proxy: Proc, mock: Proc, name: str, out: dict[str, Any],
    workers: int, cache: bool,
) -> None:  # fmt: skip
    """One target of `throughput` under wrk: a short warm-up run, then the measured one (each
    request's prompt its own unless the run measures `cache` hits)."""
    body = loadgen.chat_body(t.model, c.prompt_tokens)
    url = t.url + "/chat/completions"
    distinct = not cache
    wrk.run(url, body, 1, load.concurrency, distinct=distinct)
    spy = stack.profiler(proxy, c.duration, c.profile if name == "edgeroute" else None)
    cpu0, mock0 = proxy.cpu_by_process(), mock.cpu_seconds()
    res = wrk.run(url, body, c.duration, load.concurrency, distinct=distinct)
    cpu1, mock_s = proxy.cpu_by_process(), mock.cpu_seconds() - mock0
    cpu = sum(cpu1.values()) - sum(cpu0.values())
    if spy is not None:
        spy.wait(30)
    per = 1000 / max(1, res.requests)
    out[name] = {"rps": round(res.rps), "requests": res.requests, "non_2xx": res.non_2xx, "errors": res.errors,
                 "proxy_cpu_s": round(cpu, 2), "generator_cpu_ms_per_request": round(res.cpu_s * per, 4),
                 "mock_cpu_ms_per_request": round(mock_s * per, 4)}  # fmt: skip
    say(f"{name}: {res.rps:.0f} req/s under wrk ({res.requests} answers, {res.non_2xx} not 2xx, "
           f"{res.errors} socket errors, concurrency {load.concurrency})")  # fmt: skip
    if name == "edgeroute" and workers > 1:
        _worker_split(out[name], cpu0, cpu1, proxy.pid, c.duration)
    if name == "edgeroute" and cpu > 0:
        _cpu_split(out, cpu * per, res.cpu_s * per, mock_s * per, workers)


def _worker_split(res: dict[str, Any], before: dict[int, float], after: dict[int, float], supervisor: int,
                  seconds: float) -> None:  # fmt: skip
    """Each worker's CPU over the run: the kernel gives each a share of the connections, and a
    worker that got few (or none: it was not listening yet when they opened) leaves its core idle."""
    used = sorted(after[pid] - before.get(pid, 0.0) for pid in after if pid != supervisor)
    res["worker_cpu_s"] = [round(u, 2) for u in used]
    say(f"workers' CPU over the run: {', '.join(f'{u:.2f} s' for u in used)} of {seconds:g} s each")
    if used and used[0] < 0.5 * used[-1]:
        say("a worker was left half idle: the connections were not spread over the workers")


def compare(c: Common, trees: list[str], rounds: int = 3, concurrency: int = 64) -> dict[str, Any]:
    """Before and after in the same sitting: proxies built from several source trees (each a
    checkout with its extension built) serve the same closed-loop load in turn, `rounds`
    times; reports each one's CPU per request and req/s per round, and their medians."""
    out: dict[str, Any] = {"scenario": "compare", "trees": {}}
    with Stack(c.pin) as stack:
        mock = stack.upstream()
        url = f"http://127.0.0.1:{mock.port}/v1"
        cfg = bench_config({"p0": url, "p1": url})
        procs = {t: stack.proxy(cfg, name=f"tree{i}", tree=t)[0] for i, t in enumerate(trees)}
        runs: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
        for r in range(rounds):
            for t, proxy in procs.items():
                load = Load(requests=c.requests, duration=c.duration, rate=None, concurrency=concurrency, warmup=50)
                target = Target(t, f"http://127.0.0.1:{proxy.port}/v1", PUBLIC_MODEL)
                cpu0 = proxy.cpu_seconds()
                (st,) = loadgen.arun(loadgen.run([target], load, prompt_tokens=c.prompt_tokens, label=f"{r} "))
                cpu_ms = 1000 * (proxy.cpu_seconds() - cpu0) / max(1, st.ok)
                runs[t].append({"cpu_ms_per_request": round(cpu_ms, 4), "rps": round(st.rps), "failed": st.failed})
                say(f"round {r + 1} {t}: {st.rps:.0f} req/s, {cpu_ms:.4f} ms CPU/request, {st.failed} failed")
        for t in trees:
            cpu = sorted(x["cpu_ms_per_request"] for x in runs[t])
            out["trees"][t] = {"runs": runs[t], "median_cpu_ms_per_request": cpu[len(cpu) // 2],
                               "rss_mb": round(procs[t].rss_mb(), 1)}  # fmt: skip
        base = out["trees"][trees[0]]["median_cpu_ms_per_request"]
        for t in trees:
            m = out["trees"][t]["median_cpu_ms_per_request"]
            out["trees"][t]["throughput_vs_first"] = round(base / m, 3) if m else None
            say(f"{t}: median {m} ms CPU/request, throughput per core x{out['trees'][t]['throughput_vs_first']}")
    write_result(c, "compare", [], out)
    return out


def streaming(c: Common, rate: float = 100.0, tokens: int = 32, tps: float = 200.0) -> dict[str, Any]:
    """Added time to first token and chunk pacing through the proxy (chunks must not be merged or delayed)."""
    out: dict[str, Any] = {"scenario": "streaming"}
    with Stack(c.pin) as stack:
        mock = stack.upstream("--tokens", str(tokens), "--tps", str(tps))
        url = f"http://127.0.0.1:{mock.port}/v1"
        proxy, _ = stack.proxy(bench_config({"p0": url, "p1": url}))
        targets = [
            Target("direct", url, MOCK_MODEL),
            Target("edgeroute", f"http://127.0.0.1:{proxy.port}/v1", PUBLIC_MODEL),
        ]
        load = Load(requests=c.requests, duration=c.duration, rate=rate, warmup=min(c.warmup, 50))
        spy = stack.profiler(proxy, c.duration, c.profile)
        cpu0 = proxy.cpu_seconds()
        stats = loadgen.arun(
            loadgen.run(targets, load, stream=True, prompt_tokens=c.prompt_tokens, progress=c.progress)
        )
        cpu = proxy.cpu_seconds() - cpu0
        if spy is not None:
            spy.wait(30)
        d, p = stats
        epr = {s.name: round(s.events / max(1, s.reads), 3) for s in stats}
        dg, pg = d.summary()["chunk_gap_ms"] or {}, p.summary()["chunk_gap_ms"] or {}
        out.update(
            merged=epr["edgeroute"] > epr["direct"] * 1.1,
            delayed=bool(pg and dg and pg["p50"] > dg["p50"] + 1.0),
            proxy_cpu_ms_per_stream=round(1000 * cpu / max(1, p.ok + p.failed), 4),
            added_ttft_ms=added(p, d, "ttft_ms"),
            added_total_ms=added(p, d, "latency_ms"),
            direct=d.summary(),
            proxy=p.summary(),
            expected_gap_ms=round(1000 / tps, 3),
            events_per_read=epr,
        )
        say(report.table(stats, "ttft_ms"))
        say(report.table(stats, "chunk_gap_ms"))
        say(
            f"added TTFT {out['added_ttft_ms']}\nSSE events per socket read (1.0 = never merged): "
            f"{out['events_per_read']}; chunks merged by the proxy: {out['merged']}; "
            f"delayed (gap p50 +1 ms): {out['delayed']}; proxy CPU {out['proxy_cpu_ms_per_stream']} ms/stream"
        )
    write_result(c, "streaming", stats, out)
    return out


def resources(c: Common, streams: int = 1000, starts: int = 5) -> dict[str, Any]:
    """Start-up to ready, RSS idle, RSS with `streams` concurrent streams open."""
    out: dict[str, Any] = {"scenario": "resources"}
    with Stack(c.pin) as stack:
        stream_s = max(5.0, c.duration)
        tokens = 40
        mock = stack.upstream("--tokens", str(tokens), "--tps", f"{tokens / stream_s:.3f}")
        url = f"http://127.0.0.1:{mock.port}/v1"
        cfg = bench_config({"p0": url, "p1": url})
        cfg["providers"]["p0"]["max_connections"] = streams + 100
        cfg["providers"]["p1"]["max_connections"] = streams + 100
        times = []
        for i in range(starts):
            p, secs = stack.proxy(cfg, name=f"start{i}")
            times.append(secs)
            if i < starts - 1:
                p.stop()
                stack.procs.remove(p)
        proxy = stack.procs[-1]
        out["startup_s"] = {"min": round(min(times), 3), "median": round(sorted(times)[len(times) // 2], 3)}
        time.sleep(0.5)
        out["rss_idle_mb"] = round(proxy.rss_mb(), 1)
        t = Target("edgeroute", f"http://127.0.0.1:{proxy.port}/v1", PUBLIC_MODEL)
        load = Load(requests=streams, duration=stream_s * 3, rate=None, concurrency=streams, grace=stream_s * 2)
        with rss_sampler(proxy) as rss:
            (st,) = loadgen.arun(
                loadgen.run([t], load, stream=True, prompt_tokens=c.prompt_tokens, progress=c.progress)
            )
        out["rss_streams_peak_mb"] = round(max(rss), 1)
        out["streams"] = streams
        out["streams_ok"] = st.ok
        out["streams_failed"] = st.errors
        time.sleep(1.0)
        out["rss_after_mb"] = round(proxy.rss_mb(), 1)
    say(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    write_result(c, "resources", [st], out)
    return out


def peer(
    c: Common, peer_url: str, peer_model: str, peer_key: str, rate: float = 200.0, mock_port: int = 0
) -> dict[str, Any]:
    """Added latency of edgeroute and of another gateway (point it at the mock: `mock_port`), interleaved."""
    out: dict[str, Any] = {"scenario": "peer", "peer_url": peer_url}
    with Stack(c.pin) as stack:
        mock = stack.upstream(port=mock_port)
        url = f"http://127.0.0.1:{mock.port}/v1"
        say(f"mock upstream: {url} (model {MOCK_MODEL}); the peer gateway must call it")
        proxy, _ = stack.proxy(bench_config({"p0": url, "p1": url}))
        targets = [
            Target("direct", url, MOCK_MODEL),
            Target("edgeroute", f"http://127.0.0.1:{proxy.port}/v1", PUBLIC_MODEL),
            Target("peer", peer_url, peer_model, peer_key),
        ]
        load = Load(requests=c.requests, duration=c.duration, rate=rate, warmup=c.warmup)
        stats = loadgen.arun(loadgen.run(targets, load, prompt_tokens=c.prompt_tokens, progress=c.progress))
        d, e, p = stats
        out.update(edgeroute_added_ms=added(e, d), peer_added_ms=added(p, d), stats=[s.summary() for s in stats])
        say(report.table(stats))
        say(f"added latency: edgeroute {out['edgeroute_added_ms']}\n               peer      {out['peer_added_ms']}")
    write_result(c, "peer", stats, out)
    return out
