"""With Redis down (`on_unavailable: open`) an instance raises its budget counters to the
ledger's spend in the background. That read must not hold admissions: a ledger locked by a
migration (or a month of a million rows) made every fail-open request wait 2 s, and the
reads, which never ended, filled the default executor's threads one every 10 s."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest

from edgeroute import config as config_mod
from edgeroute.cost import budgets as budgets_mod
from edgeroute.cost import restore
from edgeroute.cost.control import read_back as read_back_mod
from edgeroute.cost.control import stores as stores_mod
from edgeroute.cost.ledger_store import SqliteBackend
from tests.conftest import eventually
from tests.metrics_support import ledger_written
from tests.test_cost_redis_fail_open_fleet import _relay
from tests.test_cost_support import LOADED_HOST_MS, ask_status, cost_proxy, one_deployment, require_redis

ADMIN, USER = "sk-stall-admin", "sk-stall-user"
_INSERT = (
    "INSERT INTO spend (request_id, ts, user_id, cost_usd, day, model, route, stream, status, outcome, prompt_tokens,"
    " completion_tokens, cached_tokens, usage_estimated, baseline_cost_usd, latency_ms, attempts)"
    " VALUES (?, ?, ?, ?, 'd', 'm', 'm', 0, 200, 'ok', 1, 1, 0, 0, 0, 1, 1)"
)


async def test_fail_open_requests_do_not_wait_on_a_locked_ledger(
    start_upstream: Any, pg_schema_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A read every second, so that reads that never end would pile up within the test.
    monkeypatch.setattr(stores_mod, "LEDGER_READ_EVERY_S", 1.0)
    monkeypatch.setattr(read_back_mod, "LEDGER_READ_WITHIN_S", 3.0, raising=False)
    redis_url = require_redis()
    relay, relayed = await _relay(redis_url)
    up = await start_upstream(reply_words=40)
    cfg = one_deployment(
        up.base_url,
        keys={"ops": {"token": ADMIN, "role": "admin"}, "app": {"token": USER}},
        budgets={"limits": [{"name": "b", "scope": "global", "limit_usd": 100.0, "period": "day"}]},
        ledger={"backend": "postgres", "dsn": pg_schema_dsn, "flush_interval": 0.1},
        shared_state={"redis_url": relayed, "prefix": f"stall-{uuid.uuid4().hex[:8]}", "timeout_ms": LOADED_HOST_MS},
    )
    locker = None
    try:
        async with (
            cost_proxy(cfg) as a,
            openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=USER, max_retries=0) as client,
        ):
            assert [await ask_status(client) for _ in range(2)] == [200, 200]
            await ledger_written(a.url, 2, ADMIN)
            locker = psycopg.connect(pg_schema_dsn)
            locker.execute("LOCK TABLE spend IN ACCESS EXCLUSIVE MODE")  # a migration's: held
            await relay.cut()
            caplog.set_level(logging.WARNING, "edgeroute.cost")
            waits = []
            started = time.monotonic()
            while time.monotonic() - started < 8:
                t = time.monotonic()
                assert await ask_status(client) == 200
                waits.append(round(time.monotonic() - t, 2))
            assert max(waits) < 1.0, waits  # was 2 s each while a read was under way
            # The read ended at its deadline (it hung for as long as the lock was held)...
            await eventually(
                lambda: _true("the ledger could not be read" in caplog.text), "the ledger read given up", within=5
            )
            # ...and the proxy's other blocking work still gets a thread at once.
            await asyncio.wait_for(asyncio.to_thread(lambda: None), 1.0)
            locker.rollback()
            locker.close()
            locker = None
    finally:
        if locker is not None:
            locker.rollback()
            locker.close()
        await relay.cut()


async def _true(value: bool) -> bool:
    return value


def test_the_fail_open_read_counts_the_subjects_nearest_their_limit(tmp_path: Path) -> None:
    """A per-user budget over many users: the fail-open read creates a counter for those that
    spent the most (they share the limit: nearest to it), not for every user charged this
    month (200,000 counters for a million rows)."""
    db = SqliteBackend(tmp_path / "ledger.db")
    now = time.time()
    cfg = config_mod.parse(
        one_deployment(
            "http://127.0.0.1:9",
            budgets={"limits": [{"name": "pu", "scope": "user", "limit_usd": 5, "period": "month"}]},
        ),
        "t.yaml",
    )
    rows = [(f"r{i}", now - 10, f"u{i}", 0.001 * (i + 1)) for i in range(50)]
    for rid, ts, user, usd in rows:
        db.execute(_INSERT, (rid, ts, user, usd))
    found = restore.spent(db, cfg.budgets.limits, now, within=5.0, most=10)
    users = sorted(int(k.split(":")[1][1:]) for k, _ in found.budgets)
    assert users == list(range(40, 50)), users  # the 10 that spent the most
    db.close()


def test_unwritten_spend_counts_once() -> None:
    """What the ledger could not write is added to what it read: a finished request at its cost
    (not again when its reservation was read in flight), a running one at its reservation."""
    cfg = config_mod.parse(
        one_deployment(
            "http://127.0.0.1:9",
            budgets={"limits": [{"name": "pu", "scope": "user", "limit_usd": 5, "period": "month"}]},
        ),
        "t.yaml",
    )
    now = time.time()
    pid = budgets_mod.period_of(cfg.budgets.limits[0], now).id
    read = restore.Restored({(f"pu:u1:{pid}", -1): 7}, [], now, frozenset({"in-flight-read"}))
    subjects = {"user": "u1", "global": "*"}
    records = [
        restore.Unwritten("done", now - 1, subjects, None, 1e-9 * 100),
        restore.Unwritten("in-flight-read", now - 1, subjects, None, 1e-9 * 1000),  # counted at its reservation
    ]
    journal = [("done", now - 2, f"pu:u1:{pid}", 500), ("running", now - 1, f"pu:u2:{pid}", 40)]
    found = restore.add_unwritten(read, cfg.budgets.limits, [], records, journal)
    assert found.budgets == {(f"pu:u1:{pid}", -1): 107, (f"pu:u2:{pid}", -1): 40}
    assert found.in_flight == {"in-flight-read", "running"}
