"""The Redis side of taking a stopped instance's requests over (`cost.redis_runs`), on real Redis:
a live run cannot be claimed, a dead one by one claimer at a time, and each of its requests
gets one fate, whoever asks first (the claimer recording it as crashed, or its owner, back
from a pause, settling it); and the heartbeat's timing an operator sets (`shared_state.liveness`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from edgeroute.config import loader
from edgeroute.config.errors import ConfigError
from edgeroute.cost.redis_runs import SETTLED, RunRegistry, crashed_by
from edgeroute.redis_pipe import RedisPipe
from tests.conftest import eventually
from tests.scale.support import Spawn
from tests.scale.support import spawn as spawn  # a fixture
from tests.test_cost_support import REDIS_URL, one_deployment, require_redis


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


def test_a_heartbeat_expiry_shorter_than_two_beats_is_refused() -> None:
    """One late heartbeat would let another instance take a running one's requests over."""
    cfg = one_deployment("http://127.0.0.1:9")
    cfg["shared_state"] = {"redis_url": REDIS_URL, "liveness": {"beat_s": 3, "ttl_s": 6}}
    with pytest.raises(ConfigError, match=r"shared_state\.liveness: ttl_s \(6\) must be more than twice beat_s \(3\)"):
        loader.parse(cfg, "edgeroute.yaml")


async def test_a_server_s_heartbeat_lives_as_long_as_its_config_says(spawn: Spawn, tmp_path: Path) -> None:
    """A stalled VM silent for 10 s is common: `shared_state.liveness.ttl_s` keeps its run from
    being taken over for that long (the key in Redis outlives its last renewal by `ttl_s`)."""
    require_redis()
    prefix = f"edgeroute-ttl-{os.urandom(4).hex()}"
    cfg = one_deployment("http://127.0.0.1:9")
    cfg["shared_state"] = {"redis_url": REDIS_URL, "prefix": prefix, "liveness": {"ttl_s": 20, "beat_s": 0.5}}
    cfg["ledger"] = {"path": str(tmp_path / "ledger.db")}
    cfg["budgets"] = {"limits": [{"name": "b", "scope": "global", "limit_usd": 1.0, "period": "day"}]}
    await spawn(cfg, name="ttl")
    store = redis.Redis.from_url(REDIS_URL)
    try:

        async def beaten() -> int:
            keys = list(store.scan_iter(f"{prefix}:alive:*"))
            return max(0, int(store.pttl(keys[0]))) if keys else 0

        ttl = await eventually(beaten, "the server's heartbeat key")
        assert 15_000 < ttl <= 20_000, ttl  # the default: 6,000 ms
    finally:
        store.close()
