"""A revoked managed key stays revoked, whatever changes to it were in flight.

Revoking, rotating and updating a key each read the key, then wrote it whole: a rotation
(or an update) that read the key before a revocation was written wrote it back after,
without `revoked_at`: the admin was told the key was revoked, and it served on, with the
new secret the rotation handed out. A key that may rotate itself (a managed key manages
itself) could keep itself alive by rotating in a loop while it was revoked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import simple_config
from tests.security.governed import ROOT, USER, call
from tests.test_cost_support import CostProxy, cost_proxy


@pytest.fixture(params=["sqlite", "postgres"])
async def proxy(request: pytest.FixtureRequest, start_upstream: Any, tmp_path: Path) -> AsyncIterator[CostProxy]:
    ledger: dict[str, Any] = {"path": str(tmp_path / "gov.db")}
    if request.param == "postgres":
        # A schema of its own: no keys of an earlier run, and no other run's table dropped.
        ledger = {"backend": "postgres", "dsn": request.getfixturevalue("pg_schema_dsn")}
    cfg = simple_config({"a": await start_upstream()})
    cfg |= {"keys": {"root": {"token": ROOT, "role": "admin"}}, "governance": {"managed_keys": True}, "ledger": ledger}
    async with cost_proxy(cfg) as p:
        yield p


async def test_a_revocation_is_not_undone_by_rotations_in_flight(proxy: CostProxy) -> None:
    governed = proxy
    keys = governed.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        for round_ in range(5):
            status, made = await call(s, "POST", keys, ROOT, {"name": f"svc-{round_}", "role": "service"})
            assert status == 201, made
            kid = made["id"]
            rotations = [call(s, "POST", f"{keys}/{kid}/rotate", ROOT, {}) for _ in range(12)]
            revoke = call(s, "DELETE", f"{keys}/{kid}", ROOT)
            got = await asyncio.gather(*rotations[:6], revoke, *rotations[6:])
            assert got[6][0] == 200, got[6]
            status, shown = await call(s, "GET", f"{keys}/{kid}", ROOT)
            assert shown["status"] == "revoked", f"round {round_}: revoked (200), then {shown}"
            for secret in [made["secret"]] + [b["secret"] for st, b in got if st == 200 and "secret" in b]:
                status, _ = await call(s, "POST", governed.url + "/v1/chat/completions", secret,
                                       {"model": "m", "messages": USER})  # fmt: skip
                assert status == 401, f"round {round_}: a secret of the revoked key still works"
