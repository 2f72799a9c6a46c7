"""A shared learner (Redis `shared_state`, or the workers' SQLite file) counts each score once,
and never lets what it learned shrink, whatever happens to the store.

Found by a red team (session 34), reproduced against running instances before the fix:
- once the store lost a request's "rated" mark (FLUSHDB, a restart without data, its 24 h
  expiry), the instance that served the request still held it as unrated and counted a second
  score on it. A score is now claimed only while the store holds the request's record, and
  an instance forgets what it served after the same 24 h;
- after the store came back empty, the first process to seed it won, even one with no state
  file, and the running instances replaced what they had learned with its nearly empty sums.
  Seeding now raises each sum to a process's own where that is larger, and a sync never takes
  a process below what it counted.

The proxies are the real app on edgeroute's HTTP server against the real Redis; the SQLite
store is the one `serve --workers N` uses."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from edgeroute.config import SharedState
from edgeroute.learning import LEARNER, FeedbackLearner
from edgeroute.learning_share import REMEMBER_S, LearningShare, LearnStore, RedisLearnStore, SqliteLearnStore
from tests.conftest import eventually
from tests.test_cost_support import require_redis
from tests.test_feedback_per_team import with_weak_ab
from tests.test_selection import config, msg

TEXT = "Translate into French: the cat sleeps on the warm windowsill."


async def _wipe_redis(url: str, prefix: str) -> None:
    """What FLUSHDB (or a restart without data) does to this prefix's keys."""
    r = aioredis.Redis.from_url(url)
    try:
        async for k in r.scan_iter(match=f"{prefix}:*"):
            await r.delete(k)
    finally:
        await r.aclose()


def _wipe_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as c:
        for table in ("learn_sum", "learn_req", "learn_rated"):
            c.execute(f"DELETE FROM {table}")
        c.execute("DELETE FROM once WHERE key = 'learning-seeded'")


@pytest.fixture(params=["redis", "sqlite"])
async def store(request: Any, tmp_path: Path) -> AsyncIterator[tuple[Callable[[], LearnStore], Callable[[], Any]]]:
    """A factory of stores on one shared place, and what empties that place."""
    if request.param == "redis":
        url = require_redis()
        prefix = f"t-once-{uuid.uuid4().hex[:8]}"
        cfg = SharedState(redis_url=url, prefix=prefix, timeout_ms=2000)

        async def wipe_r() -> None:
            await _wipe_redis(url, prefix)

        yield (lambda: RedisLearnStore(cfg)), wipe_r
        await _wipe_redis(url, prefix)
    else:
        path = tmp_path / "learning.db"

        async def wipe_s() -> None:
            _wipe_sqlite(path)

        yield (lambda: SqliteLearnStore(path)), wipe_s


def _joined(make: Callable[[], LearnStore], seed: int) -> tuple[FeedbackLearner, LearningShare]:
    learner = FeedbackLearner(None, seed=seed)
    share = LearningShare(make(), learner)
    learner.share = share
    return learner, share


async def test_a_store_refilled_by_a_newcomer_does_not_shrink_what_was_learned(store: Any) -> None:
    make, wipe = store
    a, share_a = _joined(make, 1)
    await share_a.seed()
    for n in range(3):  # "the weak route is bad at translation", three times
        a.served(f"a{n}", "weak", "translation", 0.0)
        a.feedback(f"a{n}", 0.0)
    await share_a.flush()
    await share_a.sync()
    assert a.evidence[("translation", "weak")]["anonymous"] == (0.0, 3.0)

    await wipe()  # the store comes back empty
    c, share_c = _joined(make, 2)  # a new instance without a state file seeds it first
    await share_c.seed()
    c.served("c0", "weak", "translation", 0.0)
    c.feedback("c0", 1.0)  # one score of 1 (anyone's)
    await share_c.flush()

    await share_a.flush()
    await share_a.sync()
    assert a.evidence[("translation", "weak")]["anonymous"] == (1.0, 3.0)  # before: (1, 0)
    await share_c.sync()
    assert c.evidence[("translation", "weak")]["anonymous"] == (1.0, 3.0)
    for s in (share_a, share_c):
        await s.store.close()


async def test_a_score_is_not_claimed_again_once_the_store_forgot_the_request(store: Any) -> None:
    make, wipe = store
    a, share_a = _joined(make, 1)
    _, share_b = _joined(make, 2)
    await share_a.seed()
    a.served("r1", "weak", "translation", 0.0)
    await share_a.flush()
    assert await share_b.lookup("r1") is not None
    assert await share_b.claim("r1") in (None, True)  # B counts the score (True: as releases before said it)
    await wipe()  # the rated mark is gone, and the request's record with it
    assert await share_a.claim("r1") == "not_in_shared_store"  # before: True, counted again
    for s in (share_a, share_b):
        await s.store.close()


