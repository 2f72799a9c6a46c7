"""A ledger that cannot be opened at start (damaged, read-only, on a full disk), or that stops
writing while serving.

At start, `serve` stopped with a Python traceback from sqlite3; it is now one line naming the
file and what to do, exit status 1, before it listens. While serving, /readyz answers 503 as
long as spend cannot be written. The full and read-only disks are a 1 MiB tmpfs
mounted in a private user and mount namespace (`unshare -r -m`; skipped where there is none)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import wait_ready
from tests.scale.support import kill_tree
from tests.scale.test_ledger_ownership import config_with_a_budget, serve_until_stopped
from tests.serve_support import free_port
from tests.test_cost_support import answered


def _write(tmp: Path, upstream: str) -> Path:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_with_a_budget(upstream)))
    return path


async def test_a_damaged_ledger_stops_the_server_with_one_clear_line(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    config = _write(tmp_path, up.base_url)
    (tmp_path / "edgeroute-ledger.db").write_bytes(b"\x07not sqlite" * 1000)
    done = await asyncio.to_thread(serve_until_stopped, config)
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stdout, done.stdout
    assert "cannot open the spend ledger" in done.stdout and "edgeroute-ledger.db" in done.stdout, done.stdout
    assert "not a database" in done.stdout and "backup" in done.stdout, done.stdout


_IN_A_SMALL_DISK = """
set -e
mount -t tmpfs -o size={size} tmpfs {dir}
cp {config} {dir}/cfg.yaml
{fill}
exec {python} -m edgeroute serve --config {dir}/cfg.yaml --port {port}
"""


def _need_namespaces() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"no user and mount namespaces here: {probe.stderr.decode()[:200]}")


def _serve_on_a_small_disk(tmp: Path, config: Path, fill: str) -> subprocess.CompletedProcess[str]:
    """`serve` on a tmpfs of 1 MiB mounted in a private mount namespace (`unshare -r -m`)."""
    _need_namespaces()
    disk = tmp / "disk"
    disk.mkdir()
    script = tmp / "small-disk.sh"
    script.write_text(
        _IN_A_SMALL_DISK.format(
            size="1m", dir=disk, config=config, fill=fill.format(dir=disk), python=sys.executable, port=free_port()
        )
    )
    proc = subprocess.Popen(
        ["unshare", "-r", "-m", "sh", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"the server did not stop by itself:\n{out[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.parametrize(
    ("fill", "said"),
    [
        ("head -c 2000000 /dev/zero > {dir}/filler || true", "full"),
        ("touch {dir}/edgeroute-ledger.db.lock {dir}/edgeroute-ledger.db; mount -o remount,ro {dir}", "writable"),
    ],
    ids=["disk-full", "read-only"],
)
async def test_a_ledger_that_cannot_be_written_stops_the_server_with_one_clear_line(
    start_upstream: Any, tmp_path: Path, fill: str, said: str
) -> None:
    up = await start_upstream()
    config = _write(tmp_path, up.base_url)
    with contextlib.suppress(FileNotFoundError):
        (tmp_path / "edgeroute-ledger.db").unlink()
    done = await asyncio.to_thread(_serve_on_a_small_disk, tmp_path, config, fill)
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stdout, done.stdout
    assert "cannot open the spend ledger" in done.stdout and said in done.stdout, done.stdout


_FULL_LATER = """
set -e
mount -t tmpfs -o size=1m tmpfs {dir}
cp {config} {dir}/cfg.yaml
{python} -m edgeroute serve --config {dir}/cfg.yaml --port {port} &
server=$!
wait_for() {{ n=0; while [ ! -e "$1" ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done; }}
wait_for {sync}/fill
head -c 2000000 /dev/zero > {dir}/filler || true
touch {sync}/filled
wait_for {sync}/free
rm {dir}/filler
touch {sync}/freed
wait $server
"""


async def _ready(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
        return r.status, await r.json()


async def _until(what: str, check: Any, within: float = 15.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.1)


async def test_a_ledger_that_stops_writing_makes_the_server_not_ready_until_it_writes_again(
    start_upstream: Any, tmp_path: Path
) -> None:
    """The disk fills while serving: once the WAL's room is used up, each answer's spend waits
    in memory (a kill -9 would lose all of it, not one flush interval), and /readyz said 200
    throughout. It is 503 now, with what is unwritten, until the records are in the ledger
    again."""
    _need_namespaces()
    up = await start_upstream()
    config = _write(tmp_path, up.base_url)
    disk, sync = tmp_path / "disk", tmp_path / "sync"
    disk.mkdir()
    sync.mkdir()
    port = free_port()
    script = tmp_path / "full-later.sh"
    script.write_text(_FULL_LATER.format(dir=disk, config=config, python=sys.executable, port=port, sync=sync))
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-r", "-m", "sh", str(script),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, proc=proc)
        assert await answered(url, 3) == 3
        (sync / "fill").touch()
        await _until("the disk filled", lambda: asyncio.sleep(0, (sync / "filled").exists()))
        assert await answered(url, 4) == 4  # served; their spend cannot be written
        sent = 7

        async def not_ready() -> dict[str, Any] | None:
            nonlocal sent
            status, body = await _ready(url)
            if status == 503:
                return body
            # The writer checkpoints after each batch, so the first batches after the disk
            # filled may still land in the WAL's room (they are written, then): until it is
            # used up, a request more each time (answered, or refused by the budget: recorded).
            await answered(url, 1)
            sent += 1
            return None

        body = await _until("/readyz saying the ledger does not write", not_ready)
        assert body["ledger"]["writing"] is False and body["ledger"]["unwritten_records"] >= 1, body
        (sync / "free").touch()

        async def ready_again() -> bool:
            return (await _ready(url))[0] == 200

        await _until("/readyz ready again", ready_again)
        async with aiohttp.ClientSession() as s, s.get(url + "/admin/spend?by=model") as r:
            report = await r.json()
        assert report["total"]["requests"] == sent, report  # nothing lost once it writes again
    finally:
        kill_tree(proc.pid)
        await proc.wait()
