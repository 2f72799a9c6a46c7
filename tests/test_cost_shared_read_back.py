"""Spend read back from the ledger after start (a budget a reload adds, a managed key's budget
first seen) reaches the shared store admission reads (Redis; the workers' file), not only the
in-process fallback counters, where it was forgotten. Real servers, real Redis, $0.01 a request."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.test_cost_restart import Served, _config
from tests.test_cost_support import answered, require_redis

ADMIN = "tok-admin"


async def _until(ready: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Waits for `ready` (a loaded machine makes a fixed sleep too short)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        await asyncio.sleep(0.05)


def _ledger_rows(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as c:
        try:
            return int(c.execute("SELECT COUNT(*) FROM spend").fetchone()[0])
        except sqlite3.OperationalError:  # not created yet
            return 0


async def _until_spent(url: str, budget: str, usd: float, timeout_s: float = 15.0, match: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(url + "/admin/budgets") as r:
                view = await r.json()
            rows = [b for b in view["budgets"] if b["name"] == budget and match in (None, b["match"])]
            spent = rows[0]["spent_usd"] if rows else 0.0
            if spent >= usd - 1e-9:
                return
            assert time.monotonic() < deadline, f"budget {budget}: {spent} spent after {timeout_s} s, not {usd}"
            await asyncio.sleep(0.05)


def _on_redis(up: Any, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A config counting spend in Redis (a prefix of its own) and a SQLite ledger, written out."""
    redis_url = require_redis()
    path = tmp_path / "edge.yaml"
    cfg = _config(up.base_url, tmp_path / "l.db")
    cfg["budgets"]["limits"][0]["limit_usd"] = 100  # cost control on; never binds here
    cfg["shared_state"] = {"redis_url": redis_url, "prefix": f"rv-{uuid.uuid4().hex[:8]}", "on_unavailable": "closed"}
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


async def test_a_budget_added_by_reload_on_redis_counts_what_was_spent(start_upstream: Any, tmp_path: Path) -> None:
    """Five requests spent, then a reload adds a $0.07 budget: two more fit, not seven."""
    path, cfg = _on_redis(await start_upstream(), tmp_path)
    served = await Served.start(path)
    try:
        assert await answered(served.url, 5) == 5
        await _until(lambda: _ledger_rows(tmp_path / "l.db") >= 5, "the five answers in the ledger")
        cfg["budgets"]["limits"].append({"name": "seven", "scope": "global", "limit_usd": 0.07, "period": "month"})
        path.write_text(yaml.safe_dump(cfg))
        async with aiohttp.ClientSession() as s, s.post(served.url + "/admin/reload") as r:
            assert r.status == 200, await r.text()
        # The first request on the new config applies it (admission follows the live config),
        # and the spend so far is read back in the background: wait for it and that request.
        assert await answered(served.url, 1) == 1
        await _until_spent(served.url, "seven", 0.06)
        assert await answered(served.url, 6) == 1, "the $0.05 spent before the reload was forgotten"
    finally:
        served.kill()


async def test_a_budget_added_by_restart_on_a_seeded_redis_counts_what_was_spent(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A budget added to the config and applied by a restart (a rolling update: each instance
    restarted on the new config) found Redis seeded already, so nothing read its spend so far
    back: five requests spent, then a $0.07 budget let seven more through, not two."""
    path, cfg = _on_redis(await start_upstream(), tmp_path)
    served = await Served.start(path)
    try:
        assert await answered(served.url, 5) == 5
        await _until(lambda: _ledger_rows(tmp_path / "l.db") >= 5, "the five answers in the ledger")
    finally:
        served.kill()
    cfg["budgets"]["limits"].append({"name": "seven", "scope": "global", "limit_usd": 0.07, "period": "month"})
    path.write_text(yaml.safe_dump(cfg))
    served = await Served.start(path)
    try:
        assert await answered(served.url, 7) == 2, "the $0.05 spent before the restart was forgotten"
    finally:
        served.kill()


async def test_a_budget_rescoped_by_reload_on_redis_counts_what_was_spent(start_upstream: Any, tmp_path: Path) -> None:
    """A budget a reload had added once this period, re-scoped by a later reload (global to
    per-model), was not read back into Redis again: the read-back was claimed once per budget
    name and period, whatever it counted, so its new counters started from zero."""
    path, cfg = _on_redis(await start_upstream(), tmp_path)
    served = await Served.start(path)
    try:
        cfg["budgets"]["limits"].append({"name": "seven", "scope": "global", "limit_usd": 100, "period": "month"})
        path.write_text(yaml.safe_dump(cfg))
        async with aiohttp.ClientSession() as s, s.post(served.url + "/admin/reload") as r:
            assert r.status == 200, await r.text()
        assert await answered(served.url, 5) == 5
        await _until(lambda: _ledger_rows(tmp_path / "l.db") >= 5, "the five answers in the ledger")
        cfg["budgets"]["limits"][-1].update(scope="model", limit_usd=0.07)
        path.write_text(yaml.safe_dump(cfg))
        async with aiohttp.ClientSession() as s, s.post(served.url + "/admin/reload") as r:
            assert r.status == 200, await r.text()
        assert await answered(served.url, 1) == 1
        await _until_spent(served.url, "seven", 0.06, match="m")
        assert await answered(served.url, 6) == 1, "the $0.05 spent before the reload was forgotten"
    finally:
        served.kill()


async def test_a_budget_one_instance_started_with_and_another_reloads_in_counts_once(
    start_upstream: Any, tmp_path: Path
) -> None:
    """Two instances on one Redis and one ledger take a new budget, one by a restart (its spend
    so far filled into Redis at start), the other by a reload (read back into Redis after it):
    the period's spend so far is counted once, not once by each."""
    path, cfg = _on_redis(await start_upstream(), tmp_path)
    reloaded = await Served.start(path)
    started = None
    try:
        assert await answered(reloaded.url, 5) == 5
        await _until(lambda: _ledger_rows(tmp_path / "l.db") >= 5, "the five answers in the ledger")
        cfg["budgets"]["limits"].append({"name": "seven", "scope": "global", "limit_usd": 0.07, "period": "month"})
        other = tmp_path / "other.yaml"
        other.write_text(yaml.safe_dump(cfg))
        started = await Served.start(other)
        path.write_text(yaml.safe_dump(cfg))
        async with aiohttp.ClientSession() as s, s.post(reloaded.url + "/admin/reload") as r:
            assert r.status == 200, await r.text()
        # Its first request applies the new config to admission, whose read-back then runs in
        # the background: $0.06 spent, one more fits.
        assert await answered(reloaded.url, 1) == 1
        await asyncio.sleep(1.5)
        assert await answered(started.url, 7) == 1, "the $0.05 spent before was counted twice, or not at all"
    finally:
        reloaded.kill()
        if started is not None:
            started.kill()
