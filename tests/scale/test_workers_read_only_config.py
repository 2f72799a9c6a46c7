"""`serve --workers N` with a read-only config file (the systemd unit, a `:ro` mount): the other
workers take a change made through one worker's admin API from the config file, so a change
that cannot be written there reached one worker only. A drain answered 200 while every other
request still went to the drained deployment, and the workers ran two config versions until
the next reload (a restarted worker, a third)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import simple_config
from tests.scale.support import kill_tree
from tests.scale.test_ledger_start_errors import _need_namespaces
from tests.serve_support import free_port

_SERVE = """
set -e
mount --bind {etc} {etc}
mount -o remount,bind,ro {etc}
exec {python} -m edgeroute serve --config {etc}/edgeroute.yaml --port {port} --workers 2
"""


async def _each_worker(url: str, method: str, path: str, n: int = 16) -> list[tuple[int, Any]]:
    """`n` answers, each on a new connection, so the kernel hands them to every worker."""
    out = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(n):
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} if method == "POST" else None
            async with s.request(method, url + path, json=body) as r:
                out.append((r.status, r.headers.get("x-edgeroute-deployment") or await r.json()))
    return out


async def test_a_change_that_cannot_reach_the_file_is_not_applied_by_one_worker_alone(
    tmp_path: Path, start_upstream
) -> None:
    _need_namespaces()
    a, b = await start_upstream(), await start_upstream()
    etc, data = tmp_path / "etc", tmp_path / "data"
    etc.mkdir()
    data.mkdir()
    cfg = simple_config({"a": a, "b": b}, ledger={"path": str(data / "ledger.db")})
    (etc / "edgeroute.yaml").write_text(yaml.safe_dump(cfg))
    script = tmp_path / "serve.sh"
    port = free_port()
    script.write_text(_SERVE.format(etc=etc, python=sys.executable, port=port))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            "unshare", "-r", "-m", "sh", str(script), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not re.search(r"\(2 workers\)", log.read_text(errors="replace")):
            assert proc.returncode is None and time.monotonic() < deadline, log.read_text(errors="replace")
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as s, s.post(url + "/admin/deployments/d-a/drain") as r:
            status, drained = r.status, await r.json()
        versions = {body["version"] for st, body in await _each_worker(url, "GET", "/admin/config") if st == 200}
        served = [dep for st, dep in await _each_worker(url, "POST", "/v1/chat/completions") if st == 200]
        assert len(served) == 16
        # One config for the whole server, whatever the answer.
        assert len(versions) == 1, (status, drained, versions)
        if status == 200:
            assert "d-a" not in served, (drained, served)
        else:
            assert status == 409 and drained["error"]["code"] == "config_not_writable", drained
            assert "read-only file system" in drained["error"]["message"].lower(), drained
            assert versions == {1} and {"d-a", "d-b"} == set(served), (versions, served)
            async with aiohttp.ClientSession() as s, s.post(url + "/admin/config/rollback", json={"version": 1}) as r:
                assert r.status == 409 and (await r.json())["error"]["code"] == "config_not_writable"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # the workers drain and the supervisor ends
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                kill_tree(proc.pid)
                await proc.wait()
