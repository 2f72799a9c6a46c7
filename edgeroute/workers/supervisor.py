"""`edgeroute serve --workers N`: N worker processes on one port, kept running.

Each worker is a whole `edgeroute serve` process that binds the port with `SO_REUSEPORT`,
so the kernel spreads new connections over them and no request crosses a process. The
supervisor does no request work; it

- holds the port (bound with `SO_REUSEPORT`, never listening), so port 0 becomes one port
  for all workers and a restarting worker always gets the same one back;
- restarts a worker that exits unasked (after a delay that doubles while it keeps
  crashing, up to 30 s), and counts restarts for `/metrics`;
- forwards SIGHUP (each worker reloads its config; a worker that applied a config through
  the admin API asks for the same, for its siblings; a worker still starting gets it once
  ready, as a SIGHUP before its handler is set would end it) and SIGTERM/SIGINT (each worker drains
  its in-flight requests and streams), then waits for all of them; a worker still running
  `server.drain_timeout` + 10 s later is killed;
- with `cpus` (`serve --cpu-affinity`), gives worker i the i-th of them (in turn), which the
  worker pins itself to before it starts a thread (`worker.pin`).

A worker's state that must be one for the whole server (budgets, limits, health, cache)
goes through `shared_state` (Redis) or, without it, the local stores in the run directory
(`run_dir.py`: where it lives, and how a new supervisor removes those whose owner died).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from edgeroute import reload_signal
from edgeroute.workers import run_dir as run_dirs
from edgeroute.workers.worker import ENV_COUNT, ENV_CPU, ENV_DIR, ENV_ID, cpu_for, write_restarts

# A worker that lived this long before exiting is not "crashing in a loop": its restart delay resets.
_STABLE_S = 30.0
_MAX_DELAY_S = 30.0
_DRAIN_GRACE_S = 10.0


def resolve_workers(value: str) -> int:
    """`auto` (one per core) or a positive number."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--workers takes a number or 'auto', not {value!r}") from None
    if not 1 <= n <= 256:
        raise ValueError(f"--workers must be between 1 and 256, not {n}")
    return n


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT and not listening: it fixes the port
    (port 0: a free one) while the workers bind it too and take the connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


def cannot_listen(host: str, port: int, err: OSError) -> str:
    """The line `serve` stops with when it cannot bind: what failed and what to do about it."""
    why = os.strerror(err.errno) if err.errno else str(err)
    if err.errno == errno.EADDRINUSE:
        why += " (another process listens there: stop it, or choose another port with --port or server.port)"
    elif err.errno == errno.EACCES:
        why += " (ports below 1024 need privileges: choose a higher one with --port or server.port)"
    elif err.errno == errno.EADDRNOTAVAIL:
        why += " (no interface of this machine has that address: check --host or server.host)"
    return f"edgeroute: cannot listen on {host}:{port}: {why}"


@dataclass(slots=True)
class _Slot:
    id: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    delay: float = 0.5
    restart_at: float | None = None
    reload_due: bool = False  # a SIGHUP held until the worker is ready (`_signal_all`)


