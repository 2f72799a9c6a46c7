"""Redis that loses its budgets is read back from the ledger by the first instance that
notices (`RedisState._reseed`): only once every instance's flush interval has passed, or
another instance's last records, still in its queue, would never be counted (its
settlements find no counter: SETTLE does not recreate one). Real servers, real Redis
(127.0.0.1:6379, a prefix of this test's own, its keys deleted as FLUSHDB would)."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

import redis
import yaml

from tests.test_cost_restart import CENT, Served
from tests.test_cost_support import answered, require_redis


async def test_a_second_instances_unflushed_spend_is_counted_after_redis_loses_budgets(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A spends $0.06 of a shared $0.10 budget; Redis then loses its keys (FLUSHDB, a restart
    without persistence) right away, and B is the first to notice: four more fit in all, not
    ten. A's last records are still in its queue (it flushes every second, the most a config
    allows): B reads the ledger back only once every instance's flush interval has passed."""
    redis_url = require_redis()
    up = await start_upstream()
    prefix = f"rv-{uuid.uuid4().hex[:8]}"
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": up.base_url}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": CENT}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 1.0},
        "budgets": {"limits": [{"name": "ten", "scope": "global", "limit_usd": 0.10, "period": "day"}]},
        "shared_state": {"redis_url": redis_url, "prefix": prefix, "on_unavailable": "closed"},
    }
    path_a, path_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    path_a.write_text(yaml.safe_dump(cfg))
    cfg["ledger"]["flush_interval"] = 0.1
    path_b.write_text(yaml.safe_dump(cfg))
    a, b = await Served.start(path_a), await Served.start(path_b)
    client = redis.Redis.from_url(redis_url)
    try:
        assert await answered(a.url, 6) == 6
        lost = list(client.scan_iter(f"{prefix}:*"))
        assert lost, "the budget's counter and marker are in Redis"
        client.delete(*lost)
        assert await answered(b.url, 1) == 1  # B reads the ledger back
        assert await answered(b.url, 10) == 3, "A's spend not yet in the ledger at the read-back was never counted"
    finally:
        client.close()
        os.kill(a.proc.pid, signal.SIGCONT)
        a.kill()
        b.kill()
