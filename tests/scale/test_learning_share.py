"""The feedback learner shared over Redis: feedback posted to one instance, about a request
another served, moves routing on every instance."""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import openai
import redis.asyncio as aioredis

from tests.conftest import eventually
from tests.test_cost_support import require_redis
from tests.test_selection import WEAK_OUT, config, explain, pair, served_by

__all__ = ["pair", "shared_learner"]


def shared_learner(url: str, strong: Any, weak: Any, **extra: Any) -> dict[str, Any]:
    """The policy config of `test_selection.config` with its feedback learner shared over Redis
    `url` under a prefix of its own."""
    prefix = f"edgeroute-learn-{os.getpid()}-{os.urandom(4).hex()}"
    shared = {"redis_url": url, "prefix": prefix, "timeout_ms": 2000}
    cfg = config(strong, weak, learning={"feedback": {"max_shift": 0.1}}, shared_state=shared, **extra)
    return with_weak_ab(cfg)


def with_weak_ab(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with `weak-ab`, an experiment sending every request to the weak route: a score
    teaches only a route routing chose, not one the client named (`model: weak`)."""
    cfg["models"]["weak-ab"] = {"experiment": {"variants": [{"route": "weak", "percent": 100}]}}
    return cfg


async def test_feedback_is_shared_between_instances(pair, start_proxy) -> None:
    url = require_redis()
    strong, weak = pair
    text = "Janet has 3 apples and buys 5 more. She gives 2 away. How many are left?"
    probe = await start_proxy(config(strong, weak))
    weak_score = (await explain(probe.url, text))["scores"][WEAK_OUT]
    cfg = shared_learner(url, strong, weak, threshold=weak_score + 0.05)
    prefix = cfg["shared_state"]["prefix"]
    cfg["models"]["auto"]["policy"]["candidates"].reverse()
    p1, p2 = await start_proxy(cfg), await start_proxy(cfg)
    c1 = openai.AsyncOpenAI(base_url=p1.url + "/v1", api_key="x")
    assert (await served_by(c1, text))[0] == "strong"
    ids = [(await served_by(c1, text, model="weak-ab"))[1].headers["x-request-id"] for _ in range(40)]
    redis = aioredis.Redis.from_url(url)

    async def all_shared() -> int:  # the served requests reach Redis in instance 1's next batch
        return await redis.exists(*(f"{prefix}:learn:req:{rid}" for rid in ids)) == len(ids)

    try:
        await eventually(all_shared, "instance 1's served requests in Redis")
    finally:
        await redis.aclose()
    async with aiohttp.ClientSession() as s:
        for rid in ids:  # rated through the other instance, which served none of them
            async with s.post(p2.url + "/v1/feedback", json={"request_id": rid, "score": 1.0}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["route"] == "weak"
        async with s.post(p2.url + "/v1/feedback", json={"request_id": "unknown", "score": 1.0}) as r:
            assert r.status == 404

    # Instance 1 never saw the feedback: its posteriors come from Redis (read every 0.5 s, and
    # routing follows them every 5 s).
    async def routes_weak() -> bool:
        return (await served_by(c1, text))[0] == "weak"

    await eventually(routes_weak, "instance 1 learning from instance 2's feedback", every=0.2)

    async def learned_all() -> list[dict[str, Any]]:  # every score, which instance 2 may send in several batches
        async with aiohttp.ClientSession() as s, s.get(p1.url + "/admin/learning") as r:
            rows = (await r.json())["posteriors"]
        return [p for p in rows if p["task"] == "math" and p["route"] == "weak" and p["alpha"] > 40]

    await eventually(learned_all, "instance 1's posterior for (math, weak) counting all 40 scores")


async def test_feedback_right_after_the_answer_reaches_the_other_instance(pair, start_proxy) -> None:
    """Served requests reach Redis in the serving instance's next batch (0.5 s): feedback sent
    to another instance at once waits for it instead of being refused as unknown."""
    url = require_redis()
    strong, weak = pair
    cfg = shared_learner(url, strong, weak)
    p1, p2 = await start_proxy(cfg), await start_proxy(cfg)
    c1 = openai.AsyncOpenAI(base_url=p1.url + "/v1", api_key="x")
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            rid = (await served_by(c1, "What is 17 times 23?", model="weak-ab"))[1].headers["x-request-id"]
            async with s.post(p2.url + "/v1/feedback", json={"request_id": rid, "score": 0.0}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["route"] == "weak"


async def test_a_new_redis_starts_from_the_state_file_once(pair, start_proxy, tmp_path) -> None:
    """The learner's state file is read into an empty Redis by the first instance, not by every
    one; before, the first score on a (task, route) replaced what the file held with the prior."""
    url = require_redis()
    strong, weak = pair
    state = tmp_path / "learning.json"
    state.write_text('{"posteriors": [{"task": "math", "route": "weak", "alpha": 5.0, "beta": 3.0}]}')
    cfg = shared_learner(url, strong, weak)
    cfg["learning"]["feedback"]["state_path"] = str(state)
    p1, p2 = await start_proxy(cfg), await start_proxy(cfg)
    c1 = openai.AsyncOpenAI(base_url=p1.url + "/v1", api_key="x")
    rid = (await served_by(c1, "What is 17 times 23?", model="weak-ab"))[1].headers["x-request-id"]
    async with aiohttp.ClientSession() as s:
        async with s.post(p2.url + "/v1/feedback", json={"request_id": rid, "score": 1.0}) as r:
            assert r.status == 200, await r.text()

        async def both_counted() -> bool:
            seen = []
            for p in (p1, p2):
                async with s.get(p.url + "/admin/learning") as r:
                    rows = (await r.json())["posteriors"]
                seen += [(row["alpha"], row["beta"]) for row in rows if (row["task"], row["route"]) == ("math", "weak")]
            return seen == [(6.0, 3.0), (6.0, 3.0)]

        await eventually(both_counted, "both instances at the file's posterior plus one score")
    await c1.close()


async def test_a_redis_restarted_empty_keeps_what_was_learned(pair, start_proxy) -> None:
    """Redis restarted without its data while the instances run: the next score went into an
    empty hash, and every instance's posterior fell back to the prior plus that one score."""
    url = require_redis()
    strong, weak = pair
    cfg = shared_learner(url, strong, weak)
    prefix = cfg["shared_state"]["prefix"]
    p1, p2 = await start_proxy(cfg), await start_proxy(cfg)
    c1 = openai.AsyncOpenAI(base_url=p1.url + "/v1", api_key="x")

    async def rate_one() -> None:
        rid = (await served_by(c1, "What is 17 times 23?", model="weak-ab"))[1].headers["x-request-id"]
        async with aiohttp.ClientSession() as s:
            async with s.post(p2.url + "/v1/feedback", json={"request_id": rid, "score": 1.0}) as r:
                assert r.status == 200, await r.text()

    async def both_at(alpha: float) -> None:
        async def agreed() -> bool:
            seen = []
            async with aiohttp.ClientSession() as s:
                for p in (p1, p2):
                    async with s.get(p.url + "/admin/learning") as r:
                        rows = (await r.json())["posteriors"]
                    seen += [row["alpha"] for row in rows if (row["task"], row["route"]) == ("math", "weak")]
            return seen == [alpha, alpha]

        await eventually(agreed, f"both instances at alpha {alpha}")

    for _ in range(3):
        await rate_one()
    await both_at(4.0)
    redis = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        assert await redis.delete(*keys) == len(keys) > 0  # what a restart without persistence leaves
    finally:
        await redis.aclose()
    await rate_one()
    await both_at(5.0)
    await c1.close()


async def test_sums_written_before_the_seeded_mark_are_kept_not_doubled(pair, start_proxy, tmp_path) -> None:
    """A Redis that holds sums from a release before the seeded mark: adopted as they are, the
    state file (which already counts them) not added on top."""
    url = require_redis()
    strong, weak = pair
    state = tmp_path / "learning.json"
    state.write_text('{"posteriors": [{"task": "math", "route": "weak", "alpha": 5.0, "beta": 3.0}]}')
    cfg = shared_learner(url, strong, weak)
    cfg["learning"]["feedback"]["state_path"] = str(state)
    prefix = cfg["shared_state"]["prefix"]
    redis = aioredis.Redis.from_url(url)
    try:
        await redis.hset(f"{prefix}:learn:posteriors", mapping={"math\x1fweak\x1fa": 4.0, "math\x1fweak\x1fb": 2.0})
    finally:
        await redis.aclose()
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    rid = (await served_by(client, "What is 17 times 23?", model="weak-ab"))[1].headers["x-request-id"]
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/feedback", json={"request_id": rid, "score": 0.0}) as r:
            assert r.status == 200, await r.text()

        async def counted() -> bool:
            async with s.get(proxy.url + "/admin/learning") as r:
                rows = (await r.json())["posteriors"]
            return [(p["alpha"], p["beta"]) for p in rows if (p["task"], p["route"]) == ("math", "weak")] == [
                (5.0, 4.0)
            ]

        await eventually(counted, "the adopted sums plus one score of 0")
    await client.close()