@dataclass(slots=True)
class Supervisor:
    """Starts and keeps `count` workers; `command` is a worker's argv (without the worker env)."""

    command: list[str]
    count: int
    drain_timeout: float
    print_fn: Callable[[str], None] = print
    owned: run_dirs.RunDir = field(default_factory=lambda: run_dirs.create(run_dirs.base()))
    restarts: int = 0
    on_tick: Callable[[Path], None] | None = None  # given the run directory, every 0.1 s
    cpus: list[int] | None = None  # `--cpu-affinity`: the CPUs the workers are pinned to, one each
    _slots: list[_Slot] = field(default_factory=list)
    _stop: bool = False
    _hup: bool = False

    @property
    def run_dir(self) -> Path:
        return self.owned.path

    def _env(self, wid: int) -> dict[str, str]:
        env = dict(os.environ)
        env[ENV_ID], env[ENV_DIR], env[ENV_COUNT] = str(wid), str(self.run_dir), str(self.count)
        env.pop(ENV_CPU, None)
        if self.cpus:
            env[ENV_CPU] = str(cpu_for(wid, self.cpus))
        return env

    def _start(self, slot: _Slot) -> None:
        (self.run_dir / f"worker-{slot.id}.ready").unlink(missing_ok=True)
        slot.proc = subprocess.Popen(self.command, env=self._env(slot.id))
        slot.started = time.monotonic()
        slot.restart_at = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._hup = True
        else:
            self._stop = True

    def _wait_ready(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and not self._stop:
            if all(self._ready(s) for s in self._slots):
                return True
            if any(s.proc is not None and s.proc.poll() is not None for s in self._slots):
                return False  # a worker died while starting: its error is on stderr
            time.sleep(0.05)
        return False

    def run(self, listening: str) -> int:
        """Runs until SIGTERM/SIGINT; returns the exit code (0 when every worker drained cleanly)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._hup = self._hup or reload_signal.take()  # asked while the supervisor was starting
        self._slots = [_Slot(i) for i in range(self.count)]
        try:
            for slot in self._slots:
                self._start(slot)
            if not self._wait_ready(60.0):
                if not self._stop:
                    print("edgeroute: a worker failed to start; stopping", file=sys.stderr, flush=True)
                    self._stop = True
                    return self._shutdown() or 1
            else:
                if self.cpus:
                    self.print_fn(f"edgeroute: workers pinned to CPUs {self._placement()} (--cpu-affinity)")
                self.print_fn(f"edgeroute listening on {listening} ({self.count} workers)")
            while not self._stop:
                self._tick()
                time.sleep(0.1)
            return self._shutdown()
        finally:
            self.owned.remove()

    def _placement(self) -> str:
        cpus = self.cpus or []
        return ", ".join(str(cpu_for(i, cpus)) for i in range(self.count)) if cpus else ""

    def _tick(self) -> None:
        if self.on_tick is not None:
            self.on_tick(self.run_dir)
        if self._hup:
            self._hup = False
            self._signal_all(signal.SIGHUP)
        for request in self.run_dir.glob("reload-*.request"):
            request.unlink(missing_ok=True)
            sender = request.name.removeprefix("reload-").removesuffix(".request")
            self._signal_all(signal.SIGHUP, but=int(sender) if sender.isdigit() else None)
        for slot in self._slots:
            if slot.reload_due and self._ready(slot) and slot.proc is not None and slot.proc.poll() is None:
                slot.reload_due = False
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGHUP)
        now = time.monotonic()
        for slot in self._slots:
            proc = slot.proc
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    self._start(slot)
                continue
            if proc is None or (code := proc.poll()) is None:
                continue
            lived = now - slot.started
            slot.delay = 0.5 if lived >= _STABLE_S else min(_MAX_DELAY_S, slot.delay * 2)
            slot.restart_at = now + (0.0 if lived >= _STABLE_S else slot.delay)
            self.restarts += 1
            write_restarts(self.run_dir, self.restarts)
            print(
                f"edgeroute: worker {slot.id} (pid {proc.pid}) exited with {_describe(code)}; "
                f"restarting it in {slot.restart_at - now:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    def _ready(self, slot: _Slot) -> bool:
        return (self.run_dir / f"worker-{slot.id}.ready").exists()

    def _signal_all(self, sig: signal.Signals, but: int | None = None) -> None:
        for slot in self._slots:
            if slot.id != but and slot.proc is not None and slot.proc.poll() is None:
                if sig == signal.SIGHUP and not self._ready(slot):
                    # A worker restarted a moment ago has no handler yet: SIGHUP would end it
                    # (restarted again, later, counted as a crash). It gets the reload once ready.
                    slot.reload_due = True
                    continue
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    def _shutdown(self) -> int:
        self.print_fn(f"edgeroute draining {self.count} workers")
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout + _DRAIN_GRACE_S
        code = 0
        for slot in self._slots:
            if slot.proc is None:
                continue
            try:
                rc = slot.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"edgeroute: worker {slot.id} did not drain in time; killing it", file=sys.stderr, flush=True)
                slot.proc.kill()
                rc = slot.proc.wait()
            code = code or (0 if rc in (0, -signal.SIGTERM) else 1)
        return code


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
