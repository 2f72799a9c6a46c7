"""A drain while the shared store (Redis) has stopped answering: one request holds a budget
reservation made there and waits on its upstream, another waits inside admission on its
reservation's round trip. Both clients get their 503 `server_shutdown` in their API's format
with `Retry-After` at the drain's end, both requests are recorded `drain_cut`, and the process
exits within `drain_timeout` plus one bounded wait for the store (`CLOSE_WAIT_S`): it waited
5 s for each of several things stuck on the same store in turn (11.3 s after SIGTERM at
`drain_timeout: 1`, past the `--workers` supervisor's 10 s grace, which then SIGKILLs a worker
with its ledger unwritten).

The budget then counts at most the reservation whose give-back was on the wire when the store
stopped answering (docs/scaling.md: one that timed out on the wire may stay counted until the
period ends, a budget erring towards blocking early), and nothing for the request whose
reservation never reached the store."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import eventually
from tests.serve_support import killed, start_serve
from tests.test_budget_abandoned_redis import ALICE, RESERVATION_USD, budget_config, budget_counted
from tests.test_cost_support import require_redis
from tests.test_drain_cut_before_dispatch import StallingProxy, _redis
from tests.test_drain_cut_waiting import assert_drain_cut
from tests.test_serve import wait_ready

HELLO = [{"role": "user", "content": "hi"}]
DRAIN_S = 1.0


async def test_a_drain_with_a_stalled_store_answers_records_and_exits_in_time(
    start_upstream: Any, tmp_path: Path
) -> None:
    require_redis()
    up = await start_upstream(latency_ms=30_000, record=True)  # answers long after the drain
    target, db = _redis()
    prefix = f"drain-stalled-{os.getpid()}-{os.urandom(4).hex()}"
    ledger = tmp_path / "ledger.db"
    async with StallingProxy(target).running() as redis:
        cfg = budget_config(up.base_url, ledger, server={"drain_timeout": DRAIN_S})
        cfg["shared_state"] = {
            "redis_url": f"redis://127.0.0.1:{redis.port}{db}",
            "timeout_ms": 30_000,
            "prefix": prefix,
        }
        serving = await start_serve(tmp_path / "c.yaml", cfg, stderr=None)
        proc, url = serving.proc, serving.url
        try:
            await wait_ready(url)
            oa = openai.AsyncOpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0, timeout=30)
            an = anthropic.AsyncAnthropic(base_url=url, api_key=ALICE, max_retries=0, timeout=30)
            # Reserved in the store, then waiting on its upstream.
            on_upstream = asyncio.ensure_future(oa.chat.completions.create(model="m", messages=HELLO, max_tokens=200))
            await eventually(lambda: asyncio.sleep(0, up.options.requests), "the upstream called")
            redis.stall()
            # Its reservation's round trip never answered: waiting inside admission.
            in_admission = asyncio.ensure_future(an.messages.create(model="m", messages=HELLO, max_tokens=200))
            await eventually(lambda: asyncio.sleep(0, redis.commands_held), "admission waiting on the store")
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            for task, api in ((on_upstream, "openai"), (in_admission, "anthropic")):
                with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as got:
                    await asyncio.wait_for(task, 10)
                assert_drain_cut(got.value, api)
            answered_s = time.monotonic() - t0
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            exited_s = time.monotonic() - t0
        finally:
            await killed(proc)
    assert answered_s < DRAIN_S + 1.5, f"clients answered {answered_s:.1f} s after SIGTERM"
    assert len(up.options.requests) == 1  # the one waiting in admission was never sent
    with sqlite3.connect(ledger) as conn:
        outcomes = sorted(r[0] for r in conn.execute("SELECT outcome FROM requests").fetchall())
    assert outcomes == ["drain_cut", "drain_cut"]
    # The drain, then one wait for the store (5 s), then the ledger's last flush.
    assert exited_s < DRAIN_S + 7, f"the process exited {exited_s:.1f} s after SIGTERM with a stalled store"
    # The store answers again: it counts at most the reservation whose give-back it never
    # answered (the ledger holds $0: neither was answered), not the one it never received.
    cfg = budget_config(up.base_url, ledger)
    cfg["shared_state"] = {"redis_url": f"redis://{target[0]}:{target[1]}{db}", "prefix": prefix}
    serving = await start_serve(tmp_path / "c2.yaml", cfg, stderr=None)
    try:
        await wait_ready(serving.url)
        counted = await budget_counted(serving.url)
        assert counted <= RESERVATION_USD + 1e-9, f"${counted:.2f} of alice's budget still counted after the drain"
    finally:
        await killed(serving.proc)
