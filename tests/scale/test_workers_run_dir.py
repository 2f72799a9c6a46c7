"""`serve --workers N`'s run directory: a supervisor killed with `kill -9` cannot remove it, so
the next one removes every directory whose supervisor and workers are all gone, and never
one that a live server uses.

Before, each killed supervisor left its `edgeroute-workers-*` directory (three SQLite files,
sockets) in the temporary directory for good: 58 of them were found on one machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeroute.workers import run_dir
from tests.conftest import eventually, simple_config
from tests.scale.support import Spawn, children

PREFIX = "edgeroute-workers-"


def _dirs(base: Path) -> set[Path]:
    return set(base.glob(PREFIX + "*"))


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


async def _ready(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
        return r.status


async def test_a_new_supervisor_removes_the_run_directories_of_dead_ones_only(
    start_upstream: Any, spawn: Spawn, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = short_tmp / "tmp"
    base.mkdir()
    monkeypatch.setenv("TMPDIR", str(base))  # where the old code made them too
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    up = await start_upstream()
    cfg = simple_config({"a": up})

    killed = await spawn(cfg, "--workers", "2", name="killed")
    (killed_dir,) = _dirs(base)
    alive = await spawn(cfg, "--workers", "2", name="alive")
    (alive_dir,) = _dirs(base) - {killed_dir}

    workers = children(killed.proc.pid)
    assert len(workers) == 2
    os.kill(killed.proc.pid, signal.SIGKILL)

    async def drained() -> bool:
        return all(_gone(w) for w in workers)

    await eventually(drained, "the killed supervisor's workers ending")
    assert killed_dir.is_dir()  # nobody could clean it up

    # Two directories from a version without the owner lock, quiet for two minutes: one whose
    # worker socket nobody listens on any more, one whose worker still answers.
    stale, busy = base / (PREFIX + "legacy1"), base / (PREFIX + "legacy2")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for d in (stale, busy):
        d.mkdir()
        (d / "shared.db").write_bytes(b"")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as closed:
        closed.bind(str(stale / "worker-0.sock"))
    listening.bind(str(busy / "worker-0.sock"))
    listening.listen()
    old = time.time() - 120
    for d in (stale, busy):
        for p in (*d.iterdir(), d):
            os.utime(p, (old, old), follow_symlinks=False)

    try:
        new = await spawn(cfg, "--workers", "2", name="new")
        left = _dirs(base)
    finally:
        listening.close()
    assert killed_dir not in left and stale not in left
    assert alive_dir in left and busy in left
    assert len(left - {alive_dir, busy}) == 1  # the new supervisor's own
    assert f"removed 2 run directories left in {base}" in new.output()
    # The live server kept serving through it, and the new one serves.
    assert await _ready(alive.url) == 200
    assert await _ready(new.url) == 200

    # A supervisor stopped as usual removes its own.
    (new_dir,) = left - {alive_dir, busy}
    new.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(new.proc.wait(), 15) == 0
    assert not new_dir.exists()


async def test_the_run_directory_is_made_in_the_runtime_directory(
    start_upstream: Any, spawn: Spawn, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`$XDG_RUNTIME_DIR` (per user, 0700, emptied at boot), or systemd's `RuntimeDirectory=`."""
    runtime, tmp = short_tmp / "run", short_tmp / "tmp"
    runtime.mkdir(mode=0o700)
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    up = await start_upstream()
    await spawn(simple_config({"a": up}), "--workers", "2")
    assert len(_dirs(runtime)) == 1 and not _dirs(tmp)


def test_a_base_too_long_for_the_workers_sockets_is_passed_over(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A deep `$RUNTIME_DIRECTORY` failed every worker at start ("AF_UNIX path too long"): the
    next base is used, and the operator told why."""
    deep = short_tmp / ("d" * 70)
    deep.mkdir()
    runtime = short_tmp / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(deep))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert run_dir.base() == runtime
    assert "$RUNTIME_DIRECTORY is too long for the workers' sockets" in caplog.text
    made = run_dir.create(run_dir.base())
    try:  # the longest socket a worker binds there can be bound
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(str(made.path / "health-9999.sock"))
    finally:
        made.remove()
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    tempfile.tempdir = None  # read $TMPDIR again
    try:
        assert run_dir.base() == Path("/tmp")
    finally:
        tempfile.tempdir = None
