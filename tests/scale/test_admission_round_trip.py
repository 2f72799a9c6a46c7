"""Admission with Redis in one round trip, settlements batched; every guarantee kept.

Each test runs its own redis-server, so that its command counts are the test's alone.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import openai

from edgeroute.config import Budget, SharedState
from edgeroute.cost import budgets as B
from edgeroute.cost.control import stores
from edgeroute.cost.limits import Take
from edgeroute.cost.redis_store import RedisState
from tests.metrics_support import scrape
from tests.test_cost_support import LOADED_HOST_MS, RedisServer, ask_status, cost_proxy, one_deployment

MAX_TOKENS = 5
COST = MAX_TOKENS * 2.0 / 1e6  # output-only prices (one_deployment): a request's cost is exact


def _shared(url: str) -> dict[str, Any]:
    return {"redis_url": url, "prefix": f"edgeroute-rt-{os.urandom(4).hex()}", "timeout_ms": 2000}


async def _scripts(url: str) -> int:
    """Scripts Redis has run so far (not counting a first call refused as not loaded yet)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
        runs = [stats.get(f"cmdstat_{c}", {}) for c in ("evalsha", "eval")]
        return sum(int(r.get("calls", 0)) - int(r.get("failed_calls", 0)) for r in runs)
    finally:
        await client.aclose()


async def _settled(url: str) -> int:
    """The script count once it has stopped moving (bounded): what was sent before is done."""
    last = await _scripts(url)
    for _ in range(50):
        await asyncio.sleep(0.3)
        now = await _scripts(url)
        if now == last:
            return now
        last = now
    raise AssertionError("Redis kept running scripts")


async def test_admission_is_one_script_and_settlement_follows_in_the_background(
    start_upstream, redis_server: RedisServer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # The fail-open counters follow Redis's once a second (one script a second, not per request):
    # out of this count of scripts per request.
    monkeypatch.setattr(stores, "FOLLOW_S", 3600.0)
    up = await start_upstream(reply_words=5)
    cfg = one_deployment(
        up.base_url,
        shared_state=_shared(redis_server.url),
        budgets={"limits": [{"name": "g", "scope": "global", "limit_usd": 100.0, "period": "day"}]},
        rate_limits={"per_key": {"rpm": 10_000, "tpm": 10_000_000}, "deployments": {"d-a": {"rpm": 10_000}}},
        # The budgets' gauges and alerts read the budget from Redis (one script) at the first
        # telemetry tick (within 5 s of start) and then every `alerts.interval_s` (5 s by
        # default): that read landed in the count one run in eight. It is waited for, and the
        # next one is five minutes away.
        alerts={"interval_s": 300},
    )
    async with cost_proxy(cfg) as p:
        client = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0)
        assert await ask_status(client) == 200  # loads the scripts
        for _ in range(100):  # the gauge appears once the first read is done
            if (await scrape(p.url)).value("edgeroute_budget_limit_usd", budget="g") is not None:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the budgets were never read for their gauges")
        before = await _settled(redis_server.url)  # its settlement (and the reseed) out of the count
        n = 10
        for _ in range(n):
            # Reserved for 50 tokens, 5 served: each request settles its budget and its tokens.
            assert await ask_status(client, max_tokens=50) == 200
            await asyncio.sleep(0.05)  # this request's settlement goes out on its own
        used = await _settled(redis_server.url) - before
    # Key, model and deployment limits plus the budget: one script at admission, one to settle
    # (budget and token counts together); before, five (three checks, two settlements).
    assert used == 2 * n, used


async def test_concurrent_settlements_go_out_together(redis_server: RedisServer) -> None:
    state = RedisState(
        SharedState(redis_url=redis_server.url, prefix=f"edgeroute-rt-{os.urandom(4).hex()}", timeout_ms=LOADED_HOST_MS)
    )
    budget = Budget(name="g", scope="global", limit_usd=1.0, period="day")
    charge = B.charge(budget, "*", B.period_of(budget, 1.7e9), 0, -1)
    take = Take("key:k", "tokens", 1000, 0)
    await state.reserve([charge], 0)  # settlements go to counters that reservations made
    before = await _scripts(redis_server.url)
    await asyncio.gather(
        *(state.adjust_async([charge], [7]) for _ in range(50)),
        *(state.adjust_buckets([take], [3.0]) for _ in range(50)),
    )
    after = await _scripts(redis_server.url)
    assert after - before == 1  # a hundred settlements, one round trip
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    assert int(await client.get(f"{state.prefix}:b:{charge.store_key}") or 0) == 350
    await client.aclose()
    await state.close()


async def test_a_redis_error_at_settlement_is_reported_to_every_waiter(redis_server: RedisServer) -> None:
    from edgeroute.cost.store_errors import StoreUnavailable

    state = RedisState(SharedState(redis_url=redis_server.url, prefix="edgeroute-rt-down", timeout_ms=100))
    take = Take("key:k", "tokens", 1000, 0)
    redis_server.stop()
    results = await asyncio.gather(*(state.adjust_buckets([take], [1.0]) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    await state.close()


async def test_one_deployment_at_its_limit_refuses_and_gives_its_reservation_back(
    start_upstream, redis_server: RedisServer
) -> None:  # type: ignore[no-untyped-def]
    """The reservation made in the same script as the refused deployment take is undone."""
    up = await start_upstream(reply_words=5)
    shared = _shared(redis_server.url)
    cfg = one_deployment(
        up.base_url,
        shared_state=shared,
        budgets={"limits": [{"name": "g", "scope": "global", "limit_usd": COST * 100, "period": "day"}]},
        rate_limits={"deployments": {"d-a": {"rpm": 2}}},
    )
    async with cost_proxy(cfg) as p:
        client = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0)
        statuses = [await ask_status(client) for _ in range(4)]
        await asyncio.sleep(0.3)  # settlements and give-backs land
    assert statuses == [200, 200, 429, 429]
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_server.url)
    (key,) = [k async for k in r.scan_iter(match=f"{shared['prefix']}:b:*")]
    # Two answered requests' actual cost; the refused ones reserved and gave back.
    assert int(await r.get(key) or 0) == 2 * B.to_nano(COST)
    await r.aclose()


