"""Spend read back from the ledger after start (a budget a reload adds, a managed key's budget
first seen) reaches the shared store admission reads (Redis; the workers' file), not only the
in-process fallback counters, where it was forgotten. Real servers, real Redis, $0.01 a request."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.test_cost_restart import Served, _config
from tests.test_cost_support import answered, require_redis

ADMIN = "tok-admin"


async def test_a_budget_added_by_reload_on_redis_counts_what_was_spent(start_upstream: Any, tmp_path: Path) -> None:
    """Five requests spent, then a reload adds a $0.07 budget: two more fit, not seven."""
    redis_url = require_redis()
    up = await start_upstream()
    path = tmp_path / "edge.yaml"
    cfg = _config(up.base_url, tmp_path / "l.db")
    cfg["budgets"]["limits"][0]["limit_usd"] = 100  # cost control on; never binds here
    cfg["shared_state"] = {"redis_url": redis_url, "prefix": f"rv-{uuid.uuid4().hex[:8]}", "on_unavailable": "closed"}
    path.write_text(yaml.safe_dump(cfg))
    served = await Served.start(path)
    try:
        assert await answered(served.url, 5) == 5
        await asyncio.sleep(0.3)  # written to the ledger
        cfg["budgets"]["limits"].append({"name": "seven", "scope": "global", "limit_usd": 0.07, "period": "month"})
        path.write_text(yaml.safe_dump(cfg))
        async with aiohttp.ClientSession() as s, s.post(served.url + "/admin/reload") as r:
            assert r.status == 200, await r.text()
        await asyncio.sleep(0.5)  # read back in the background
        assert await answered(served.url, 6) == 2, "the $0.05 spent before the reload was forgotten"
    finally:
        served.kill()
