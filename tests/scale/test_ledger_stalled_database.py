"""A PostgreSQL ledger whose database stops answering (packets dropped, no error) is failing.

A partition that drops packets raises nothing: the ledger's write waited for TCP to give up
(about 15 minutes), so `/readyz` stayed 200, `ledger.on_unavailable: closed` never refused, and
every answer meanwhile was held in memory only (213 of 213 answered, none written after a kill
-9). Here the server reaches PostgreSQL through a forwarder that stops passing bytes without
closing anything: within the ledger's bound (`Ledger.stall_s`, 3 s here) a `closed` server
refuses with the API's 503 and `/readyz` is 503 with the reason; an `open` one serves on and
says so in its log and in `edgeroute_ledger_failing_seconds`; once bytes pass again, requests
are answered and the records held meanwhile are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import psycopg

from tests.conftest import eventually
from tests.metrics_support import scrape
from tests.scale.support import Spawn
from tests.scale.test_ledger_lock_partition import _forwarder, _through

STALL_S = 3.0  # the ledger's bound at flush_interval 0.1: max(3 s, 4 intervals)


def _config(upstream: str, dsn: str, on_unavailable: str) -> dict[str, Any]:
    # No budgets and no shared_state: the ledger's lock is a shared one, which a partition does
    # not make the server refuse for, so what refuses here is the ledger alone.
    return {
        "providers": {"a": {"base_url": upstream}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"backend": "postgres", "dsn": dsn, "flush_interval": 0.1, "on_unavailable": on_unavailable},
    }


async def _answer_id(url: str) -> str:
    """A chat request's `x-request-id` (its ledger row's id); raises when it is refused."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    return raw.headers["x-request-id"]


async def _readyz(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
        return r.status, await r.json()


def _written(dsn: str, ids: list[str]) -> tuple[int, int]:
    """How many of `ids` have their spend row and their request-log row in PostgreSQL."""
    with psycopg.connect(dsn) as conn:
        spend = conn.execute("SELECT count(*) FROM spend WHERE request_id = ANY(%s)", (ids,)).fetchone()
        logged = conn.execute("SELECT count(*) FROM requests WHERE id = ANY(%s)", (ids,)).fetchone()
    return int(spend[0]) if spend else 0, int(logged[0]) if logged else 0


async def _all_written(dsn: str, ids: list[str]) -> bool:
    return await asyncio.to_thread(_written, dsn, ids) == (len(ids), len(ids))


@contextlib.asynccontextmanager
async def _served(dsn: str, spawn: Spawn, start_upstream: Any, on_unavailable: str) -> AsyncIterator[Any]:
    """A server whose ledger reaches PostgreSQL through a forwarder; yields (forwarder, server)."""
    fwd = await _forwarder(dsn)
    up = await start_upstream()
    try:
        yield fwd, await spawn(_config(up.base_url, _through(dsn, fwd.port), on_unavailable), name=on_unavailable)
    finally:
        fwd.passing.set()
        with contextlib.suppress(Exception):
            await fwd.cut()


async def _readyz_ok(url: str) -> bool:
    return (await _readyz(url))[0] == 200


async def test_closed_refuses_within_the_bound_while_the_database_stops_answering(
    pg_schema_dsn: str, spawn: Spawn, start_upstream: Any
) -> None:
    async with _served(pg_schema_dsn, spawn, start_upstream, "closed") as (fwd, inst):
        ids = [await _answer_id(inst.url) for _ in range(2)]
        fwd.passing.clear()  # the partition: nothing passes, nothing is closed
        stalled = time.monotonic()

        async def refused() -> openai.APIStatusError | None:
            try:
                ids.append(await _answer_id(inst.url))  # answered within the bound: held, written later
            except openai.APIStatusError as e:
                return e
            return None

        e = await eventually(refused, "a request refused while the database is silent", within=15, every=0.2)
        took = time.monotonic() - stalled
        assert e is not None and e.status_code == 503 and e.code == "ledger_unavailable", e
        assert "cannot write" in e.message
        assert took < STALL_S + 3.0, f"refused only after {took:.1f} s"
        status, body = await _readyz(inst.url)
        assert status == 503 and body["ledger"]["writing"] is False, body
        assert "has not completed" in body["ledger"]["why"], body
        assert body["ledger"]["unwritten_records"] >= 1, body

        fwd.passing.set()  # healed: the held write completes
        await eventually(lambda: _readyz_ok(inst.url), "ready again", within=15, every=0.2)
        ids.append(await _answer_id(inst.url))
        await eventually(lambda: _all_written(pg_schema_dsn, ids), "every answer's rows written", within=15)


async def test_open_serves_on_and_says_so_while_the_database_stops_answering(
    pg_schema_dsn: str, spawn: Spawn, start_upstream: Any
) -> None:
    async with _served(pg_schema_dsn, spawn, start_upstream, "open") as (fwd, inst):
        ids = [await _answer_id(inst.url)]
        fwd.passing.clear()

        async def failing_seconds() -> float:
            ids.append(await _answer_id(inst.url))  # served all along
            return (await scrape(inst.url)).value("edgeroute_ledger_failing_seconds") or 0.0

        await eventually(failing_seconds, "the metric saying the ledger is not writing", within=15, every=0.2)

        async def logged() -> bool:  # the watcher's next look, within half a second
            return "has not completed" in inst.output()

        await eventually(logged, "the log saying the ledger is not writing", within=5)
        assert "served on (ledger.on_unavailable: open)" in inst.output()
        status, body = await _readyz(inst.url)
        assert status == 503 and body["ledger"]["writing"] is False, body

        fwd.passing.set()
        await eventually(lambda: _all_written(pg_schema_dsn, ids), "every answer's rows written", within=15)
        await eventually(lambda: _readyz_ok(inst.url), "ready again", within=15, every=0.2)
        assert (await scrape(inst.url)).value("edgeroute_ledger_failing_seconds") == 0.0
