"""`serve --workers 2` with the audit log: one entry for one action, by who did it.

Each worker is a process of its own writing to the one database. A config applied through
one worker's admin API is re-read by the others (the supervisor sends them SIGHUP): each
follower audited its reload as `config.sighup` by `signal:SIGHUP`, a signal nobody sent; an
operator's SIGHUP to the supervisor was audited once per worker, and every start once per
worker too.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import eventually, simple_config
from tests.scale.support import Instance, Spawn

ADMIN, APP = "sk-combos2-admin", "sk-combos2-app-0123"
H = {"Authorization": f"Bearer {ADMIN}"}


async def _audit(s: aiohttp.ClientSession, url: str) -> list[tuple[str, str]]:
    async with s.get(url + "/admin/audit", headers=H) as r:
        assert r.status == 200
        return [(e["actor"], e["action"]) for e in reversed((await r.json())["entries"])]


async def _reloaded(inst: Instance, n: int) -> None:
    async def done() -> bool:
        return inst.output().count("edgeroute reloaded") >= n

    await eventually(done, f"{n} worker reloads")


async def test_one_action_is_audited_once_whatever_the_workers(
    start_upstream: Any, spawn: Spawn, tmp_path: Path
) -> None:
    up = await start_upstream()
    cfg = simple_config(
        {"a": up},
        keys={"ops": {"token": ADMIN, "role": "admin"}},
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
    )
    inst = await spawn(cfg, "--workers", "2")
    async with aiohttp.ClientSession() as s:
        async with s.patch(inst.url + "/admin/deployments/d-a", json={"weight": 5}, headers=H) as r:
            assert r.status == 200, await r.text()
        await _reloaded(inst, 1)  # the other worker follows the file
        assert await _audit(s, inst.url) == [
            ("server", "config.start"),
            ("ops", "config.api"),
            ("ops", "deployment.updated"),
        ]
        # The operator edits the file and signals the supervisor: one reload, audited once.
        data = yaml.safe_load(inst.config.read_text())
        data["deployments"]["d-a"]["weight"] = 7
        inst.config.write_text(yaml.safe_dump(data))
        os.kill(inst.proc.pid, signal.SIGHUP)
        await _reloaded(inst, 3)
        got = await _audit(s, inst.url)
    assert got[3:] == [("signal:SIGHUP", "config.sighup")], got


async def test_the_rollback_guard_rolls_back_once_whatever_the_workers(
    start_upstream: Any, spawn: Spawn, tmp_path: Path
) -> None:
    """Every answer fails (the upstream is down, whatever the config): the guard rolls the
    change back once. A rollback is not watched (no flapping between two versions): but each
    worker that followed the rollback watched it, as a reload, and rolled "back" to the
    change, and so on, one version every window."""
    up = await start_upstream(fail_status=500)
    cfg = simple_config(
        {"a": up},
        keys={"ops": {"token": ADMIN, "role": "admin"}, "app": {"token": APP}},
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        governance={"rollback_guard": {"window_s": 2, "max_error_rate": 0.5, "min_requests": 2}},
        retry={"base_ms": 1, "max_ms": 2},
    )
    inst = await spawn(cfg, "--workers", "2")

    async def traffic(seconds: float, headers: dict[str, str]) -> None:
        end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < end:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as c:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                async with c.post(inst.url + "/v1/chat/completions", json=body, headers=headers) as r:
                    assert r.status >= 500
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession() as s:
        async with s.patch(inst.url + "/admin/deployments/d-a", json={"weight": 5}, headers=H) as r:
            assert r.status == 200, await r.text()
        # Failing for two senders (one is never evidence enough), four and a half windows.
        await asyncio.gather(traffic(9, H), traffic(9, {"Authorization": f"Bearer {APP}"}))
        got = await _audit(s, inst.url)
        async with s.get(inst.url + "/admin/config/versions", headers=H) as r:
            versions = [v["source"] for v in reversed((await r.json())["versions"])]
    rollbacks = [a for a in got if a[1].startswith("config.auto_rollback")]
    assert rollbacks == [("rollback-guard", "config.auto_rollback"), ("rollback-guard", "config.auto_rollback.reason")]
    assert versions == ["start", "api", "auto_rollback:1"], (versions, got)


async def test_changes_through_two_workers_both_hold(start_upstream: Any, spawn: Spawn, tmp_path: Path) -> None:
    """Two deployment changes in a row, each through whichever worker takes its connection:
    the second, made on a worker that had not yet re-read the first, was made to the config
    before it and undid it (answered 200, audited, and gone from the file)."""
    up = await start_upstream()
    cfg = simple_config(
        {"a": up, "b": up},
        keys={"ops": {"token": ADMIN, "role": "admin"}},
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
    )
    inst = await spawn(cfg, "--workers", "2")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for weight in range(2, 8):
            for dep in ("d-a", "d-b"):
                async with s.patch(inst.url + f"/admin/deployments/{dep}", json={"weight": weight}, headers=H) as r:
                    assert r.status == 200, await r.text()
            data = yaml.safe_load(inst.config.read_text())
            got = {d: data["deployments"][d].get("weight") for d in ("d-a", "d-b")}
            assert got == {"d-a": weight, "d-b": weight}, f"after setting both to {weight}: {got}"


async def test_a_refused_sighup_is_audited_once_whatever_the_workers(
    start_upstream: Any, spawn: Spawn, tmp_path: Path
) -> None:
    """An operator's SIGHUP with a file that does not validate: every worker refuses it and
    keeps its config; the refusal was audited once per worker, as if refused N times."""
    up = await start_upstream()
    cfg = simple_config(
        {"a": up},
        keys={"ops": {"token": ADMIN, "role": "admin"}},
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
    )
    inst = await spawn(cfg, "--workers", "2")
    data = yaml.safe_load(inst.config.read_text())
    data["deployments"]["d-a"]["weight"] = -3
    inst.config.write_text(yaml.safe_dump(data))
    os.kill(inst.proc.pid, signal.SIGHUP)

    async def both_refused() -> bool:
        return inst.output().count("reload rejected") >= 2

    await eventually(both_refused, "both workers refusing the file")
    async with aiohttp.ClientSession() as s:
        got = await _audit(s, inst.url)
    assert got == [("server", "config.start"), ("signal:SIGHUP", "config.sighup_refused")], got
