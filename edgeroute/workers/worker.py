"""What a worker process knows about its place under the supervisor.

The supervisor (`edgeroute serve --workers N`) starts each worker with its number and a
private run directory in the environment. The directory holds one Unix socket per worker
(its own `/metrics`, for the merged scrape), one readiness file per worker, and the
supervisor's restart count. Without those variables the process is a single server.
Under `serve --cpu-affinity` it also names the one CPU the worker runs on (`pin`).
A worker holds a shared lock on the directory's `owner.lock` for its life, as the
supervisor does (`run_dir.py`): a directory is abandoned only when none of them lives.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from edgeroute.atomic_file import replace_file

ENV_ID, ENV_DIR, ENV_COUNT = "EDGEROUTE_WORKER_ID", "EDGEROUTE_WORKER_DIR", "EDGEROUTE_WORKER_COUNT"
ENV_CPU = "EDGEROUTE_WORKER_CPU"  # `serve --cpu-affinity`: the CPU the supervisor gave this worker
_PR_SET_PDEATHSIG = 1
RESTARTS_FILE = "restarts"  # the supervisor's restart count (`write_restarts`)
OWNER_LOCK = "owner.lock"  # shared-locked by the supervisor and each worker while they live
_held: list[int] = []  # this process's descriptor on it: kept open (the lock) until exit


@dataclass(frozen=True, slots=True)
class Worker:
    id: int
    count: int
    dir: Path

    def socket(self, worker: int) -> Path:
        """The Unix socket on which worker `worker` serves its own metrics."""
        return self.dir / f"worker-{worker}.sock"

    def ready_file(self, worker: int) -> Path:
        return self.dir / f"worker-{worker}.ready"

    def restarts(self) -> int:
        return read_restarts(self.dir)


def write_restarts(run_dir: Path, count: int) -> None:
    """The supervisor's restart count, replaced whole: a worker reading it for a scrape sees the
    old count or the new one (written in place, a read between the truncation and the write
    found it empty, and `edgeroute_worker_restarts_total` fell to 0 for that scrape). The run
    directory does not outlive the supervisor, so the file is not synced."""
    replace_file(run_dir / RESTARTS_FILE, str(count).encode(), durable=False)


def read_restarts(run_dir: Path) -> int:
    try:
        return int((run_dir / RESTARTS_FILE).read_text() or 0)
    except (OSError, ValueError):
        return 0


WORKER = web.AppKey("worker", Worker)


def ask_siblings_to_reload(worker: Worker | None) -> None:
    """After this worker applied a config through the admin API (and wrote it to the file),
    the supervisor sends SIGHUP to every other worker, which re-reads that file."""
    if worker is not None and worker.count > 1:
        (worker.dir / f"reload-{worker.id}.request").touch()


def current() -> Worker | None:
    """This process's place under a supervisor, or None when it serves alone."""
    wid, wdir = os.environ.get(ENV_ID), os.environ.get(ENV_DIR)
    if wid is None or not wdir:
        return None
    return Worker(int(wid), int(os.environ.get(ENV_COUNT, "1")), Path(wdir))


def die_with_parent() -> None:
    """Asks the kernel for SIGTERM when the supervisor dies, so no worker outlives it
    (a SIGKILLed supervisor cannot forward anything). Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def hold(worker: Worker) -> None:
    """Takes this worker's shared lock on its run directory, held until the process exits, so
    a new supervisor never removes the directory of a worker still draining (`run_dir.sweep`)."""
    try:
        fd = os.open(worker.dir / OWNER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        return
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held.append(fd)


def cpus() -> list[int]:
    """The CPUs this process may run on, in order (empty where the OS cannot pin a process)."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def cpu_for(worker: int, allowed: list[int]) -> int:
    """`serve --cpu-affinity`: worker `worker`'s CPU, one per CPU in turn (as nginx's
    `worker_cpu_affinity auto`); a restarted worker gets the same one back."""
    return allowed[worker % len(allowed)]


def pin(default: int | None = None) -> int | None:
    """Pins this process to the CPU its supervisor chose (`ENV_CPU`, in a worker), else to `default`; returns
    the CPU, or None when there is none to pin to. Called before any thread starts: threads
    inherit the CPU set of the thread that starts them, so the whole worker (event loop, ledger
    writer, thread pools) stays on its core and its threads hand the GIL over on one core
    instead of waking each other across two."""
    raw = os.environ.get(ENV_CPU) if current() is not None else None  # a supervisor's word only
    cpu = int(raw) if raw and raw.isdigit() else default
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as e:  # the CPU went offline, or a cgroup took it away: serve unpinned
        print(f"edgeroute: cannot pin to CPU {cpu} ({e.strerror}); running on every CPU", file=sys.stderr, flush=True)
        return None
    return cpu
