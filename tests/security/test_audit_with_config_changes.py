"""Class: a config change without its audit entry.

A deployment change through the admin API (and a rollback, a reload) was applied, stored as
a version and written over the config file first, and audited after, in separate writes: a
process killed between the two (or an audit write that failed: a locked or full database)
left the change running, in the file, answered 200, and absent from the audit log. Now the
version and its audit entries are one transaction, written before the change is swapped in:
a change whose record cannot be written is not made (503), and the caller is told so.

The audit write is made to fail by a trigger on the real database, put there by the test
(the stand-in for the process dying between the two writes); `edgeroute serve` runs as a
real process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import simple_config
from tests.governance_support import call, instances, ledger_sql, write_config

ADMIN = "tok-admin"


def _audit_down(action: str) -> str:
    return (
        f"CREATE TRIGGER audit_down BEFORE INSERT ON gov_audit WHEN NEW.action = '{action}' "
        "BEGIN SELECT RAISE(ABORT, 'audit log down'); END"
    )


async def _state(url: str, path: Path) -> tuple[Any, int, list[str]]:
    """The file's weight for d-a, the active version, and the audit log's actions."""
    status, versions = await call("GET", url + "/admin/config/versions", ADMIN)
    assert status == 200, versions
    active = next(v["version"] for v in versions["versions"] if v["active"])
    status, audit = await call("GET", url + "/admin/audit", ADMIN)
    assert status == 200, audit
    text = await asyncio.to_thread(path.read_text)
    weight = yaml.safe_load(text)["deployments"]["d-a"].get("weight")
    return weight, active, [e["action"] for e in reversed(audit["entries"])]


async def test_a_config_change_whose_audit_entry_cannot_be_written_is_not_made(
    start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["ledger"] = {"flush_interval": 0.1}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    cm = instances(path, 1)
    (server,) = await asyncio.to_thread(cm.__enter__)
    try:
        status, body = await call("PATCH", server.url + "/admin/deployments/d-a", ADMIN, json={"weight": 3})
        assert status == 200, body
        weight, first, actions = await _state(server.url, path)
        assert (weight, actions) == (3, ["config.start", "config.api", "deployment.updated"])

        await asyncio.to_thread(ledger_sql, tmp_path, _audit_down("deployment.updated"))
        # A change that cannot be audited is refused as a whole: not running, not in the file.
        status, body = await call("PATCH", server.url + "/admin/deployments/d-a", ADMIN, json={"weight": 9})
        assert status == 503 and body["error"]["code"] == "config_store_unavailable", (status, body)
        assert "nothing was changed" in body["error"]["message"], body
        assert await _state(server.url, path) == (3, first, actions)
        await asyncio.to_thread(ledger_sql, tmp_path, "DROP TRIGGER audit_down")

        # Nor a rollback.
        await asyncio.to_thread(ledger_sql, tmp_path, _audit_down("config.rollback"))
        status, body = await call("POST", server.url + "/admin/config/rollback", ADMIN, json={"version": 1})
        assert status == 503 and body["error"]["code"] == "config_store_unavailable", (status, body)
        assert await _state(server.url, path) == (3, first, actions)
        await asyncio.to_thread(ledger_sql, tmp_path, "DROP TRIGGER audit_down")

        # The audit log back: the change goes through, with its entries.
        status, body = await call("PATCH", server.url + "/admin/deployments/d-a", ADMIN, json={"weight": 9})
        assert status == 200, body
        weight, active, now = await _state(server.url, path)
        assert weight == 9 and active == body["version"] > first
        assert now == [*actions, "config.api", "deployment.updated"], now
    finally:
        cm.__exit__(None, None, None)
