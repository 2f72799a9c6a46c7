"""Config changes through the admin API on a config file that others change too (another
instance on the same file, an operator's edit), and a process killed in the middle of one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import simple_config
from tests.governance_support import Instance, call, instances, write_config
from tests.security.test_rotated_key_heads import _serving
from tests.serve_support import free_port
from tests.test_cost_support import require_redis

ADMIN = "tok-admin"


def _cfg(start: dict[str, Any], **extra: Any) -> dict[str, Any]:
    cfg = simple_config(start)
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg.update(extra)
    return cfg


async def _weights(url: str) -> dict[str, Any]:
    status, body = await call("GET", url + "/admin/deployments", ADMIN)
    assert status == 200, body
    return {d["name"]: d.get("weight") for d in body["deployments"]}


def _file_weights(path: Path) -> dict[str, Any]:
    return {name: d.get("weight") for name, d in yaml.safe_load(path.read_text())["deployments"].items()}


async def test_two_instances_on_one_file_keep_both_admins_changes(start_upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two instances on one config file (the README rolls back all at once by pointing them at one
    file), two admins changing a deployment each at the same moment: both answered 200 with
    `file_updated: true`, the file kept one change, and the next SIGHUP silently undid the
    other while the audit log still listed it. Each change is now made on the file as the
    other left it."""
    a, b = await start_upstream(), await start_upstream()
    shared = {"redis_url": require_redis(), "prefix": f"gov-shared-file-{os.getpid()}-{id(tmp_path)}"}
    path = write_config(tmp_path / "edgeroute.yaml", _cfg({"a": a, "b": b}, shared_state=shared))
    cm = instances(path, 2)
    one, two = await asyncio.to_thread(cm.__enter__)
    try:
        got = await asyncio.gather(
            call("PATCH", one.url + "/admin/deployments/d-a", ADMIN, json={"weight": 5}),
            call("PATCH", two.url + "/admin/deployments/d-b", ADMIN, json={"weight": 7}),
        )
        for status, body in got:
            assert status == 200 and body["file_updated"] is True, body
        assert _file_weights(path) == {"d-a": 5, "d-b": 7}
        # What every instance runs once reloaded from the file (SIGHUP, POST /admin/reload).
        for inst in (one, two):
            assert (await call("POST", inst.url + "/admin/reload", ADMIN))[0] == 200
            assert await _weights(inst.url) == {"d-a": 5, "d-b": 7}
        status, audit = await call("GET", one.url + "/admin/audit?action=deployment", ADMIN)
        assert sorted((e["target"], e["after"]["weight"]) for e in audit["entries"]) == [("d-a", 5), ("d-b", 7)]
    finally:
        await asyncio.to_thread(cm.__exit__, None, None, None)


async def test_an_edit_of_the_file_is_never_overwritten_by_a_change(start_upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An operator's edit not reloaded yet: a valid one is applied first (audited as a reload by
    the admin whose change applied it) and the change is made on it; one that does not apply is
    a 409 with its problems, the file and the running config untouched. The change was made on
    the running config and written over the file, the operator's edit gone."""
    a, b = await start_upstream(), await start_upstream()
    cfg = _cfg({"a": a, "b": b})
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    async with _serving(path) as url:
        cfg["deployments"]["d-b"]["weight"] = 3  # edited, not reloaded
        write_config(path, cfg)
        status, body = await call("PATCH", url + "/admin/deployments/d-a", ADMIN, json={"weight": 5})
        assert status == 200 and body["file_updated"] is True, body
        assert _file_weights(path) == {"d-a": 5, "d-b": 3}
        assert await _weights(url) == {"d-a": 5, "d-b": 3}
        status, versions = await call("GET", url + "/admin/config/versions", ADMIN)
        assert [(v["version"], v["source"], v["applied_by"]) for v in versions["versions"]] == [
            (3, "api", "root"), (2, "reload", "root"), (1, "start", None)
        ]  # fmt: skip

        cfg["deployments"]["d-b"]["weight"] = -3  # an edit that does not validate
        edited = write_config(path, cfg).read_text()
        status, body = await call("PATCH", url + "/admin/deployments/d-a", ADMIN, json={"weight": 6})
        assert status == 409 and body["error"]["code"] == "config_changed_elsewhere", body
        assert "d-b" in str(body["error"]["problems"])
        assert path.read_text() == edited
        assert await _weights(url) == {"d-a": 5, "d-b": 3}


_KILLED_ONCE_RECORDED = """
import os, signal, sys
from edgeroute.cli import main
from edgeroute.governance import runtime

recorded = runtime.Gov.save


async def save(self, text, how, *args, **kwargs):
    saved = await recorded(self, text, how, *args, **kwargs)
    if how == "api":  # the version and its audit entry are committed: kill -9 before the swap
        os.kill(os.getpid(), signal.SIGKILL)
    return saved


runtime.Gov.save = save
sys.exit(main(sys.argv[1:]))
"""

