"""A request in flight on an instance that dies is recorded by a survivor, once (shared state).

Two real `edgeroute serve` processes share Redis and one PostgreSQL ledger. One streams a
slow answer and is killed with SIGKILL: its reservation stayed in the shared budget with no
spend row, and no instance ever said which request was lost (the reports said $0 where the
budget counted the reservation). Now the survivor finds the dead instance's heartbeat gone,
and records the request as `crashed` at its reservation, once; the budget and the reports agree.
An instance paused (SIGSTOP) past its heartbeat's expiry is taken over the same way, and its
settlement once it resumes does not count the request again, nor does its row kept from a batch
the database refused before the pause. The openai SDK is the client.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp
import openai
import psycopg
import pytest
import redis

from tests.conftest import Upstream, eventually
from tests.metrics_support import scrape
from tests.scale.support import REDIS_URL, Instance, Spawn, kill_tree
from tests.scale.test_ledger_lock_partition import _forwarder, _through
from tests.test_cost_support import require_postgres, require_redis

ADMIN = "tok-crash-admin"
PRICE = 1000.0  # output $/Mtok: a token costs $0.001
MAX_TOKENS = 100
RESERVED = MAX_TOKENS * PRICE / 1e6  # every request reserves $0.10 (its prompt is free)
# The heartbeat's expiry and the survivors' sweep (`cost.control.liveness`), with the flush.
WITHIN_S = 6.0 + 2.0 + 0.5 + 10.0  # plus slack for a loaded, shared 2-core machine


@pytest.fixture
def prefix() -> str:
    require_redis()
    require_postgres()
    return f"edgeroute-crash-{os.getpid()}-{os.urandom(4).hex()}"


def _config(up: Upstream, prefix: str, dsn: str) -> dict[str, Any]:
    return {
        "providers": {"p": {"base_url": up.base_url, "api_key": "key-p"}},
        "deployments": {
            "d": {"provider": "p", "model": "gpt-4o-mini", "price": {"input_per_mtok": 0, "output_per_mtok": PRICE}}
        },
        "models": {"m": {"deployments": ["d"]}},
        "keys": {"root": {"token": ADMIN, "role": "admin"}},
        "budgets": {"limits": [{"name": f"b-{prefix}", "scope": "global", "limit_usd": 1.0, "period": "day"}]},
        "shared_state": {"redis_url": REDIS_URL, "prefix": prefix, "timeout_ms": 2000},
        "ledger": {"backend": "postgres", "dsn": dsn, "flush_interval": 0.5},
    }


async def _get(inst: Instance, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(inst.url + path, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def _crashed(inst: Instance) -> dict[str, Any] | None:
    """The `crashed` row of the instance's `/admin/spend?by=outcome`, if any."""
    rows = (await _get(inst, "/admin/spend?by=outcome"))["rows"]
    return next((r for r in rows if r["outcome"] == "crashed"), None)


def _spend_rows(dsn: str) -> list[tuple[str, str, float]]:
    with psycopg.connect(dsn) as db:
        rows = db.execute("SELECT request_id, outcome, cost_usd FROM spend ORDER BY id").fetchall()
    return [(str(a), str(b), float(c)) for a, b, c in rows]


def _journaled(dsn: str) -> int:
    with psycopg.connect(dsn) as db:
        (n,) = db.execute("SELECT count(DISTINCT request_id) FROM reservations").fetchone() or (0,)
    return int(n)


async def _stream_started(inst: Instance, dsn: str) -> tuple[Any, asyncio.Queue[str]]:
    """A slow stream through `inst`, read in a task; returns once its first words arrived and
    its reservation is journaled in the ledger (what a survivor reads)."""
    client = openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key=ADMIN, max_retries=0, timeout=120)
    got: asyncio.Queue[str] = asyncio.Queue()

    async def read() -> str:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "tell me"}], max_tokens=MAX_TOKENS, stream=True
        )
        text = ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                got.put_nowait(text)
        return text

    task = asyncio.create_task(read())
    await asyncio.wait_for(got.get(), 30)

    async def journaled() -> bool:
        return await asyncio.to_thread(_journaled, dsn) == 1

    await eventually(journaled, "the stream's reservation journaled", within=10)
    return task, got


async def _budget(inst: Instance) -> dict[str, Any]:
    budget: dict[str, Any] = (await _get(inst, "/admin/budgets"))["budgets"][0]
    return budget


