"""A config change whose client goes away while it is being recorded (a CLI killed, a proxy's
timeout, Ctrl-C): once its version and audit entries are committed, it is applied. Against a
real `edgeroute serve`, the ledger's database held by another writer so that the record waits.

The request was cancelled with its client, and the change with it ("nothing swapped"), but
the record was written all the same by the thread already running it: the audit log said
`config.rollback` to version 3, the versions listed 3 as the latest, and the server went on
running version 2 (its file too), so an auditor read a change that never took effect."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
import yaml

from tests.conftest import eventually, simple_config
from tests.governance_support import Instance, call, write_config

ROOT = "tok-root-0123456789"


async def test_a_rollback_whose_client_left_while_it_was_recorded_takes_effect(
    start_upstream: Any, tmp_path: Path
) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    inst = Instance(path, tmp_path / "serve.log")
    try:
        inst.wait_ready()
        cfg["models"]["m2"] = {"deployments": ["d-a"]}
        write_config(path, cfg)
        status, body = await call("POST", inst.url + "/admin/reload", ROOT)
        assert status == 200, body

        # Another writer holds the database (a long transaction, a backup): the record waits.
        holder = sqlite3.connect(tmp_path / "edgeroute-ledger.db", timeout=10, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as s:
                hdrs = {"Authorization": f"Bearer {ROOT}"}
                try:
                    async with s.post(inst.url + "/admin/config/rollback", json={"version": 1}, headers=hdrs) as r:
                        raise AssertionError(f"answered while the database was held: {r.status}")
                except TimeoutError:
                    pass  # the client gives up and closes its connection
            await asyncio.sleep(0.3)  # the server has seen it go
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        async def recorded() -> list[dict[str, Any]]:
            _, body = await call("GET", inst.url + "/admin/audit?action=config.rollback", ROOT)
            return [e for e in body["entries"] if e["action"] == "config.rollback"]

        entry = (await eventually(recorded, "the rollback in the audit log", 10))[0]
        version = entry["after"]["version"]

        async def running() -> Any:
            _, body = await call("GET", inst.url + "/admin/config", ROOT)
            return body if body["version"] == version else None

        body = await eventually(running, f"version {version} running", 5)  # the file written with it
        assert "m2" not in body["config"]["models"]
        client = openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key=ROOT, max_retries=0)
        try:
            assert [m.id for m in (await client.models.list()).data] == ["m"]
        finally:
            await client.close()
        assert "m2" not in yaml.safe_load(path.read_text())["models"]
    finally:
        inst.stop()
