"""`serve --workers 2` keeps a budget
when one worker is killed hard mid-month and the supervisor restarts it: the restarted worker
finds the workers' file seeded and counts on from it (it does not read the ledger in again)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from tests.conftest import eventually
from tests.scale.support import Spawn, children
from tests.test_cost_restart import CENT
from tests.test_cost_support import answered


async def test_workers_keep_a_budget_when_a_worker_is_killed_and_restarted(
    spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    cfg = {
        "providers": {"a": {"base_url": up.base_url}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": CENT}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        "budgets": {"limits": [{"name": "ten", "scope": "global", "limit_usd": 0.10, "period": "day"}]},
    }
    served = await spawn(cfg, "--workers", "2", name="w")
    assert await answered(served.url, 6) == 6
    await asyncio.sleep(0.4)
    before = children(served.proc.pid)
    assert len(before) >= 2, before
    os.kill(before[0], signal.SIGKILL)

    async def restarted() -> bool:
        now = children(served.proc.pid)
        return before[0] not in now and len(now) >= len(before)

    await eventually(restarted, "the supervisor restarting the worker", within=20)
    await asyncio.sleep(1.0)  # the new worker listens
    assert await answered(served.url, 10) == 4
