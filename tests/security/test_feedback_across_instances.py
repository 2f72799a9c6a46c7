"""Feedback abuse across instances (class: feedback flood): one request moves the shared
learner once, whichever instances its score is sent to.

The learner is shared over Redis (`shared_state`): an instance that did not serve a request
looks it up there to accept a score for it. Each instance remembered only its own ratings, so
a client behind a load balancer repeated one score until it had reached every instance:
with N instances (or `serve --workers N`), its request moved the routing of every tenant N times.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import redis.asyncio as aioredis

from edgeroute.learning_share import SYNC_S
from tests.conftest import eventually
from tests.scale.test_learning_share import shared_learner
from tests.test_cost_support import require_redis
from tests.test_selection import served_by


async def test_one_request_moves_the_shared_learner_once(start_upstream: Any, start_proxy: Any) -> None:
    url = require_redis()
    strong, weak = await start_upstream(), await start_upstream()
    cfg = shared_learner(url, strong, weak)
    prefix = cfg["shared_state"]["prefix"]
    instances = [await start_proxy(cfg) for _ in range(3)]
    client = openai.AsyncOpenAI(base_url=instances[0].url + "/v1", api_key="x")
    _, raw = await served_by(client, "What is 17 times 23?", model="weak-ab")
    rid = raw.headers["x-request-id"]
    async with aiohttp.ClientSession() as s:
        for p in instances + instances:  # the same score, sent to each instance twice
            async with s.post(p.url + "/v1/feedback", json={"request_id": rid, "score": 1.0}) as r:
                assert r.status == 200, await r.text()
                task = (await r.json())["task"]
    redis = aioredis.Redis.from_url(url)
    field = f"{task}\x1fweak\x1fa"
    try:

        async def rewarded() -> float:
            return float(await redis.hget(f"{prefix}:learn:posteriors", field) or 0)

        await eventually(rewarded, "the score in the shared posteriors")
        await asyncio.sleep(3 * SYNC_S)  # every instance's next batch written
        assert await rewarded() == 1.0, "the request's score counted more than once"
    finally:
        await redis.aclose()
        await client.close()