# Killed as the database commits, before the process hears back (PostgreSQL's commit takes a
# round trip and a WAL flush): the change is recorded, the config file untouched.
_KILLED_AS_COMMITTED = """
import os, signal, sys
from edgeroute.cli import main
from edgeroute.governance import store

committed = store.GovStore.add_version


def add_version(self, digest, source, *args, **kwargs):
    got = committed(self, digest, source, *args, **kwargs)
    if source == "api":
        os.kill(os.getpid(), signal.SIGKILL)
    return got


store.GovStore.add_version = add_version
sys.exit(main(sys.argv[1:]))
"""


async def test_a_change_recorded_before_a_kill_is_not_undone_by_the_restart(start_upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A kill -9 once a deployment change was recorded (version and audit entry committed): the
    file was written only after the swap, so the restart applied the old file as a new version,
    silently undoing a change the audit log listed. The file now takes it before the swap."""
    up = await start_upstream()
    path = write_config(tmp_path / "edgeroute.yaml", _cfg({"a": up}))
    answer, code = await asyncio.to_thread(_patch_killed, _KILLED_ONCE_RECORDED, path, {"weight": 9})
    assert isinstance(answer, OSError) and code == -signal.SIGKILL, (answer, code)  # no answer: killed
    restarted = Instance(path, tmp_path / "restarted.log")
    try:
        await asyncio.to_thread(restarted.wait_ready)
        assert _file_weights(path) == {"d-a": 9}
        assert await _weights(restarted.url) == {"d-a": 9}
        _, versions = await call("GET", restarted.url + "/admin/config/versions", ADMIN)
        newest = versions["versions"][0]
        assert (newest["version"], newest["source"], newest["active"]) == (2, "api", True), versions
        _, audit = await call("GET", restarted.url + "/admin/audit?action=deployment", ADMIN)
        assert [(e["target"], e["after"]) for e in audit["entries"]] == [("d-a", {"weight": 9})]
        # A copy staged by a process killed before its record (a config, secrets and all) is
        # removed by the next change.
        (path.parent / f".{path.name}.staged.left").write_text(path.read_text())
        status, _ = await call("PATCH", restarted.url + "/admin/deployments/d-a", ADMIN, json={"weight": 4})
        assert status == 200 and _file_weights(path) == {"d-a": 4}
        assert not [f.name for f in path.parent.iterdir() if f.name.startswith(f".{path.name}.staged.")]
    finally:
        await asyncio.to_thread(restarted.stop)


async def test_a_change_recorded_but_never_written_is_audited_as_undone_at_the_restart(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A kill -9 as the database commits a change, before the file is renamed in place: the
    restart applies the file the change was made on. It was recorded as a start like any
    other, nothing linking it to the change it undid; now the restart audits
    `config.reverted_at_start` naming both versions and logs how to apply the change again."""
    up = await start_upstream()
    path = write_config(tmp_path / "edgeroute.yaml", _cfg({"a": up}))
    answer, code = await asyncio.to_thread(_patch_killed, _KILLED_AS_COMMITTED, path, {"weight": 9})
    assert isinstance(answer, OSError) and code == -signal.SIGKILL, (answer, code)
    restarted = Instance(path, tmp_path / "restarted.log")
    try:
        await asyncio.to_thread(restarted.wait_ready)
        assert _file_weights(path) == {"d-a": None} and await _weights(restarted.url) == {"d-a": 1}
        _, audit = await call("GET", restarted.url + "/admin/audit?action=config.reverted_at_start", ADMIN)
        undone = [(e["actor"], e["before"], e["after"]) for e in audit["entries"]]
        assert undone == [("server", {"version": 2, "source": "api", "applied_by": "root"}, {"version": 3})], undone
        assert "config rollback 2" in restarted.log_path.read_text()
        # Applied again as the log says: the change is back, in the file too.
        status, body = await call("POST", restarted.url + "/admin/config/rollback", ADMIN, json={"version": 2})
        assert status == 200 and body["file_updated"], body
        assert _file_weights(path) == {"d-a": 9} and await _weights(restarted.url) == {"d-a": 9}
    finally:
        await asyncio.to_thread(restarted.stop)


def _patch_killed(hook: str, path: Path, change: dict[str, Any]) -> tuple[Any, int]:
    """Starts edgeroute with a kill `hook`, sends `PATCH /admin/deployments/d-a` with `change`;
    returns what the call got (an OSError when the connection was cut) and the exit status."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (path.parent / "killed.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", hook, "serve", "--config", str(path), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _ready(url, proc)
        req = urllib.request.Request(
            url + "/admin/deployments/d-a", method="PATCH", data=json.dumps(change).encode(),
            headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                answer: Any = r.read()
        except OSError as e:
            answer = e
        return answer, proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "edgeroute exited"
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/healthz", timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError("edgeroute did not start")
