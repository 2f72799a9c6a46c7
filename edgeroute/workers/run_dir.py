"""The run directory of `serve --workers N`: where it lives, who owns it, when it may go.

It holds what the workers share on one machine while the server runs: sockets (metrics,
ejections), readiness files, the restart count, and three SQLite files (budgets and buckets,
capacity leases, the feedback learner's sums). None is needed after the server stops: the
budgets are filled again from the ledger, the learner's sums from its state file, by a new
supervisor's first worker, in a new directory. So a directory whose supervisor and workers
are all gone is garbage, and a supervisor killed with `kill -9` (which cannot clean up)
left one behind each time.

Ownership is a lock, not a pid: the supervisor and each worker hold a shared `flock` on the
directory's `owner.lock` for their lives (the kernel drops it when a process dies, however it
dies, and a reused pid cannot fake it). A new supervisor removes every `edgeroute-workers-*`
directory of its user under the same base whose lock it can take exclusively: nobody lives
there. A directory is set up under a hidden name and renamed once its lock is held, so a
sweep never sees one without its owner. A directory from a version without the lock is
removed when none of its workers' sockets accepts a connection and nothing in it changed
for a minute.

The base: `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`), else `$XDG_RUNTIME_DIR`
(per user, mode 0700, emptied at logout and boot), else the temporary directory, else `/tmp`:
the first whose path leaves room for the workers' Unix sockets (Linux binds a socket's path of
at most 107 bytes; a deeper base failed every worker at start, "AF_UNIX path too long").
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgeroute.workers.worker import OWNER_LOCK

PREFIX = "edgeroute-workers-"
_LEGACY_QUIET_S = 60.0
# The longest path a worker binds below a base: `/edgeroute-workers-<8 of mkdtemp>/health-<id>.sock`
# (ids of up to 4 digits), within the 107 bytes of a Unix socket's path.
MAX_BASE = 107 - len(f"/{PREFIX}12345678/health-9999.sock")

log = logging.getLogger("edgeroute.workers")


def base() -> Path:
    """Where run directories are made (see the module doc)."""
    for var in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        value = os.environ.get(var, "").split(":")[0]  # systemd may list several
        if value and os.path.isdir(value) and os.access(value, os.W_OK | os.X_OK):
            if len(os.fsencode(value)) <= MAX_BASE:
                return Path(value)
            log.warning("$%s is too long for the workers' sockets (over %d bytes): not used", var, MAX_BASE)
    tmp = tempfile.gettempdir()
    return Path(tmp if len(os.fsencode(tmp)) <= MAX_BASE else "/tmp")


@dataclass(slots=True)
class RunDir:
    """A run directory and the supervisor's descriptor holding its lock."""

    path: Path
    _fd: int

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._fd)


def create(where: Path) -> RunDir:
    """A new run directory under `where`, its lock held by this process until `remove`."""
    tmp = Path(tempfile.mkdtemp(prefix="." + PREFIX, dir=where))
    fd = os.open(tmp / OWNER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    final = where / tmp.name[1:]
    os.rename(tmp, final)
    return RunDir(final, fd)


def sweep(where: Path) -> list[Path]:
    """Removes the run directories under `where` that nobody owns any more; returns them."""
    removed = []
    uid = os.getuid()
    for d in sorted(where.glob(PREFIX + "*")):
        try:
            st = d.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:  # never another user's, never a link
            continue
        if _abandoned(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _abandoned(d: Path) -> bool:
    try:
        fd = os.open(d / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _legacy_abandoned(d)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a supervisor or a worker holds it: alive
    finally:
        os.close(fd)
    return True


def _legacy_abandoned(d: Path) -> bool:
    """A directory made before the lock: abandoned when quiet for a minute and no worker's
    metrics socket in it answers."""
    try:
        entries = list(d.iterdir())
        newest = max([d.lstat().st_mtime, *(e.lstat().st_mtime for e in entries)])
    except OSError:
        return False
    if time.time() - newest < _LEGACY_QUIET_S:
        return False
    for e in entries:
        if e.name.startswith("worker-") and e.name.endswith(".sock"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                try:
                    s.connect(str(e))
                except OSError:
                    continue
                return False
    return True
