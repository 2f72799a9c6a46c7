"""What every benchmark scenario stands on: the processes it starts, the config it serves, the
options it takes and how it writes its results.

Processes: mocks run as ``python -m edgeroute.bench.faults`` subprocesses and the proxy as
``python -m edgeroute serve`` on a temp YAML config, each on a free 127.0.0.1 port;
everything started is stopped by PID (SIGTERM, then SIGKILL) when the scenario ends,
whatever happens. On a machine with two or more CPUs the proxy is pinned to the
last CPU and the generator and mocks to the others, so that what is measured is one
proxy process on one core (``pin=False`` to disable). With ``shield=False`` the generator
and mocks run on every CPU, the proxy's included: what a comparison of one worker with
several needs, as several workers leave no core to themselves (`placement`).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from edgeroute.bench import nginx_upstream, reference, report
from edgeroute.bench.loadgen import Stats

MOCK_MODEL = "gpt-4o-mini"
PUBLIC_MODEL = "bench"


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def usable_cpus() -> list[int]:
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
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[int, float]:
        """CPU time by pid: the process's and each live child's (a supervisor's workers)."""
        found: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parts = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry.name) == self.pid or int(parts[1]) == self.pid:
                found[int(entry.name)] = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        return found

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


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@dataclass
class Stack:
    """The processes a scenario started; `close` stops them all, by PID."""

    pin: bool = True
    shield: bool = True  # the proxy's CPU its own (else the generator and mocks share it)
    procs: list[Proc] = field(default_factory=list)
    tmp: tempfile.TemporaryDirectory[str] = field(default_factory=tempfile.TemporaryDirectory)

    def __post_init__(self) -> None:
        cpus = usable_cpus()
        self.proxy_cpus = cpus[-1:] if self.pin and len(cpus) >= 2 else []
        self.other_cpus = (cpus[:-1] if self.shield else cpus) if self.proxy_cpus else []
        self._saved_cpus = cpus
        if self.other_cpus:
            os.sched_setaffinity(0, self.other_cpus)
        # A SIGTERM (`timeout`, a cancelled CI job) ends the bench through `close`: by default
        # it died at once, and its proxy and upstreams ran on, orphaned.
        self._saved_term: Any = None
        if threading.current_thread() is threading.main_thread():
            self._saved_term = signal.signal(signal.SIGTERM, _exit_on_term)

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
            # Run in the tree: `python -m` puts the working directory on sys.path before
            # PYTHONPATH, so a compare run from a checkout measured that checkout as every tree.
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, preexec_fn=pre, env=env, cwd=pythonpath)
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

    def pins_workers(self, workers: int) -> bool:
        """Whether `proxy(..., cpu_affinity=True)` pins `workers` workers one per CPU."""
        return workers > 1 and bool(self.proxy_cpus)

    def placement(self, workers: int, cpu_affinity: bool = False) -> str:
        """Where the proxy, the generator and the mocks run, in words (printed with the results)."""
        if not self.proxy_cpus:
            return "nothing pinned"
        if workers > 1:
            proxy = "each worker pinned to one CPU (serve --cpu-affinity)" if cpu_affinity else "workers on every CPU"
        else:
            proxy = f"the proxy pinned to CPU {self.proxy_cpus[0]}"
        others = "on the other CPUs" if self.shield else "on every CPU (the proxy's shared)"
        return f"{proxy}; generator and upstream {others}"

    def proxy(
        self,
        cfg: dict[str, Any],
        name: str = "edgeroute",
        tree: str | None = None,
        workers: int = 1,
        cpu_affinity: bool = False,
    ) -> tuple[Proc, float]:
        """`edgeroute serve` on `cfg` (from source tree `tree` when given, else this install); returns
        it and the seconds from spawn to /readyz answering 200. With `workers` > 1 the proxy runs
        that many worker processes on every CPU: each pinned to one of them with `cpu_affinity`
        (when this stack pins), else free; it returns once every worker listens (the seconds to
        then): /readyz answers as soon as one does, and a load started then put its kept-alive
        connections on that worker alone (5,101 req/s from "two workers", the other starting)."""
        path = Path(self.tmp.name) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        port = free_port()
        t0 = time.perf_counter()
        argv = [sys.executable, "-m", "edgeroute", "serve", "-c", str(path), "--port", str(port)]
        if workers > 1:
            argv += ["--workers", str(workers)]
            if cpu_affinity and self.pins_workers(workers):
                argv += ["--cpu-affinity"]
        p = self._spawn(name, argv, self.proxy_cpus if workers == 1 else self._saved_cpus, tree)
        proc = Proc(name, p, port)
        self.procs.append(proc)
        try:
            ready = wait_ready(f"http://127.0.0.1:{port}/readyz", p)
            if workers > 1:
                ready = wait_line(p, f" ({workers} workers)")
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
            say("py-spy is not installed (pip install py-spy): no profile")
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
        if self._saved_term is not None:
            signal.signal(signal.SIGTERM, self._saved_term)
            self._saved_term = None

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


def wait_line(p: subprocess.Popen[bytes], ending: str, timeout: float = 60.0) -> float:
    """Reads `p`'s stdout until a line ends with `ending` (as the supervisor's "edgeroute listening
    on ... (N workers)", printed once every worker listens); returns when, as `wait_ready`."""
    assert p.stdout is not None
    fd, want, seen = p.stdout.fileno(), ending.encode() + b"\n", b""
    deadline = time.perf_counter() + timeout
    while want not in seen:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise RuntimeError(f"no line ending with {ending!r} on stdout after {timeout} s: {seen[-300:]!r}")
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)  # the pipe itself: the buffered reader could hold a line back
            if not chunk:
                raise RuntimeError(f"process exited with {p.wait()} before saying {ending!r}: {seen[-300:]!r}")
            seen += chunk
    return time.perf_counter()


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


def say(*parts: str) -> None:
    print(*parts, flush=True)


def admin_get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as r:
        data: dict[str, Any] = orjson.loads(r.read())
        return data


@contextlib.contextmanager
def rss_sampler(proc: Proc, period: float = 0.1) -> Iterator[list[float]]:
    """Samples a process's RSS (MB) on a thread while the block runs."""
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


def write_result(c: Common, name: str, stats: list[Stats], data: dict[str, Any]) -> None:
    """Adds the machine reference measured now (same sitting), then writes the JSON, a
    percentile plot beside it (same name, .svg), and the HTML report when asked."""
    ref = data.setdefault("machine", reference.machine())
    say(
        f"machine reference: calibration {ref['calibration_ms']} ms (lower is faster), "
        f"load average {ref['load_avg_1m']} on {ref['cpus']} CPUs"
    )
    if c.json:
        report.write_json(c.json, data)
        if stats:
            Path(c.json).with_suffix(".svg").write_text(report.latency_svg(stats, f"edgeroute bench: {name}"))
    if c.html:
        report.write_html(c.html, f"edgeroute bench: {name}", stats, data)
