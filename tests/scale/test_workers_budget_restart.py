"""`serve --workers 2` without Redis keeps budgets in a file the workers share: after a restart
(of the whole server, killed hard), the budget still holds — read back from the ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.scale.support import Spawn, kill_tree
from tests.test_cost_restart import CENT
from tests.test_cost_support import answered


async def test_workers_keep_a_budget_across_a_hard_kill(spawn: Spawn, start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    cfg = {
        "providers": {"a": {"base_url": up.base_url}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": CENT}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        "budgets": {"limits": [{"name": "ten", "scope": "global", "limit_usd": 0.10, "period": "day"}]},
    }
    first = await spawn(cfg, "--workers", "2", name="first")
    assert await answered(first.url, 15) == 10
    await asyncio.sleep(0.5)  # past one flush interval
    kill_tree(first.proc.pid)
    await first.proc.wait()
    second = await spawn(cfg, "--workers", "2", name="second")
    assert await answered(second.url, 5) == 0
