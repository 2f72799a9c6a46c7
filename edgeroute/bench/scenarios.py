"""Benchmark scenarios: each starts its own mocks and a real `edgeroute serve`, measures, stops them.

Processes: mocks run as ``python -m edgeroute.bench.faults`` subprocesses and the proxy as
``python -m edgeroute serve`` on a temp YAML config, each on a free 127.0.0.1 port;
everything started is stopped by PID (SIGTERM, then SIGKILL) when the scenario ends,
whatever happens. On a machine with two or more CPUs the proxy is pinned to the
last CPU and the generator and mocks to the others, so that what is measured is one
proxy process on one core (``pin=False`` to disable).

Scenarios: overhead, throughput, streaming, resources, failover, hedging, chaos, peer.
Each returns a JSON-able dict and prints a table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from edgeroute.bench import loadgen, nginx_upstream, reference, report, wrk
from edgeroute.bench.loadgen import Load, Stats, Target

MOCK_MODEL = "gpt-4o-mini"
PUBLIC_MODEL = "bench"


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return []


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    admin_port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def cpu_seconds(self) -> float:
        """CPU time of the process and of its live children (the workers of `serve --workers`)."""
        total = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parts = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry.name) == self.pid or int(parts[1]) == self.pid:
                total += (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, kill: bool = False) -> None:
        if not self.alive():
            return
        try:
            os.kill(self.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(5)
        except ProcessLookupError:
            pass


@dataclass
class Stack:
    """The processes a scenario started; `close` stops them all, by PID."""

    pin: bool = True
    procs: list[Proc] = field(default_factory=list)
    tmp: tempfile.TemporaryDirectory[str] = field(default_factory=tempfile.TemporaryDirectory)

    def __post_init__(self) -> None:
        cpus = _cpus()
        self.proxy_cpus = cpus[-1:] if self.pin and len(cpus) >= 2 else []
        self.other_cpus = cpus[:-1] if self.pin and len(cpus) >= 2 else []
        self._saved_cpus = cpus
        if self.other_cpus:
            os.sched_setaffinity(0, self.other_cpus)

    def _spawn(
        self, name: str, argv: list[str], cpus: list[int], pythonpath: str | None = None
    ) -> subprocess.Popen[bytes]:
        def pre() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        err = open(Path(self.tmp.name) / f"{name}.stderr", "ab")  # the child keeps its own copy
        try:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, preexec_fn=pre, env=env)
        finally:
            err.close()

    def stderr_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (Path(self.tmp.name) / f"{name}.stderr").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def upstream(self, *args: str, name: str = "mock", port: int = 0, admin: bool = True) -> Proc:
        """An `edgeroute.bench.faults` upstream; its admin API also on a second port (it survives `refuse`)."""
        argv = [sys.executable, "-m", "edgeroute.bench.faults", "--port", str(port), *args]
        admin_port = free_port() if admin else None
        if admin_port is not None:
            argv += ["--admin-port", str(admin_port)]
        p = self._spawn(name, argv, self.other_cpus)
        assert p.stdout is not None
        line = p.stdout.readline().decode()
        if not line.startswith("listening port="):
            p.kill()
            raise RuntimeError(f"mock {name} did not start: {line!r}")
        proc = Proc(name, p, int(line.split()[1].split("=")[1]), admin_port)
        self.procs.append(proc)
        return proc

    def nginx(self, name: str = "nginx") -> Proc:
        """An nginx upstream with one canned chat completion (`nginx_upstream`), on the other CPUs."""
        cpus = self.other_cpus

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        port = free_port()
        p = nginx_upstream.start(port, Path(self.tmp.name) / name, pin)
        proc = Proc(name, p, port)
        self.procs.append(proc)
        return proc

    def floor(self, upstream_url: str, raw: bool = False) -> Proc:
        """A bare pass-through proxy of :mod:`edgeroute.bench.floor` (aiohttp, or `raw` http1), on the proxy's CPU."""
        argv = [sys.executable, "-m", "edgeroute.bench.floor", "--upstream", upstream_url] + (["--raw"] if raw else [])
        p = self._spawn("floor", argv, self.proxy_cpus)
        assert p.stdout is not None
        line = p.stdout.readline().decode()
        if not line.startswith("listening port="):
            p.kill()
            raise RuntimeError(f"floor proxy did not start: {line!r}")
        proc = Proc("floor", p, int(line.split("=")[1]))
        self.procs.append(proc)
        return proc

    def restart(self, old: Proc, *args: str) -> Proc:
        """Starts a mock again on the port (and admin port) of a stopped one."""
        self.procs.remove(old)
        argv = [sys.executable, "-m", "edgeroute.bench.faults", "--port", str(old.port), *args]
        if old.admin_port is not None:
            argv += ["--admin-port", str(old.admin_port)]
        p = self._spawn(old.name, argv, self.other_cpus)
        assert p.stdout is not None
        p.stdout.readline()
        proc = Proc(old.name, p, old.port, old.admin_port)
        self.procs.append(proc)
        return proc

    def proxy(
        self, cfg: dict[str, Any], name: str = "edgeroute", tree: str | None = None, workers: int = 1
    ) -> tuple[Proc, float]:
        """`edgeroute serve` on `cfg` (from source tree `tree` when given, else this install); returns
        it and the seconds from spawn to /readyz answering 200. With `workers` > 1 the proxy runs
        that many worker processes on every CPU (not pinned)."""
        path = Path(self.tmp.name) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        port = free_port()
        t0 = time.perf_counter()
        argv = [sys.executable, "-m", "edgeroute", "serve", "-c", str(path), "--port", str(port)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        p = self._spawn(name, argv, self.proxy_cpus if workers == 1 else self._saved_cpus, tree)
        proc = Proc(name, p, port)
        self.procs.append(proc)
        try:
            ready = wait_ready(f"http://127.0.0.1:{port}/readyz", p)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.stderr_tail(name)}") from None
        return proc, ready - t0

    def profiler(self, proc: Proc, seconds: float, path: str | None) -> subprocess.Popen[bytes] | None:
        """py-spy (from PyPI) sampling `proc` for `seconds` into `path`; None when not asked or not installed.

        Only the thread holding the GIL is sampled: the profile shows where CPU goes, not who waits."""
        if not path:
            return None
        exe = shutil.which("py-spy")
        if exe is None:
            _print("py-spy is not installed (pip install py-spy): no profile")
            return None
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(path).suffix, "raw")
        argv = [
            exe,
            "record",
            "-p",
            str(proc.pid),
            "-d",
            str(max(1, int(seconds))),
            "-r",
            "250",
            "--gil",
            "-f",
            fmt,
            "-o",
            path,
        ]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        self.tmp.cleanup()
        if self.other_cpus:
            os.sched_setaffinity(0, self._saved_cpus)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_ready(url: str, p: subprocess.Popen[bytes], timeout: float = 20.0) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"process exited with {p.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{url} not ready after {timeout} s")


