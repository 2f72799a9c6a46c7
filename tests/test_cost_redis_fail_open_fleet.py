"""Two instances share a budget in Redis (`on_unavailable: open`, a PostgreSQL ledger). One
instance spends most of it while the other is quiet; then Redis stops answering the quiet one.
What it admits on its own counters is bounded by what the fleet had left, not by what Redis
told it at its own last admission (it admitted 19 more against one request's worth left)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import openai
import psycopg
import pytest
import redis.asyncio as aioredis

from edgeroute.admission import ADMISSION
from edgeroute.cost.control import CostControl
from edgeroute.cost.control import read_back as read_back_mod
from edgeroute.cost.redis_store import RedisState
from tests.conftest import eventually
from tests.metrics_support import ledger_written
from tests.test_cost_redis_generations import _Relay
from tests.test_cost_support import LOADED_HOST_MS, ask_status, budget_spent, cost_proxy, one_deployment, require_redis

ADMIN, USER = "sk-fleet-admin", "sk-fleet-user"
COST = 5 * 2.0 / 1e6  # max_tokens 5 at $2/Mtok output: each answer costs exactly this


def _config(upstream: str, redis_url: str, prefix: str, dsn: str) -> dict[str, Any]:
    budget = {"name": "b", "scope": "global", "limit_usd": COST * 20.5, "period": "day"}
    return one_deployment(
        upstream,
        keys={"ops": {"token": ADMIN, "role": "admin"}, "app": {"token": USER}},
        budgets={"limits": [budget]},
        ledger={"backend": "postgres", "dsn": dsn, "flush_interval": 0.1},
        shared_state={"redis_url": redis_url, "prefix": prefix, "timeout_ms": LOADED_HOST_MS},
    )


def _settled(control: Any) -> bool:
    assert isinstance(control, CostControl) and isinstance(control.shared, RedisState)
    s = control.shared._settlements
    # Redis came back empty: this instance's run had lapsed, so requests it admitted before it
    # noticed settle once Redis says no other instance recorded them (`liveness`).
    decided = control.liveness is None or control.liveness.idle()
    return not s._pending and s._flusher is None and not control._tasks and decided


async def _relay(redis_url: str) -> tuple[_Relay, str]:
    """A relay to the test Redis, open, and the URL that reaches Redis through it."""
    host, _, db = redis_url.removeprefix("redis://").partition("/")
    relay = _Relay(int(host.rpartition(":")[2]))
    await relay.open()
    return relay, f"redis://127.0.0.1:{relay.port}/{db}"


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("a_first", [True, False], ids=["quiet-since", "never-counted"])
async def test_an_instance_cut_off_from_redis_admits_only_what_the_fleet_left(
    start_upstream: Any, pg_schema_dsn: str, a_first: bool
) -> None:
    """`quiet-since`: A admitted once, then B spent 18 (A's counters follow Redis's each second).
    `never-counted`: B spent all 19 (A has no counter of this budget: it reads the ledger when
    Redis fails, and admits once that read is done)."""
    redis_url = require_redis()
    relay, relayed = await _relay(redis_url)
    up = await start_upstream(reply_words=40)
    prefix = f"fleet-{uuid.uuid4().hex[:8]}"
    try:
        async with (
            cost_proxy(_config(up.base_url, relayed, prefix, pg_schema_dsn)) as a,
            cost_proxy(_config(up.base_url, redis_url, prefix, pg_schema_dsn)) as b,
            openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=USER, max_retries=0) as ca,
            openai.AsyncOpenAI(base_url=b.url + "/v1", api_key=USER, max_retries=0) as cb,
        ):
            if a_first:
                assert await ask_status(ca) == 200  # A's own last admission: 1 of 20 spent
            by_b = 18 if a_first else 19
            assert [await ask_status(cb) for _ in range(by_b)] == [200] * by_b  # 19 of 20 spent
            await eventually(lambda: _true(_settled(b.app[ADMISSION])), "B's settlements in Redis")
            control = a.app[ADMISSION]
            assert isinstance(control, CostControl)
            if a_first:
                # A follows Redis's counters about once a second, with no request of its own
                # (not failing here: the code before it never did; what A admits is the assertion).
                followed = lambda: sum(control.local_budgets.counters().values()) >= 19 * COST * 1e9 - 1  # noqa: E731
                with contextlib.suppress(AssertionError):
                    await eventually(lambda: _true(followed()), "A's counters follow Redis's", within=5)
            else:
                await ledger_written(b.url, 19, ADMIN)
            assert round(await budget_spent(b.url, ADMIN) / COST) == 19

            await relay.cut()  # Redis stops answering A: it admits on its own counters
            statuses = await asyncio.gather(*(ask_status(ca) for _ in range(30)))
            # One request's worth was left: A admits that one, not 19 or 20.
            assert statuses.count(200) <= 1, statuses
            assert set(statuses) <= {200, 429}, statuses
    finally:
        await relay.cut()


async def test_outage_spend_survives_a_refill_while_the_ledger_cannot_write(
    start_upstream: Any, pg_schema_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis goes down and comes back empty while the ledger reads but does not write (a
    read-only failover, a revoked grant): what this instance admitted meanwhile is not in the
    ledger yet, so Redis is not refilled from it (that dropped the outage's spend: 28 admitted
    against room for 20); admission counts on this instance's counters until the ledger writes."""
    monkeypatch.setattr(read_back_mod, "MAX_FLUSH_INTERVAL_S", 0.1)
    redis_url = require_redis()
    relay, relayed = await _relay(redis_url)
    up = await start_upstream(reply_words=40)
    prefix = f"fleet-{uuid.uuid4().hex[:8]}"
    r = aioredis.Redis.from_url(redis_url)

    def grant(verb: str) -> None:
        _grant(pg_schema_dsn, verb)

    try:
        async with cost_proxy(_config(up.base_url, relayed, prefix, pg_schema_dsn)) as a:
            control = a.app[ADMISSION]
            assert isinstance(control, CostControl) and control.ledger is not None
            ledger = control.ledger
            async with openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=USER, max_retries=0) as ca:
                assert [await ask_status(ca) for _ in range(2)] == [200] * 2
                await ledger_written(a.url, 2, ADMIN)
                grant("REVOKE")
                try:
                    await relay.cut()  # Redis down: admitted on this instance's counters
                    assert [await ask_status(ca) for _ in range(8)] == [200] * 8
                    await eventually(lambda: _true(ledger.failing_since is not None), "the ledger failing to write")
                    async for k in r.scan_iter(match=f"{prefix}:*"):  # Redis comes back empty
                        await r.delete(k)
                    await relay.open()
                    # Past the second the shared store is left alone after a failure: asked again.
                    await eventually(lambda: _true(control.shared_up()), "Redis asked again")
                    # Refilling from the ledger now would drop the 8: this instance counts them.
                    assert [await ask_status(ca) for _ in range(3)] == [200] * 3
                finally:
                    grant("GRANT")
                await eventually(
                    lambda: _true(ledger.failing_since is None and not ledger.queue_depth()), "ledger written"
                )
                # Redis asked again (not this instance's counters alone): refilled from the ledger.
                await eventually(lambda: _true(control.shared_up()), "Redis asked again")
                statuses = await asyncio.gather(*(ask_status(ca) for _ in range(30)))
                await eventually(lambda: _true(_settled(control)), "settlements in Redis")
                spent = await budget_spent(a.url, ADMIN)
        with psycopg.connect(pg_schema_dsn) as db:
            row = db.execute("SELECT sum(cost_usd) FROM spend").fetchone()
        # Room for 20: 13 before, then 7 more; the budget counts what the ledger holds.
        assert statuses.count(200) == 7, statuses
        assert row is not None and round(float(row[0]) / COST) == 20
        assert round(spent / COST) == 20
    finally:
        await r.aclose()
        await relay.cut()


