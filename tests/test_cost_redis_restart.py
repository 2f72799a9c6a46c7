"""Budgets on Redis survive Redis itself restarting empty: the first admission that finds no
budgets there reads them back from the ledger (one instance counts, the others find them),
so a budget spent before the restart is still spent after it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.metrics_support import ledger_written
from tests.test_cost_restart import CENT, Served
from tests.test_cost_support import RedisServer, answered


def _config(upstream: str, tmp: Path, redis_url: str, limit_usd: float = 0.10) -> Path:
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": upstream}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": CENT}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(tmp / "l.db"), "flush_interval": 0.1},
        "budgets": {"limits": [{"name": "ten", "scope": "global", "limit_usd": limit_usd, "period": "day"}]},
        "shared_state": {"redis_url": redis_url, "prefix": f"rr-{uuid.uuid4().hex[:8]}", "on_unavailable": "closed"},
    }
    path = tmp / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def test_a_budget_holds_when_redis_restarts_empty(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    redis = RedisServer(tmp_path)
    redis.start()
    served = None
    try:
        served = await Served.start(_config(up.base_url, tmp_path, redis.url))
        assert await answered(served.url, 6) == 6
        await ledger_written(served.url, 6)  # the read-back counts what the ledger holds
        redis.stop()  # killed: it had no persistence, so it comes back empty
        redis.start()
        # $0.06 of $0.10 spent: four more, not ten.
        assert await answered(served.url, 10) == 4
    finally:
        if served is not None:
            served.kill()
        redis.stop()


async def test_two_instances_read_the_budget_back_once(start_upstream: Any, tmp_path: Path) -> None:
    """Both instances find Redis empty at once; the ledger's spend is counted once, not twice
    (a shared ledger file: each instance's spend is in it)."""
    up = await start_upstream()
    redis = RedisServer(tmp_path)
    redis.start()
    a = b = None
    try:
        path = _config(up.base_url, tmp_path, redis.url)
        a, b = await Served.start(path), await Served.start(path)
        assert await answered(a.url, 3) + await answered(b.url, 3) == 6
        await asyncio.gather(ledger_written(a.url, 3), ledger_written(b.url, 3))
        redis.stop()
        redis.start()
        got = await asyncio.gather(answered(a.url, 5), answered(b.url, 5))
        assert sum(got) == 4, got
    finally:
        for s in (a, b):
            if s is not None:
                s.kill()
        redis.stop()


async def test_a_new_redis_starts_from_the_ledger(start_upstream: Any, tmp_path: Path) -> None:
    """A deployment that adds Redis mid-period (or points at a new one) keeps what it spent."""
    up = await start_upstream()
    plain = yaml.safe_load(_config(up.base_url, tmp_path, "redis://unused").read_text())
    del plain["shared_state"]
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(plain))
    first = await Served.start(path)
    try:
        assert await answered(first.url, 7) == 7
        await ledger_written(first.url, 7)
    finally:
        first.kill()
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        second = await Served.start(_config(up.base_url, tmp_path, redis.url))
        try:
            assert await answered(second.url, 10) == 3
        finally:
            second.kill()
    finally:
        redis.stop()
