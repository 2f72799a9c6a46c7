"""A key change that changes nothing writes no audit entry and says so, as deployments do.

Revoking a key revoked already answered 200 and appended a second `key.revoked` (before and
after the same), and a PATCH that changed nothing (`{"rpm": null}` on a key without rpm)
appended `key.updated`: audit noise an operator had to read past. Such a change now answers
`"action": "unchanged"` and writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import simple_config
from tests.security.governed import ROOT, call
from tests.test_cost_support import cost_proxy


async def _key_entries(s: aiohttp.ClientSession, url: str) -> list[str]:
    status, audit = await call(s, "GET", url + "/admin/audit?action=key", ROOT)
    assert status == 200, audit
    return [e["action"] for e in audit["entries"]]


async def test_a_key_change_that_changes_nothing_is_not_audited(start_upstream: Any, tmp_path: Path) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db"), "flush_interval": 0.05},
    }
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        keys = proxy.url + "/admin/keys"
        status, made = await call(s, "POST", keys, ROOT, {"name": "svc", "role": "service", "rpm": 5})
        assert status == 201, made
        one = keys + f"/{made['id']}"
        # The same values again: unchanged, nothing written.
        for body in ({"rpm": 5}, {"tpm": None}, {"name": "svc", "rpm": 5}):
            status, same = await call(s, "PATCH", one, ROOT, body)
            assert status == 200 and same["action"] == "unchanged" and same["rpm"] == 5, same
        assert await _key_entries(s, proxy.url) == ["key.created"]
        # A change that changes something is audited, and says no `unchanged`.
        status, changed = await call(s, "PATCH", one, ROOT, {"rpm": 6})
        assert status == 200 and changed["rpm"] == 6 and "action" not in changed, changed
        status, revoked = await call(s, "DELETE", one, ROOT)
        assert status == 200 and revoked["status"] == "revoked" and "action" not in revoked, revoked
        status, again = await call(s, "DELETE", one, ROOT)
        assert status == 200 and again["status"] == "revoked" and again["action"] == "unchanged", again
        assert await _key_entries(s, proxy.url) == ["key.revoked", "key.updated", "key.created"]