async def test_rate_limits_hold_when_redis_comes_back_empty(
    start_upstream: Any, pg_schema_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarted empty (or flushed) is refilled from the ledger with the last minute's
    rate-limit use, as budgets are: an RPM limit is not given a full minute anew across the fleet."""
    monkeypatch.setattr(read_back_mod, "MAX_FLUSH_INTERVAL_S", 0.1)
    redis_url = require_redis()
    up = await start_upstream(reply_words=40)
    prefix = f"fleet-{uuid.uuid4().hex[:8]}"
    cfg = _config(up.base_url, redis_url, prefix, pg_schema_dsn)
    cfg["keys"]["app"]["limits"] = {"rpm": 5}
    del cfg["budgets"]  # limits alone: Redis holding nothing else is found empty too
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with (
            cost_proxy(cfg) as a,
            cost_proxy(cfg) as b,
            openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=USER, max_retries=0) as ca,
            openai.AsyncOpenAI(base_url=b.url + "/v1", api_key=USER, max_retries=0) as cb,
        ):
            before = [await ask_status(ca if i % 2 else cb) for i in range(7)]
            assert before == [200] * 5 + [429] * 2
            await ledger_written(a.url, 3, ADMIN)  # what each answered (429s too): in the ledger
            await ledger_written(b.url, 4, ADMIN)
            async for k in r.scan_iter(match=f"{prefix}:*"):  # Redis comes back empty
                await r.delete(k)
            after = [await ask_status(ca if i % 2 else cb) for i in range(7)]
            assert after == [429] * 7, after
    finally:
        await r.aclose()


async def test_closed_redis_back_empty_while_the_ledger_cannot_write_is_refilled(
    start_upstream: Any, pg_schema_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`on_unavailable: closed`, Redis restarted empty while the ledger does not write: Redis is
    refilled from what the ledger holds plus this instance's records it has not written (in
    memory), and serves (it stayed unfilled, and every budgeted request was a 503, for as long
    as the ledger could not write); the unwritten spend counts (room for 20: 2 written, 3 not)."""
    monkeypatch.setattr(read_back_mod, "MAX_FLUSH_INTERVAL_S", 0.1)
    redis_url = require_redis()
    up = await start_upstream(reply_words=40)
    prefix = f"fleet-{uuid.uuid4().hex[:8]}"
    cfg = _config(up.base_url, redis_url, prefix, pg_schema_dsn)
    cfg["shared_state"]["on_unavailable"] = "closed"
    r = aioredis.Redis.from_url(redis_url)

    def grant(verb: str) -> None:
        _grant(pg_schema_dsn, verb)

    try:
        async with cost_proxy(cfg) as a, openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=USER, max_retries=0) as ca:
            control = a.app[ADMISSION]
            assert isinstance(control, CostControl) and control.ledger is not None
            ledger = control.ledger
            assert [await ask_status(ca) for _ in range(2)] == [200] * 2
            await ledger_written(a.url, 2, ADMIN)
            grant("REVOKE")
            try:
                assert [await ask_status(ca) for _ in range(3)] == [200] * 3
                await eventually(lambda: _true(ledger.failing_since is not None), "the ledger failing to write")
                async for k in r.scan_iter(match=f"{prefix}:*"):  # Redis restarted empty
                    await r.delete(k)
                statuses = [await ask_status(ca) for _ in range(20)]
                await eventually(lambda: _true(_settled(control)), "settlements in Redis")
                spent = await budget_spent(a.url, ADMIN)
            finally:
                grant("GRANT")
        assert statuses == [200] * 15 + [429] * 5, statuses
        assert round(spent / COST) == 20
    finally:
        await r.aclose()


