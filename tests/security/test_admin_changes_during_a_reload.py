"""An admin API change made while a SIGHUP reload is being applied, against a real `edgeroute
serve`: the change is made to the config the reload applies, not to the one before it.

A deployment change (drain, reweight...) and a rollback computed their text from the running
config before waiting for the reload in progress, then applied it over the reload's: the
operator's edit to the file (here an admin key demoted) was undone, and the file written back
without it; and a rollback below admin was checked for access changes against the config
before the reload, so it restored the demoted key's admin role, which such a rollback never
may (`test_rollback_access.py`).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import eventually, simple_config
from tests.governance_support import Instance, call, write_config

ROOT, BOB, MALLORY = "tok-root-0123456789", "tok-bob-0123456789", "tok-mallory-0123456789"


@dataclass
class Reloading:
    inst: Instance
    path: Path
    release: Path  # touched: the reload's secret command answers


@asynccontextmanager
async def _reload_in_progress(start_upstream: Any, tmp_path: Path) -> AsyncIterator[Reloading]:
    """A server at version 2 (version 1 plus a model), then a SIGHUP of a file that demotes
    mallory (admin to user) and names a secret command that answers only once released: the
    reload is in progress until then."""
    cfg = simple_config({"a": await start_upstream(), "b": await start_upstream()})
    (tmp_path / "b-key").write_text("sk-b\n")
    cfg["providers"]["b"]["api_key"] = f"file:{tmp_path / 'b-key'}"  # a reference: every version restorable
    cfg["keys"] = {
        "root": {"token": ROOT, "role": "admin"},
        "bob": {"token": BOB, "role": "operator"},
        "mallory": {"token": MALLORY, "role": "admin"},
    }
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    inst = Instance(path, tmp_path / "serve.log")
    try:
        inst.wait_ready()
        cfg["models"]["m2"] = {"deployments": ["d-a"]}
        write_config(path, cfg)
        status, body = await call("POST", inst.url + "/admin/reload", ROOT)
        assert status == 200, body
        started, release = tmp_path / "started", tmp_path / "release"
        script = tmp_path / "vault.py"
        script.write_text(
            "import pathlib, time\n"
            f"pathlib.Path({str(started)!r}).touch()\n"
            "t = time.monotonic()\n"
            f"while not pathlib.Path({str(release)!r}).exists() and time.monotonic() - t < 8: time.sleep(0.02)\n"
            "print('sk-from-vault')\n"
        )
        cfg["keys"]["mallory"]["role"] = "user"
        cfg["providers"]["b"]["api_key"] = f"exec:{shlex.quote(sys.executable)} {shlex.quote(str(script))}"
        write_config(path, cfg)
        os.kill(inst.proc.pid, signal.SIGHUP)
        await eventually(lambda: asyncio.sleep(0, started.exists()), "the reload's secret command started", 10)
        yield Reloading(inst, path, release)
    finally:
        inst.stop()


async def _mallory_demoted(r: Reloading) -> None:
    """Mallory's key is a user's, in the running config and in the file."""
    status, body = await call("GET", r.inst.url + "/admin/keys", MALLORY)
    assert status == 403, body
    status, body = await call("GET", r.inst.url + "/admin/config", ROOT)
    assert body["config"]["keys"]["mallory"]["role"] == "user"
    assert yaml.safe_load(r.path.read_text())["keys"]["mallory"]["role"] == "user"


async def test_a_drain_during_a_reload_is_made_on_the_reloaded_config(start_upstream: Any, tmp_path: Path) -> None:
    async with _reload_in_progress(start_upstream, tmp_path) as r:
        drain = asyncio.create_task(call("POST", r.inst.url + "/admin/deployments/d-b/drain", BOB))
        await asyncio.sleep(0.3)  # the drain's request is in the server, waiting for the reload
        assert not drain.done()
        r.release.touch()
        status, body = await drain
        assert status == 200, body
        await _mallory_demoted(r)
        on_file = yaml.safe_load(r.path.read_text())
        assert on_file["deployments"]["d-b"]["drained"] is True
        assert on_file["providers"]["b"]["api_key"].startswith("exec:")
        status, body = await call("GET", r.inst.url + "/admin/config/versions", ROOT)
        assert [v["source"] for v in body["versions"][:3]] == ["api", "sighup", "reload"]


async def test_an_operators_rollback_during_a_reload_is_checked_against_the_reloaded_config(
    start_upstream: Any, tmp_path: Path
) -> None:
    async with _reload_in_progress(start_upstream, tmp_path) as r:
        # Bob undoes version 2's model (no access change against version 2, but version 1 makes
        # mallory an admin again against the config being applied).
        rollback = asyncio.create_task(call("POST", r.inst.url + "/admin/config/rollback", BOB, json={"version": 1}))
        await asyncio.sleep(0.3)
        assert not rollback.done()
        r.release.touch()
        status, body = await rollback
        assert status == 403, body
        assert body["error"]["code"] == "permission_denied" and "keys" in body["error"]["message"]
        await _mallory_demoted(r)
        status, body = await call("GET", r.inst.url + "/admin/config/versions", ROOT)
        assert [v["source"] for v in body["versions"][:2]] == ["sighup", "reload"]
