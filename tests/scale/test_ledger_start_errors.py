"""A ledger that cannot be opened at start: damaged, read-only, or on a full disk.

`serve` stopped with a Python traceback from sqlite3; it is now one line naming the file and
what to do, exit status 1, before it listens. The full and read-only disks are a 1 MiB tmpfs
mounted in a private user and mount namespace (`unshare -r -m`; skipped where there is none)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.scale.support import free_port, kill_tree
from tests.scale.test_ledger_ownership import config_with_a_budget, serve_until_stopped


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


def _serve_on_a_small_disk(tmp: Path, config: Path, fill: str) -> subprocess.CompletedProcess[str]:
    """`serve` on a tmpfs of 1 MiB mounted in a private mount namespace (`unshare -r -m`)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"no user and mount namespaces here: {probe.stderr.decode()[:200]}")
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