async def test_concurrent_requests_over_two_instances_never_overshoot(
    start_upstream, redis_server: RedisServer
) -> None:  # type: ignore[no-untyped-def]
    """Room for ten in the budget: 200 concurrent requests over two instances, ten answered."""
    up = await start_upstream(reply_words=40, latency_ms=5)
    cfg = one_deployment(
        up.base_url,
        shared_state=_shared(redis_server.url),
        budgets={"limits": [{"name": "g", "scope": "global", "limit_usd": COST * 10.5, "period": "day"}]},
        rate_limits={"per_key": {"rpm": 100_000}},
    )
    async with cost_proxy(cfg) as p1, cost_proxy(cfg) as p2:
        c1 = openai.AsyncOpenAI(base_url=p1.url + "/v1", api_key="x", max_retries=0)
        c2 = openai.AsyncOpenAI(base_url=p2.url + "/v1", api_key="x", max_retries=0)
        statuses = await asyncio.gather(*(ask_status(c1 if i % 2 else c2) for i in range(200)))
    assert statuses.count(200) == 10 and statuses.count(429) == 190


async def test_an_admission_abandoned_on_the_wire_gives_back_what_it_took(redis_server: RedisServer) -> None:
    """The client hangs up while the admission script is in Redis: the script runs anyway, and
    its tokens, the deployment's request and the reservation go back (as for a refused
    request); the key's request count stays, as OpenAI counts requests that were not served."""
    import redis.asyncio as aioredis

    shared = SharedState(redis_url=redis_server.url, prefix=f"edgeroute-rt-{os.urandom(4).hex()}", timeout_ms=2000)
    state = RedisState(shared)
    budget = Budget(name="g", scope="global", limit_usd=1.0, period="day")
    charge = B.charge(budget, "*", B.period_of(budget, 1.7e9), 5_000, -1)
    takes = [Take("key:k", "requests", 100, 1), Take("key:k", "tokens", 1000, 300)]
    dep = [Take("deployment:d", "requests", 50, 1)]
    await state.admit(takes, dep, [])  # connected, buckets made
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.client_pause(300)  # Redis holds every command for 0.3 s
        admitting = asyncio.ensure_future(state.admit(takes, dep, [charge]))
        await asyncio.sleep(0.1)
        admitting.cancel()
        await asyncio.sleep(0.6)  # the script ran after the pause; the give-back follows it
        level = {k: float(await client.hget(f"{state.prefix}:rl:{k}", "l") or 0) for k in
                 ("key:k:requests", "key:k:tokens", "deployment:d:requests")}  # fmt: skip
        spent = int(await client.get(f"{state.prefix}:b:{charge.store_key}") or 0)
    finally:
        await client.aclose()
        await state.close()
    assert admitting.cancelled()
    assert spent == 0  # the reservation went back
    # Tokens and the deployment's request back (less the first admission's and a moment's refill).
    assert level["key:k:tokens"] >= 700 - 1 and level["deployment:d:requests"] >= 49 - 0.1
    assert level["key:k:requests"] <= 99.5  # the abandoned request still counts against the key


async def test_settlements_redis_never_received_are_sent_when_it_is_back(redis_server: RedisServer) -> None:
    """Redis down at settlement: the waiters hear of it at once, and the deltas (which Redis
    certainly did not apply) land once it is back, exactly once."""
    from edgeroute.cost.redis_settle import RESEND_S
    from edgeroute.cost.store_errors import StoreUnavailable

    shared = SharedState(redis_url=redis_server.url, prefix=f"edgeroute-rt-{os.urandom(4).hex()}", timeout_ms=500)
    state = RedisState(shared)
    budget = Budget(name="g", scope="global", limit_usd=1.0, period="day")
    charge = B.charge(budget, "*", B.period_of(budget, 1.7e9), 0, -1)
    charge = B.Charge(charge.budget, charge.subject, charge.period, 100, -1, charge.store_key)
    await state.reserve([charge], 0)  # connected; the counter exists
    redis_server.stop()
    results = await asyncio.gather(*(state.adjust_async([charge], [-10]) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    redis_server.start()
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    key = f"{shared.prefix}:b:{charge.store_key}"
    # As a Redis that kept its data (persistence) would have it; one restarted empty gets its
    # counters back from the ledger instead (`test_cost_redis_restart.py`), and these deltas
    # do not recreate them.
    await client.set(key, 100)
    try:
        for _ in range(int(6 / 0.1)):
            if int(await client.get(key) or 0) != 100:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(RESEND_S * 1.5)  # and not again
        assert int(await client.get(key) or 0) == 70
    finally:
        await client.aclose()
        await state.close()