async def test_a_refill_counts_no_429_as_use(start_upstream: Any, pg_schema_dsn: str) -> None:
    """Refilled after a Redis flush, a key's RPM bucket counts the requests it admitted, not those
    it refused with 429 (they took nothing): a client that retried its 429s is admitted again
    when its limit refills (a 6 rpm key: 10 s), not a minute later."""
    redis_url = require_redis()
    up = await start_upstream(reply_words=40)
    prefix = f"fleet-{uuid.uuid4().hex[:8]}"
    cfg = _config(up.base_url, redis_url, prefix, pg_schema_dsn)
    cfg["keys"]["app"]["limits"] = {"rpm": 6}
    del cfg["budgets"]
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with cost_proxy(cfg) as a, openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=USER, max_retries=0) as ca:
            statuses = [await ask_status(ca) for _ in range(30)]
            assert statuses == [200] * 6 + [429] * 24, statuses
            await ledger_written(a.url, 30, ADMIN)
            async for k in r.scan_iter(match=f"{prefix}:*"):  # Redis restarted empty
                await r.delete(k)
            assert await ask_status(ca) == 429  # refilled: the minute's 6 still count
            # A token a 10 s: the bucket's own refill, not background work (no PATIENCE); the
            # refill that counted the 24 refusals kept it empty about 70 s.
            flushed, seen = time.monotonic(), []
            while time.monotonic() - flushed < 30 and 200 not in seen:
                seen.append(await ask_status(ca))
                await asyncio.sleep(0.5)
            assert 200 in seen, f"still refused 30 s after the flush: {len(seen)} x 429"
    finally:
        await r.aclose()


def _grant(dsn: str, verb: str) -> None:
    """GRANT or REVOKE this role's INSERT and UPDATE on the test's schema: a ledger that cannot write."""
    schema = dsn.rpartition("search_path%3D")[2]
    with psycopg.connect(dsn, autocommit=True) as db:
        who = "FROM CURRENT_USER" if verb == "REVOKE" else "TO CURRENT_USER"
        db.execute(f"{verb} INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} {who}")
