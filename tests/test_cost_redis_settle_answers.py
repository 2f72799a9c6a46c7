"""A `SETTLE` answer that is not what the script answers (a Redis that is not one, a proxy in
the way): its indices name the budget entries to send again request by request, and an index
0 was read as the last entry, whose delta Redis had applied: it was applied again (a charge
counted twice), and an index past the entries ended the batch's sender in an IndexError. An
answer of another shape is taken as an answer of unknown effect (as a timeout): an error
naming it, nothing sent again. Real Redis (127.0.0.1:6379, a prefix of the test's own)."""

from __future__ import annotations

import time
import uuid

import pytest
import redis.asyncio as aioredis

from edgeroute.config.schema import SharedState
from edgeroute.cost import redis_scripts, redis_store
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.redis_pipe import Script
from tests.test_cost_redis_generations import _counted, _day_and_hour
from tests.test_cost_support import LOADED_HOST_MS, require_redis


@pytest.mark.parametrize("answer", ["{1, 0}", "{1, 3}", "{1, 2, 2}", "{2, 1}", "'ok'"])
async def test_a_malformed_settle_answer_applies_nothing_twice(answer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SETTLE applies r1's +50 to both of its budgets, then answers `answer`: each counter
    holds 100 + 50, and the settlement's caller hears that Redis's answer was not one."""
    url = require_redis()
    prefix = f"settle-{uuid.uuid4().hex[:8]}"
    applied_then = redis_scripts._SETTLE.replace("return left\n", f"return {answer}\n")
    monkeypatch.setattr(redis_store, "SETTLE", Script.of(applied_then))
    r = aioredis.Redis.from_url(url)
    state = redis_store.RedisState(SharedState(redis_url=url, prefix=prefix, timeout_ms=LOADED_HOST_MS))
    try:
        now = time.time()
        charges = _day_and_hour(now, 100)
        assert await state.seed({})
        made = await state.reserve(charges, now)
        heard: Exception | None = None
        try:
            await state.adjust_async(charges, [50, 50], made.generation, "r1")
        except StoreUnavailable as e:
            heard = e
        assert await _counted(r, prefix, charges) == [150, 150]
        assert heard is not None and "not its indices" in str(heard)
        assert not state._settlements._pending  # not sent again
    finally:
        await state.close()
        if keys := [k async for k in r.scan_iter(f"{prefix}:*")]:
            await r.delete(*keys)
        await r.aclose()