async def test_a_stream_killed_with_its_instance_is_recorded_as_crashed_by_the_survivor(
    pg_schema_dsn: str, start_upstream: Any, spawn: Spawn, prefix: str
) -> None:
    up = await start_upstream(chunk_interval=0.3, reply_words=80)  # about 24 s of answer
    cfg = _config(up, prefix, pg_schema_dsn)
    a = await spawn(cfg, name="a")
    b = await spawn(cfg, name="b")
    stream, _ = await _stream_started(a, pg_schema_dsn)
    assert (await _budget(b))["spent_usd"] == pytest.approx(RESERVED)  # the hold, counted in Redis

    killed = time.monotonic()
    kill_tree(a.proc.pid)
    await a.proc.wait()
    with pytest.raises(openai.OpenAIError):  # the client sees its stream cut
        await stream

    async def recorded() -> bool:
        return await _crashed(b) is not None

    await eventually(recorded, "the survivor recording the killed stream as crashed", within=WITHIN_S + 10)
    took = time.monotonic() - killed
    assert took < WITHIN_S, f"recorded {took:.1f} s after the kill"
    row = await _crashed(b)
    assert row is not None and row["requests"] == 1 and row["cost_usd"] == pytest.approx(RESERVED), row
    # The budget and the reports agree: the reservation is that request's recorded cost.
    budget = await _budget(b)
    assert budget["spent_usd"] == pytest.approx(RESERVED) and budget["reserved_usd"] == 0, budget
    assert (await _get(b, "/admin/spend?by=outcome"))["total"]["cost_usd"] == pytest.approx(RESERVED)
    listed = (await _get(b, "/admin/requests?limit=10"))["data"]
    assert [q["outcome"] for q in listed] == ["crashed"], listed

    # The dead run is done: no instance takes it over again, the restarted one included.
    store = redis.Redis.from_url(REDIS_URL)
    runs_key = next(k for k in store.scan_iter(f"{prefix}:runs:*"))

    async def one_run_left() -> bool:
        return len(store.smembers(runs_key)) == 1

    await eventually(one_run_left, "the dead run leaving the set of runs", within=10)
    a2 = await spawn(cfg, port=a.port, name="a2")

    async def two_runs() -> bool:
        return len(store.smembers(runs_key)) == 2

    await eventually(two_runs, "the restarted instance's run")
    # The budget still admits what fits beside the crashed request's reservation, on either instance.
    for inst in (a2, b):
        client = openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)
        up.options.chunk_interval = 0
        answer = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
        )
        assert answer.choices[0].message.content
    crashed = [r for r in await asyncio.to_thread(_spend_rows, pg_schema_dsn) if r[1] == "crashed"]
    assert len(crashed) == 1 and crashed[0][2] == pytest.approx(RESERVED), crashed


async def test_a_paused_instance_taken_over_does_not_count_its_request_again(
    pg_schema_dsn: str, start_upstream: Any, spawn: Spawn, prefix: str
) -> None:
    up = await start_upstream(chunk_interval=0.3, reply_words=80)
    cfg = _config(up, prefix, pg_schema_dsn)
    a = await spawn(cfg, name="a")
    b = await spawn(cfg, name="b")
    stream, _ = await _stream_started(a, pg_schema_dsn)
    os.kill(a.proc.pid, signal.SIGSTOP)  # paused past its heartbeat's expiry: B takes it over
    try:

        async def recorded() -> bool:
            return await _crashed(b) is not None

        await eventually(recorded, "the survivor recording the paused instance's stream", within=WITHIN_S + 10)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    text = await asyncio.wait_for(stream, 60)  # the paused instance finishes the answer
    assert len(text.split()) > 70  # the whole answer
    # It serves on, as a new run, settling its new requests as usual; once this one's row is
    # written, the resumed instance has decided about the paused one's (settled before it).
    client = openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)
    up.options.chunk_interval = 0
    answer = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
    )
    assert answer.status_code == 200
    rid = answer.headers["x-request-id"]

    async def written() -> bool:
        return any(r[0] == rid for r in await asyncio.to_thread(_spend_rows, pg_schema_dsn))

    await eventually(written, "the new request's spend row")
    # The paused request's own settlement added nothing: one row (the crashed one), and the
    # budget counts it once, at its reservation.
    rows = await asyncio.to_thread(_spend_rows, pg_schema_dsn)
    assert [(o, c) for r, o, c in rows if r != rid] == [("crashed", pytest.approx(RESERVED))], rows
    cost = next(c for r, _, c in rows if r == rid)
    assert (await _budget(b))["spent_usd"] == pytest.approx(RESERVED + cost)
    total = (await _get(a, "/admin/spend?by=outcome"))["total"]
    assert total["requests"] == 2 and total["cost_usd"] == pytest.approx(RESERVED + cost), total
    assert "were recorded as crashed by another instance meanwhile" in a.output()


