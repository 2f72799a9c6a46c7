"""`serve --workers 2` without Redis keeps budgets and rate limits in a file the workers share.
They hold after a restart of the whole server killed hard (read back from the ledger into the
new file), and
when one worker is killed and restarted by the supervisor (the file is already seeded); a
managed key's budget given later counts the month so far there. Real servers, $0.01 a request."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

from tests.conftest import eventually
from tests.governance_support import call
from tests.scale.support import Spawn, children, kill_tree
from tests.test_cost_restart import CENT
from tests.test_cost_support import answered

ADMIN = "tok-admin"
TEN_CENTS_A_DAY = {"limits": [{"name": "ten", "scope": "global", "limit_usd": 0.10, "period": "day"}]}


def _config(upstream: str, tmp: Path, budgets: dict[str, Any] | None = TEN_CENTS_A_DAY) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": upstream}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": CENT}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(tmp / "l.db"), "flush_interval": 0.1},
    }
    if budgets is not None:
        cfg["budgets"] = budgets
    return cfg


async def test_workers_keep_a_budget_across_a_hard_kill(spawn: Spawn, start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    cfg = _config(up.base_url, tmp_path)
    first = await spawn(cfg, "--workers", "2", name="first")
    assert await answered(first.url, 15) == 10
    await asyncio.sleep(0.5)  # past one flush interval
    kill_tree(first.proc.pid)
    await first.proc.wait()
    second = await spawn(cfg, "--workers", "2", name="second")
    assert await answered(second.url, 5) == 0


async def test_workers_keep_a_rate_limit_window_across_a_hard_kill(
    spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    """A model held to 5 requests a minute: 5 answered, the server killed and started again
    within the minute admits none. The new file was seeded with the budgets only, so the
    restarted server admitted 5 more at once (a single process read the window back)."""
    up = await start_upstream()
    cfg = _config(up.base_url, tmp_path, budgets=None)
    cfg["rate_limits"] = {"models": {"m": {"rpm": 5}}}
    first = await spawn(cfg, "--workers", "2", name="first")
    assert await answered(first.url, 6) == 5
    db = tmp_path / "l.db"

    async def written() -> bool:
        with sqlite3.connect(db) as c:
            return bool(c.execute("SELECT COUNT(*) FROM spend").fetchone()[0] == 6)

    await eventually(written, "the six requests in the ledger")
    kill_tree(first.proc.pid)
    await first.proc.wait()
    second = await spawn(cfg, "--workers", "2", name="second")
    assert await answered(second.url, 4) == 0


async def test_workers_keep_a_budget_when_a_worker_is_killed_and_restarted(
    spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    cfg = _config(up.base_url, tmp_path)
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


async def test_workers_a_budget_given_later_counts_the_month_so_far(
    spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    """`serve --workers 2`: a managed key spends $0.03, is given $0.05: two more fit, not five."""
    up = await start_upstream()
    cfg = _config(up.base_url, tmp_path, budgets=None)
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
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


async def test_workers_count_what_a_key_spends_while_its_budget_is_off_or_being_given(
    spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    """`serve --workers 2`: a key held to $0.05 spends $0.01; its budget is taken off, three
    requests run (1.5 s each) when it is given back: with them one more fits, not four."""
    up = await start_upstream(latency_ms=1500)
    cfg = _config(up.base_url, tmp_path, budgets=None)
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
    served = await spawn(cfg, "--workers", "2", name="w")
    status, key = await call("POST", served.url + "/admin/keys", ADMIN, json={"budget_usd": 0.05})
    assert status == 201, key
    await asyncio.sleep(0.6)  # both workers know the key
    assert await answered(served.url, 1, key["secret"]) == 1
    status, _ = await call("PATCH", served.url + f"/admin/keys/{key['id']}", ADMIN, json={"budget_usd": None})
    assert status == 200
    await asyncio.sleep(0.6)  # both workers' key polls see it
    running = asyncio.gather(*(answered(served.url, 1, key["secret"]) for _ in range(3)))
    await asyncio.sleep(0.3)  # admitted without a budget
    status, _ = await call("PATCH", served.url + f"/admin/keys/{key['id']}", ADMIN, json={"budget_usd": 0.05})
    assert status == 200
    assert sum(await running) == 3
    await asyncio.sleep(0.6)  # both workers see the budget back
    assert await answered(served.url, 4, key["secret"]) == 1, "spend while the budget was off escaped it"
