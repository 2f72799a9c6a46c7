"""`serve --workers 2` without Redis: the workers pool their feedback learner.

Each worker kept a learner of its own: feedback on a request the other worker served was
answered 404 (or, with the request log, accepted and counted by neither learner), the two
workers routed on different posteriors, and the state file kept the last worker's to save.
Now the workers share the sums and the served requests in a file in the supervisor's run
directory, seeded at start from the state file by the first worker (once)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.conftest import eventually
from tests.scale.support import Instance, Spawn
from tests.scale.test_learning_share import with_weak_ab
from tests.test_selection import config

QUESTION = "What is 17 times 23?"


async def _weak_request_ids(url: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):  # a client of its own each: the kernel spreads new connections over the workers
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="weak-ab", messages=[{"role": "user", "content": QUESTION}]
            )
            ids.append(raw.headers["x-request-id"])
    return ids


async def _rate(url: str, rid: str) -> int:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/feedback", json={"request_id": rid, "score": 1.0}) as r:
        return r.status


async def _weak_alphas(url: str, asks: int = 8) -> set[float]:
    """The (task, weak) posterior's alpha as each of `asks` fresh connections' worker sees it."""
    seen = set()
    for _ in range(asks):
        async with aiohttp.ClientSession() as s, s.get(url + "/admin/learning") as r:
            rows = (await r.json())["posteriors"]
        seen.add(sum(p["alpha"] for p in rows if p["route"] == "weak"))
    return seen


async def _everywhere(inst: Instance, alpha: float) -> None:
    async def agreed() -> bool:
        return await _weak_alphas(inst.url) == {alpha}

    await eventually(agreed, f"every worker's weak posterior at alpha {alpha}", within=10)


async def test_workers_pool_feedback_and_keep_it_across_a_restart(
    spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    state = tmp_path / "learning.json"
    cfg = with_weak_ab(config(strong, weak, learning={"feedback": {"max_shift": 0.1, "state_path": str(state)}}))
    first = await spawn(cfg, "--workers", "2", name="first")
    ids = await _weak_request_ids(first.url, 12)
    assert [await _rate(first.url, rid) for rid in ids] == [200] * 12
    await _everywhere(first, 1.0 + 12)  # the prior's 1 and twelve scores of 1.0, on both workers

    first.proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(first.proc.wait(), 30)
    saved = json.loads(state.read_text())["posteriors"]
    assert sum(p["alpha"] for p in saved if p["route"] == "weak") == 13.0

    second = await spawn(cfg, "--workers", "2", name="second")
    await _everywhere(second, 13.0)  # read back once, not once per worker
    ids = await _weak_request_ids(second.url, 4)
    assert [await _rate(second.url, rid) for rid in ids] == [200] * 4
    await _everywhere(second, 17.0)
