"""`serve --workers 2` keeps budgets in a file the workers share: a managed key's budget
first seen after start reads the month so far into that file (it went to the worker's own
fallback counters only, and was forgotten). Real server, $0.01 a request."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.governance_support import call
from tests.scale.support import Spawn
from tests.test_cost_restart import CENT
from tests.test_cost_support import answered

ADMIN = "tok-admin"


async def test_workers_a_budget_given_later_counts_the_month_so_far(
    spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    """`serve --workers 2`: a managed key spends $0.03, is given $0.05: two more fit, not five."""
    up = await start_upstream()
    cfg = {
        "providers": {"a": {"base_url": up.base_url}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": CENT}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        "keys": {"root": {"token": ADMIN, "role": "admin"}},
        "governance": {"managed_keys": True, "key_poll_interval": 0.2},
    }
    served = await spawn(cfg, "--workers", "2", name="w")
    status, key = await call("POST", served.url + "/admin/keys", ADMIN, json={})
    assert status == 201, key
    await asyncio.sleep(0.6)  # both workers know the key
    assert await answered(served.url, 3, key["secret"]) == 3
    await asyncio.sleep(0.4)
    status, _ = await call("PATCH", served.url + f"/admin/keys/{key['id']}", ADMIN, json={"budget_usd": 0.05})
    assert status == 200
    await asyncio.sleep(0.6)  # both workers' key polls see it
    assert await answered(served.url, 2, key["secret"]) == 2  # each worker's first request with it
    await asyncio.sleep(0.5)  # the month so far, read back in the background
    assert await answered(served.url, 5, key["secret"]) == 0, "the $0.03 spent before the budget was forgotten"
