"""Background tasks end when stopped, also those that Python 3.11 lets run on after a cancel()
(a loop of redis-py calls with a socket timeout: `asyncio.wait_for` inside returns its write's
result to a task cancelled just as the write completed)."""

from __future__ import annotations

import asyncio
import random

import pytest

from edgeroute import background, redis_client
from tests.test_cost_support import require_redis


async def _redis_loop_ends(stopping: bool, tries: int = 10) -> int:
    """How many of `tries` loops of Redis calls, the shape of the shared-state syncs, went on
    after being stopped with `background.stop` (or with one cancel(): until the first that did)."""
    client = redis_client.connect(require_redis(), socket_timeout=2, socket_connect_timeout=2)
    rng = random.Random(7)
    ran_on = 0

    async def loop() -> None:
        while True:
            try:
                await client.get("edgeroute-test-background")
            except redis_client.errors():
                await asyncio.sleep(0.01)

    try:
        for _ in range(tries):
            task = asyncio.create_task(loop())
            await asyncio.sleep(rng.random() * 0.003)  # mid-command, most of the time
            if stopping:
                await asyncio.wait_for(background.stop(task), 10)
            else:
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
                ran_on += not task.done()
                await background.stop(task)
                if ran_on:
                    break
    finally:
        await client.aclose()
    return ran_on


async def test_stop_ends_a_loop_of_redis_calls() -> None:
    assert await _redis_loop_ends(stopping=True) == 0


async def test_a_single_cancel_does_not_always_end_one_on_this_python() -> None:
    """Why `stop` exists: on Python 3.11 one cancel() is swallowed now and then (3.12's
    wait_for no longer does this)."""
    import sys

    if sys.version_info >= (3, 12):
        pytest.skip("asyncio.wait_for keeps cancellations from Python 3.12")
    # A race: 10 tries showed it on a quiet machine, none on a loaded one (CI with two test
    # workers). It is Python's, not ours: shown in up to 300 tries, else the test says so.
    if await _redis_loop_ends(stopping=False, tries=300) == 0:
        pytest.skip("the swallowed cancel() did not show in 300 tries on this machine")


async def test_stop_raises_what_a_task_failed_with() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await background.stop(task)