# -- configs ------------------------------------------------------------------------------


def bench_config(
    upstreams: dict[str, str],
    *,
    rules: int = 50,
    deployments: int = 4,
    models: dict[str, dict[str, Any]] | None = None,
    health: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A realistic config: one provider per upstream URL, `deployments` deployments spread over them,
    public model `bench` over all, and `rules` rules of every kind that the bench traffic does not match
    (so each request pays for evaluating all of them, then takes the default route)."""
    names = list(upstreams)
    providers = {n: {"kind": "openai", "base_url": url, "api_key": f"key-{n}"} for n, url in upstreams.items()}
    deps: dict[str, Any] = {}
    for i in range(max(deployments, len(names))):
        deps[f"d{i}"] = {
            "provider": names[i % len(names)],
            "model": MOCK_MODEL,
            "price": {"input_per_mtok": 0.15 + i * 0.01, "output_per_mtok": 0.6},
            "context_window": 128000,
            "tags": [f"region:{['us', 'eu', 'ap'][i % 3]}"],
        }
    cfg_models: dict[str, Any] = {PUBLIC_MODEL: {"deployments": list(deps)}, "eu": {"deployments": list(deps)[1::3]}}
    cfg_models.update(models or {})
    rule_list: list[dict[str, Any]] = []
    kinds = ["keywords", "patterns", "tags", "models", "min_tokens", "users"]
    for i in range(rules):
        kind = kinds[i % len(kinds)]
        table: dict[str, dict[str, Any]] = {
            "keywords": {"keywords": [f"zanzibar{i}", f"quokka{i}"]},
            "patterns": {"patterns": [rf"\bTICKET-{i}-\d{{4}}\b"]},
            "tags": {"tags": [f"team-{i}"]},
            "models": {"models": [f"legacy-{i}"]},
            "min_tokens": {"min_tokens": 200_000 + i, "models": [PUBLIC_MODEL]},
            "users": {"users": [f"user-{i}@example.com"]},
        }
        when = table[kind]
        rule_list.append({"name": f"rule-{i:02d}-{kind}", "priority": i, "when": when, "then": {"route": "eu"}})
    if rules:
        rule_list[-1] = {
            "name": "pii-stays-in-eu",
            "priority": 1000,
            "when": {"pii": ["email", "payment_card", "iban"]},
            "then": {"route": "eu"},
        }
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "max_in_flight": 20000},
        "providers": providers,
        "deployments": deps,
        "models": cfg_models,
        "rules": rule_list,
    }
    if health:
        cfg["health"] = health
    return cfg


# -- helpers ----------------------------------------------------------------------------


def added(proxy: Stats, direct: Stats, metric: str = "latency_ms") -> dict[str, float | None]:
    """Proxy minus direct, percentile by percentile (ms)."""
    p, d = proxy.summary()[metric], direct.summary()[metric]
    if not p or not d:
        return {}
    return {k: round(p[k] - d[k], 4) for k in ("p50", "p90", "p99", "p99.9", "mean")}


def _print(*parts: str) -> None:
    print(*parts, flush=True)


def admin_get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as r:
        data: dict[str, Any] = orjson.loads(r.read())
        return data


@contextlib.contextmanager
def _sampler(proc: Proc, period: float = 0.1) -> Iterator[list[float]]:
    """Samples a process's RSS (MB) on a thread while the block runs."""
    import threading

    out: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            out.append(proc.rss_mb())
            stop.wait(period)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()


@dataclass
class Common:
    """Options every scenario takes."""

    duration: float = 10.0
    requests: int = 100_000
    prompt_tokens: int = 1500
    progress: bool = False
    pin: bool = True
    html: str | None = None
    json: str | None = None
    warmup: int = 200
    profile: str | None = None  # py-spy output for the proxy: .svg flame graph, .txt raw stacks, .json speedscope


# -- scenarios ----------------------------------------------------------------------------


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
                            label=f"{rate:g}/s ")
            )  # fmt: skip
            cpu = proxy.cpu_seconds() - cpu0
            if spy is not None:
                spy.wait(30)
                _print(f"profile of the proxy at {rate:g}/s: {c.profile}")
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
                _print(f"edgeroute {beside} adds {res['beside_added_ms']}")
            if floor_proc is not None:
                if floor_interleaved:
                    fd, f = d, stats[-1]
                else:
                    pair = [targets[0], Target("bare aiohttp", f"http://127.0.0.1:{floor_proc.port}/v1", MOCK_MODEL)]
                    fcpu0 = floor_proc.cpu_seconds()
                    fd, f = loadgen.arun(
                        loadgen.run(pair, load, stream=stream, prompt_tokens=c.prompt_tokens, progress=c.progress,
                                    label=f"floor {rate:g}/s ")
                    )  # fmt: skip
                fcpu = floor_proc.cpu_seconds() - fcpu0
                res["floor_added_ms"] = added(f, fd, "ttft_ms" if stream else "latency_ms")
                res["floor"] = f.summary()
                res["floor_cpu_ms_per_request"] = round(1000 * fcpu / max(1, f.ok + f.failed + load.warmup), 4)
                if not floor_interleaved:
                    stats.append(f)
                _print(
                    f"bare aiohttp pass-through adds {res['floor_added_ms']}, "
                    f"{res['floor_cpu_ms_per_request']} ms CPU/req"
                )
            out["rates"][f"{rate:g}"] = res
            _print(report.table(stats, "ttft_ms" if stream else "latency_ms"))
            a = res["added_ms"]
            _print(
                f"rate {rate:g}/s: added p50 {a.get('p50')} ms  p90 {a.get('p90')}  p99 {a.get('p99')}  "
                f"p99.9 {a.get('p99.9')}  | proxy {p.rps:.0f} req/s, {res['proxy_cpu_ms_per_request']} ms CPU/req, "
                f"late sends {d.late_sends + p.late_sends}\n"
            )
            for s in stats:
                s.name = f"{s.name} @{rate:g}/s"
            all_stats += stats
        out["proxy_rss_after_mb"] = round(proxy.rss_mb(), 1)
    _write(c, "overhead", all_stats, out)
    return out