async def test_a_request_settled_just_before_a_pause_is_recorded_once(
    pg_schema_dsn: str, start_upstream: Any, spawn: Spawn, prefix: str
) -> None:
    """Paused as its answer ended: settled (or about to be) with its row not written yet, and
    its reservation journaled long before. The survivor records it as crashed; the resumed
    instance then writes no row of its own (one would count it twice)."""
    up = await start_upstream(chunk_interval=0.05, reply_words=80)  # 4 s: journaled well before its end
    cfg = _config(up, prefix, pg_schema_dsn)
    cfg["ledger"]["flush_interval"] = 1.0  # the longest: the window this test pauses in
    a = await spawn(cfg, name="a")
    b = await spawn(cfg, name="b")
    store = redis.Redis.from_url(REDIS_URL)
    runs_key = next(k for k in store.scan_iter(f"{prefix}:runs:*"))
    before = store.smembers(runs_key)
    stream, _ = await _stream_started(a, pg_schema_dsn)
    await asyncio.wait_for(stream, 30)
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:

        async def taken_over() -> bool:  # B found A's run dead and recorded what it had to
            return len(store.smembers(runs_key)) == 1

        await eventually(taken_over, "the survivor taking the paused instance's run over", within=WITHIN_S + 10)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)

    async def rejoined() -> bool:
        return len(store.smembers(runs_key) - before) == 1

    await eventually(rejoined, "the resumed instance's new run")
    client = openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)
    answer = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
    )
    rid = answer.headers["x-request-id"]

    async def written() -> bool:
        return any(r[0] == rid for r in await asyncio.to_thread(_spend_rows, pg_schema_dsn))

    await eventually(written, "a later request's spend row (the resumed instance's writer caught up)")
    rows = await asyncio.to_thread(_spend_rows, pg_schema_dsn)
    first = [r for r in rows if r[0] != rid]
    assert len(first) == 1, rows  # its own row or the crashed one: never both
    later = next(c for r, _, c in rows if r == rid)
    assert (await _budget(b))["spent_usd"] <= first[0][2] + later + 1e-9


async def test_a_row_kept_from_a_refused_batch_through_a_pause_is_not_written_beside_the_crashed_one(
    pg_schema_dsn: str, start_upstream: Any, spawn: Spawn, prefix: str
) -> None:
    """A's request settled while its connection to PostgreSQL was cut: its row waited in a
    refused batch, kept for the next flush, when A was paused. B took A's run over and wrote the
    request's `crashed` row; A, resumed and reconnected, retried its batch and wrote the real row
    too (it took back only the records still queued): the request counted twice in the reports.
    Now the database keeps the first row and A drops its own, logged and counted."""
    fwd = await _forwarder(pg_schema_dsn)
    up = await start_upstream(chunk_interval=0.1, reply_words=30)  # 3 s: journaled well before its end
    cfg = _config(up, prefix, pg_schema_dsn)
    a = await spawn({**cfg, "ledger": {**cfg["ledger"], "dsn": _through(pg_schema_dsn, fwd.port)}}, name="a")
    b = await spawn(cfg, name="b")
    try:
        stream, _ = await _stream_started(a, pg_schema_dsn)
        await fwd.cut()  # A's ledger writes fail from now on
        assert len((await asyncio.wait_for(stream, 30)).split()) > 25  # the whole answer

        async def kept() -> bool:  # settled, and its row's batch refused: kept for a retry
            m = await scrape(a.url, ADMIN)
            return (m.value("edgeroute_ledger_failed_batches_total") or 0) >= 1 and m.value(
                "edgeroute_ledger_queue_depth"
            ) == 1

        await eventually(kept, "the settled request's row kept from a refused batch", within=20)
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:

            async def recorded() -> bool:
                return await _crashed(b) is not None

            await eventually(recorded, "the survivor recording the paused instance's request", within=WITHIN_S + 10)
            await fwd.start()  # PostgreSQL is reachable again once A resumes
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        client = openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)
        up.options.chunk_interval = 0
        answer = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
        )
        rid = answer.headers["x-request-id"]

        async def written() -> bool:  # a kept batch is retried before anything newer
            return any(r[0] == rid for r in await asyncio.to_thread(_spend_rows, pg_schema_dsn))

        await eventually(written, "a later request's spend row (the resumed instance's writer caught up)", within=30)
        rows = await asyncio.to_thread(_spend_rows, pg_schema_dsn)
        assert [(o, c) for r, o, c in rows if r != rid] == [("crashed", pytest.approx(RESERVED))], rows
        total = (await _get(b, "/admin/spend?by=outcome"))["total"]
        assert total["requests"] == 2, total
        assert (await scrape(a.url, ADMIN)).value("edgeroute_ledger_already_recorded_total") == 1
        assert "has a spend row already" in a.output()
    finally:
        fwd.passing.set()
        await fwd.cut()