def test_a_served_request_is_forgotten_after_the_stores_time() -> None:
    learner = FeedbackLearner(None)
    learner.served("old", "weak", "math", 0.0)
    learner.served("new", "weak", "math", 0.0)
    learner.recent["old"].at -= REMEMBER_S + 1
    assert learner.feedback("old", 0.0) is None  # as the shared store forgot it
    assert learner.feedback("new", 0.0) is not None


async def _learned(url: str) -> tuple[float, float] | None:
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/learning") as r:
        state = await r.json()
    rows = [(e["a"], e["b"]) for e in state["evidence"] if e["route"] == "weak"]
    return rows[0] if rows else None


async def test_a_score_counts_once_after_redis_loses_its_mark(start_upstream, start_proxy) -> None:
    url = require_redis()
    prefix = f"t-once-{uuid.uuid4().hex[:8]}"
    strong, weak = await start_upstream(), await start_upstream()
    shared = {"redis_url": url, "prefix": prefix, "timeout_ms": 2000}
    cfg = with_weak_ab(config(strong, weak, shared_state=shared, learning={"feedback": {}}))
    one, two = await start_proxy(cfg), await start_proxy(cfg)
    try:
        client = openai.AsyncOpenAI(base_url=one.url + "/v1", api_key="x", max_retries=0)
        rid = (await client.chat.completions.with_raw_response.create(model="weak-ab", messages=msg(TEXT))).headers[
            "x-request-id"
        ]
        await client.close()
        async with aiohttp.ClientSession() as s:
            async with s.post(two.url + "/v1/feedback", json={"request_id": rid, "score": 0}) as r:
                assert r.status == 200 and "learned" not in await r.json()  # rated through the other instance

        async def synced() -> bool:
            return await _learned(one.url) == (0.0, 1.0)

        await eventually(synced, "the first instance to hold the score")
        await _wipe_redis(url, prefix)  # FLUSHDB, a restart without data, or the 24 h expiry
        async with aiohttp.ClientSession() as s:
            async with s.post(one.url + "/v1/feedback", json={"request_id": rid, "score": 0}) as r:
                body = await r.json()
        assert await _learned(one.url) == (0.0, 1.0)  # before: (0, 2)
        assert r.status == 200 and body["learned"] is False and body["reason"] == "not_in_shared_store", body

        async def reseeded() -> bool:  # the instance's evidence refills the empty store
            return await _learned(two.url) == (0.0, 1.0) and await _learned(one.url) == (0.0, 1.0)

        await eventually(reseeded, "both instances at one score")
    finally:
        await _wipe_redis(url, prefix)


async def test_two_concurrent_first_scores_count_once(start_upstream, start_proxy) -> None:
    """The first claim's answer arrives after the second's: before, the second (refused) marked
    the request rated meanwhile and the first, which held the claim, then counted nothing."""
    url = require_redis()
    prefix = f"t-once-{uuid.uuid4().hex[:8]}"
    strong, weak = await start_upstream(), await start_upstream()
    shared = {"redis_url": url, "prefix": prefix, "timeout_ms": 2000}
    proxy = await start_proxy(with_weak_ab(config(strong, weak, shared_state=shared, learning={"feedback": {}})))
    store = proxy.app[LEARNER].share.store  # type: ignore[union-attr]
    claim, second_done, calls = store.claim, asyncio.Event(), []

    async def late_first(*args: Any) -> Any:
        calls.append(args)
        got = await claim(*args)
        if len(calls) == 1:
            await second_done.wait()  # the first claim's answer comes back last
        else:
            second_done.set()
        return got

    store.claim = late_first  # type: ignore[method-assign]
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        rid = (await client.chat.completions.with_raw_response.create(model="weak-ab", messages=msg(TEXT))).headers[
            "x-request-id"
        ]
        await client.close()
        async with aiohttp.ClientSession() as s:

            async def rate() -> dict[str, Any]:
                async with s.post(proxy.url + "/v1/feedback", json={"request_id": rid, "score": 0}) as r:
                    assert r.status == 200
                    return dict(await r.json())

            bodies = await asyncio.gather(rate(), rate())
        assert sorted(b.get("reason", "learned") for b in bodies) == ["already_scored", "learned"], bodies
        assert await _learned(proxy.url) == (0.0, 1.0)  # before: nothing learned
    finally:
        await _wipe_redis(url, prefix)