# A budget every request is admitted under (reserved, settled, journaled), never reached.
BENCH_BUDGETS = {"limits": [{"name": "bench-month", "scope": "global", "limit_usd": 1e9, "period": "month"}]}
BENCH_LIMITS = {"per_key": {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000}}


def _shared_state(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with budgets, limits and cache in Redis (`EDGEROUTE_BENCH_REDIS_URL`, default the
    loopback server's db 14), under a prefix of this run's own; its keys expire on their own."""
    url = os.environ.get("EDGEROUTE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    return _with(cfg, shared_state={"redis_url": url, "prefix": f"edgeroute-bench-{os.getpid()}", "timeout_ms": 500})


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
    with Stack(c.pin) as stack:
        mock = stack.nginx() if upstream == "nginx" else stack.upstream()
        url = f"http://127.0.0.1:{mock.port}/v1"
        cfg = bench_config({"p0": url, "p1": url})
        if cache:
            cfg["models"][PUBLIC_MODEL]["cache"] = CACHE_EVERYTHING
        proxy, _ = stack.proxy(cfg, workers=workers)
        all_stats = []
        for name, t in (
            ("direct", Target("direct", url, MOCK_MODEL)),
            ("edgeroute", Target("edgeroute", f"http://127.0.0.1:{proxy.port}/v1", PUBLIC_MODEL)),
        ):
            load = Load(requests=c.requests, duration=c.duration, rate=None, concurrency=concurrency, warmup=50)
            if generator == "wrk":
                _wrk_phase(c, t, load, stack, proxy, mock, name, out, workers)
                continue
            spy = stack.profiler(proxy, c.duration, c.profile if name == "edgeroute" else None)
            cpu0, gen0, mock0 = proxy.cpu_seconds(), time.process_time(), mock.cpu_seconds()
            (st,) = loadgen.arun(
                loadgen.run([t], load, prompt_tokens=c.prompt_tokens, progress=c.progress, label=name + " ")
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
            _print(f"{name}: {st.rps:.0f} req/s ({st.ok} ok, {st.failed} failed, concurrency {concurrency}); "
                   f"proxy CPU {cpu / max(st.elapsed_s, 1e-9) * 100:.0f}%")  # fmt: skip
            all_stats.append(st)
        if all_stats:  # wrk reports no latency percentiles here
            _print(report.table(all_stats))
    _write(c, "throughput", all_stats, out)
    return out


def _cpu_split(out: dict[str, Any], proxy_ms: float, gen_ms: float, mock_ms: float, workers: int) -> None:
    """CPU per request of the proxy, the generator and the mock, and the rates they bound: the
    machine's cores shared by all three (CPU-bound, no idle time), and the proxy's workers alone."""
    cores = os.cpu_count() or 1
    out["proxy_cpu_ms_per_request"] = round(proxy_ms, 4)
    out["proxy_capacity_rps_per_core"] = round(1000 / proxy_ms)
    out["machine_bound_rps"] = round(1000 * cores / (proxy_ms + gen_ms + mock_ms))
    out["workers_bound_rps"] = round(1000 * min(workers, cores) / proxy_ms)
    _print(f"CPU per request: proxy {proxy_ms:.3f} ms, generator {gen_ms:.3f} ms, mock {mock_ms:.3f} ms; "
           f"{cores} cores shared by all three bound the rate at {out['machine_bound_rps']} req/s, "
           f"{workers} worker(s) alone at {out['workers_bound_rps']} req/s")  # fmt: skip


def _wrk_phase(
    c: Common, t: Target, load: Load, stack: Stack, proxy: Proc, mock: Proc, name: str, out: dict[str, Any],
    workers: int,
) -> None:  # fmt: skip
    """One target of `throughput` under wrk: a short warm-up run, then the measured one."""
    body = loadgen.chat_body(t.model, c.prompt_tokens)
    url = t.url + "/chat/completions"
    wrk.run(url, body, 1, load.concurrency)
    spy = stack.profiler(proxy, c.duration, c.profile if name == "edgeroute" else None)
    cpu0, mock0 = proxy.cpu_seconds(), mock.cpu_seconds()
    res = wrk.run(url, body, c.duration, load.concurrency)
    cpu, mock_s = proxy.cpu_seconds() - cpu0, mock.cpu_seconds() - mock0
    if spy is not None:
        spy.wait(30)
    per = 1000 / max(1, res.requests)
    out[name] = {"rps": round(res.rps), "requests": res.requests, "non_2xx": res.non_2xx, "errors": res.errors,
                 "proxy_cpu_s": round(cpu, 2), "generator_cpu_ms_per_request": round(res.cpu_s * per, 4),
                 "mock_cpu_ms_per_request": round(mock_s * per, 4)}  # fmt: skip
    _print(f"{name}: {res.rps:.0f} req/s under wrk ({res.requests} answers, {res.non_2xx} not 2xx, "
           f"{res.errors} socket errors, concurrency {load.concurrency})")  # fmt: skip
    if name == "edgeroute" and cpu > 0:
        _cpu_split(out, cpu * per, res.cpu_s * per, mock_s * per, workers)


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
                _print(f"round {r + 1} {t}: {st.rps:.0f} req/s, {cpu_ms:.4f} ms CPU/request, {st.failed} failed")
        for t in trees:
            cpu = sorted(x["cpu_ms_per_request"] for x in runs[t])
            out["trees"][t] = {"runs": runs[t], "median_cpu_ms_per_request": cpu[len(cpu) // 2],
                               "rss_mb": round(procs[t].rss_mb(), 1)}  # fmt: skip
        base = out["trees"][trees[0]]["median_cpu_ms_per_request"]
        for t in trees:
            m = out["trees"][t]["median_cpu_ms_per_request"]
            out["trees"][t]["throughput_vs_first"] = round(base / m, 3) if m else None
            _print(f"{t}: median {m} ms CPU/request, throughput per core x{out['trees'][t]['throughput_vs_first']}")
    _write(c, "compare", [], out)
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
        _print(report.table(stats, "ttft_ms"))
        _print(report.table(stats, "chunk_gap_ms"))
        _print(
            f"added TTFT {out['added_ttft_ms']}\nSSE events per socket read (1.0 = never merged): "
            f"{out['events_per_read']}; chunks merged by the proxy: {out['merged']}; "
            f"delayed (gap p50 +1 ms): {out['delayed']}; proxy CPU {out['proxy_cpu_ms_per_stream']} ms/stream"
        )
    _write(c, "streaming", stats, out)
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
        with _sampler(proxy) as rss:
            (st,) = loadgen.arun(
                loadgen.run([t], load, stream=True, prompt_tokens=c.prompt_tokens, progress=c.progress)
            )
        out["rss_streams_peak_mb"] = round(max(rss), 1)
        out["streams"] = streams
        out["streams_ok"] = st.ok
        out["streams_failed"] = st.errors
        time.sleep(1.0)
        out["rss_after_mb"] = round(proxy.rss_mb(), 1)
    _print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    _write(c, "resources", [st], out)
    return out


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
        _print(report.table(stats))
        for s in stats:
            _print(f"{s.name}: failed {s.failed} {s.errors}")
    _write(c, "failover", stats, out)
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
        _print(report.table(stats))
        for s in stats:
            _print(f"{s.name}: extra upstream requests {out[s.name]['extra_requests_pct']}%")
    _write(c, "hedging", stats, out)
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
                prog = loadgen.Progress(total, load.duration, c.progress, "chaos ")
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
        _print(report.table(list(phase_stats.values())))
        _print(
            f"failed requests: {out['failed_requests']} of {total}; killed at {timeline['killed_at_s']} s, "
            f"restarted at {restarted} s; first traffic to the restarted deployment after "
            f"{out['traffic_returned_after_s']} s, ≥30% share after {out['traffic_rebalanced_after_s']} s"
        )
        for k, s in phase_stats.items():
            _print(f"  {k}: errors {s.errors}")
    _write(c, "chaos", list(phase_stats.values()), {k: v for k, v in out.items() if k != "monitor"})
    return out


def peer(
    c: Common, peer_url: str, peer_model: str, peer_key: str, rate: float = 200.0, mock_port: int = 0
) -> dict[str, Any]:
    """Added latency of edgeroute and of another gateway (point it at the mock: `mock_port`), interleaved."""
    out: dict[str, Any] = {"scenario": "peer", "peer_url": peer_url}
    with Stack(c.pin) as stack:
        mock = stack.upstream(port=mock_port)
        url = f"http://127.0.0.1:{mock.port}/v1"
        _print(f"mock upstream: {url} (model {MOCK_MODEL}); the peer gateway must call it")
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
        _print(report.table(stats))
        _print(f"added latency: edgeroute {out['edgeroute_added_ms']}\n               peer      {out['peer_added_ms']}")
    _write(c, "peer", stats, out)
    return out


def _write(c: Common, name: str, stats: list[Stats], data: dict[str, Any]) -> None:
    """Adds the machine reference measured now (same sitting), then writes the JSON, a
    percentile plot beside it (same name, .svg), and the HTML report when asked."""
    ref = data.setdefault("machine", reference.machine())
    _print(
        f"machine reference: calibration {ref['calibration_ms']} ms (lower is faster), "
        f"load average {ref['load_avg_1m']} on {ref['cpus']} CPUs"
    )
    if c.json:
        report.write_json(c.json, data)
        if stats:
            Path(c.json).with_suffix(".svg").write_text(report.latency_svg(stats, f"edgeroute bench: {name}"))
    if c.html:
        report.write_html(c.html, f"edgeroute bench: {name}", stats, data)
