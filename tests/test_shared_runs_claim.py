"""The Redis side of taking a stopped instance's requests over (`cost.redis_runs`), on real Redis:
a live run cannot be claimed, a dead one by one claimer at a time, and each of its requests
gets one fate, whoever asks first (the claimer recording it as crashed, or its owner, back
from a pause, settling it)."""

from __future__ import annotations

import os

from edgeroute.cost.redis_runs import SETTLED, RunRegistry, crashed_by
from edgeroute.redis_pipe import RedisPipe
from tests.conftest import eventually
from tests.test_cost_support import REDIS_URL, require_redis


async def test_a_dead_run_is_claimed_once_and_each_request_has_one_fate() -> None:
    require_redis()
    pipe = RedisPipe(REDIS_URL, 2.0)
    reg = RunRegistry(pipe, f"edgeroute-runs-{os.urandom(4).hex()}", "ledger")
    try:
        assert not await reg.beat("a", 0.3, create=True)  # new
        assert await reg.beat("a", 0.3)  # renewed
        assert await reg.runs() == ["a"]
        assert not await reg.claim("a", "b", 60)  # alive: nobody takes it over

        async def expired() -> bool:
            return await reg.claim("a", "b", 60)

        await eventually(expired, "run a claimed once its heartbeat expired", within=5)
        assert not await reg.claim("a", "c", 60)  # one claimer at a time
        assert not await reg.beat("a", 0.3)  # its owner, back: told it expired, and not revived
        assert await reg.fates("a", crashed_by("b"), ["r1", "r2"]) == {"r1", "r2"}
        assert await reg.fates("a", SETTLED, ["r1", "r3"]) == {"r3"}  # r1 recorded by b already
        assert await reg.fates("a", crashed_by("c"), ["r2", "r3"]) == set()  # decided, whoever asks
        await reg.done("a", "b")
        assert await reg.runs() == []
    finally:
        await pipe.close()
