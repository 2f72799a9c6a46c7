"""The PostgreSQL ledger's lock outlives a restart of PostgreSQL.

`serve` keeps a second server off its ledger with an advisory lock on a session of its own
(`ledger_lock.py`). A PostgreSQL restart ends every session, and the lock went with it,
silently: the server went on spending, and a second server could then take the ledger and
spend every budget in full beside it. Here the session is ended as a restart ends it
(`pg_terminate_backend`, in the test's own database): the server takes the lock back; and
when another holder took it first, the server answers 503 and is not ready until it holds
the lock again.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import psycopg
import pytest

from edgeroute.cost import ledger_lock
from tests.conftest import eventually
from tests.scale.support import Spawn
from tests.scale.test_ledger_ownership import config_with_a_budget
from tests.test_cost_support import answered

# A lock's key as pg_locks shows it (its high and low 32 bits); the ledger's is its schema's.
HOLDERS = (
    "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.objsubid = 1 "
    "AND (l.classid::bigint << 32) | l.objid::bigint = %s AND l.granted "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def _key(conn: psycopg.Connection[Any]) -> int:
    """The ledger lock's key in the schema `conn` is in (the test's own)."""
    return int(conn.execute(f"SELECT {ledger_lock.PG_KEY}").fetchone()[0])  # type: ignore[index]


def _holders(conn: psycopg.Connection[Any]) -> list[int]:
    return [r[0] for r in conn.execute(HOLDERS, (_key(conn),)).fetchall()]


async def _readyz(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
        return r.status, await r.json()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_ledger_lock_is_taken_back_after_its_session_ends(
    pg_schema_dsn: str, spawn: Spawn, start_upstream: Any, workers: str
) -> None:
    dsn = pg_schema_dsn
    up = await start_upstream()
    cfg = config_with_a_budget(up.base_url, ledger={"backend": "postgres", "dsn": dsn, "flush_interval": 0.1})
    # Counted alone (so the lock is exclusive), never reached (a copy: the shared dict is other tests' budget).
    cfg["budgets"] = {"limits": [{"name": "far", "scope": "global", "limit_usd": 1000.0, "period": "day"}]}
    inst = await spawn(cfg, *(("--workers", workers) if workers != "1" else ()), name="pg")
    assert await answered(inst.url, 1) == 1
    with psycopg.connect(dsn, autocommit=True) as test:
        (holder,) = _holders(test)

        # PostgreSQL ends the session (as a restart does): the server takes its lock back.
        test.execute("SELECT pg_terminate_backend(%s)", (holder,))

        async def taken_back() -> bool:
            return bool(h := _holders(test)) and h != [holder]

        await eventually(taken_back, "the server holding the ledger's lock again", within=10)
        assert await answered(inst.url, 1) == 1

        # Ended again, and this time another holder (a second server) takes it first.
        (holder,) = _holders(test)
        test.execute("SELECT pg_terminate_backend(%s)", (holder,))

        async def mine() -> bool:
            return bool(test.execute("SELECT pg_try_advisory_lock(%s)", (_key(test),)).fetchone()[0])  # type: ignore[index]

        await eventually(mine, "the test taking the freed lock", within=5)

        async def not_ready() -> dict[str, Any] | None:
            status, body = await _readyz(inst.url)
            return body if status == 503 else None

        body = await eventually(not_ready, "/readyz saying not ready", within=10)
        assert body["ledger_lock"]["held"] is False and "another edgeroute serve" in body["ledger_lock"]["why"]

        async def refused() -> openai.APIStatusError | None:
            async with openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key="unused", max_retries=0) as client:
                try:
                    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
                except openai.APIStatusError as e:
                    return e
            return None

        async def all_refused() -> list[openai.APIStatusError] | None:
            got = [await refused() for _ in range(int(workers) * 3)]
            return [e for e in got if e is not None] if all(got) else None

        # Every worker refuses every request (a worker reads the supervisor's word within 0.5 s).
        for e in await eventually(all_refused, "every request refused", within=3):
            assert e.status_code == 503
            assert e.code == "ledger_unavailable" and "ledger's lock" in e.message
        assert "another edgeroute serve took the ledger's lock" in inst.output()

        # The other holder goes: the server takes the lock and requests again.
        test.execute("SELECT pg_advisory_unlock(%s)", (_key(test),))

        async def ready() -> bool:
            return (await _readyz(inst.url))[0] == 200

        await eventually(ready, "/readyz ready again", within=10)

        async def serving() -> bool:
            return await answered(inst.url, 1) == 1

        await eventually(serving, "requests answered again", within=2)  # every worker within 0.5 s
        assert len(_holders(test)) == 1
    assert "taking requests again" in inst.output()
