"""A key poll hung on a vanished PostgreSQL peer does not hold the instance's admin calls.

The instance reaches PostgreSQL through a forwarder that can hold the bytes of connections
without closing anything (a partition that drops packets: neither side sees an error, and
keepalives are answered by the forwarder). The poll held the governance store's one connection,
so every admin call (a key made or revoked, the audit log, the config versions) waited behind
it for as long as the partition lasted. The poll now has a connection of its own: with only
that one cut off, admin calls are answered as usual. With every connection cut off, an admin
call answers within a bound with a 503 naming the store, and all is answered again once the
partition heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import simple_config
from tests.scale.support import Spawn
from tests.scale.test_keys_when_the_key_store_is_cut_off import _pg_address
from tests.scale.test_ledger_lock_partition import Forwarder, _through
from tests.test_cost_support import RedisServer

ADMIN = "tok-admin"
_POLL = b"FROM gov_meta WHERE name = 'keys'"  # the key poll's query
BOUND_S = 10.0  # an admin call's answer, 503 or not, comes within this (the store's deadline is 5 s)


class Holds:
    """Holds the client's bytes on connections through a `Forwarder` (as `Stall` does, made
    before the forwarder starts): `polls`, on those that have carried the key poll's query;
    `all`, on every one. Nothing is closed: neither side sees an error."""

    def __init__(self, fwd: Forwarder) -> None:
        self.polls = self.all = False
        self.healed = asyncio.Event()
        pipe = fwd._pipe

        async def held(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await pipe(_PollGate(r, self), w)  # type: ignore[arg-type]

        fwd._pipe = held  # type: ignore[method-assign]

    def heal(self) -> None:
        self.polls = self.all = False
        self.healed.set()


class _PollGate:
    """A client's reader that delivers nothing while its connection is held."""

    def __init__(self, r: asyncio.StreamReader, holds: Holds) -> None:
        self.r, self.holds, self.polled = r, holds, False

    async def read(self, n: int) -> bytes:
        data = await self.r.read(n)
        self.polled = self.polled or _POLL in data
        while self.holds.all or (self.holds.polls and self.polled):
            self.holds.healed.clear()
            await self.holds.healed.wait()
        return data


@pytest.fixture
async def held_pg(pg_schema_dsn: str) -> AsyncIterator[tuple[str, Holds]]:
    """A DSN through a forwarder whose connections the test holds."""
    fwd = Forwarder(_pg_address(pg_schema_dsn))
    holds = Holds(fwd)
    await fwd.start()
    yield _through(pg_schema_dsn, fwd.port), holds
    holds.heal()
    with contextlib.suppress(Exception):
        await fwd.cut()


async def _admin(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
    """(status, body, seconds taken); the client gives up past twice the bound."""
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {ADMIN}"}, timeout=aiohttp.ClientTimeout(total=2 * BOUND_S)
        ) as s,
        s.request(method, url + path, json=body) as r,
    ):
        return r.status, await r.json(), time.monotonic() - started


async def _served(url: str, token: str) -> bool:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0) as client:
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        except openai.APIStatusError:
            return False
    return True


async def test_admin_calls_are_answered_while_the_key_poll_hangs(
    held_pg: tuple[str, Holds], spawn: Spawn, start_upstream: Any, redis_server: RedisServer
) -> None:
    dsn, r = held_pg
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2, "keys_stale_after_s": 60}
    cfg["ledger"] = {"backend": "postgres", "dsn": dsn, "flush_interval": 0.1}
    cfg["shared_state"] = {"redis_url": redis_server.url, "prefix": "hungpoll"}
    inst = await spawn(cfg)
    status, first, _ = await _admin(inst.url, "POST", "/admin/keys", {"name": "first"})
    assert status == 201, first

    r.polls = True  # the poll's connection alone goes silent
    await asyncio.sleep(1.0)  # a poll is hung by now
    for method, path, body, want in (
        ("POST", "/admin/keys", {"name": "during"}, 201),
        ("GET", "/admin/audit?limit=5", None, 200),
        ("GET", "/admin/config/versions", None, 200),
        ("DELETE", f"/admin/keys/{first['id']}", None, 200),
    ):
        status, got, took = await _admin(inst.url, method, path, body)
        assert status == want and took < BOUND_S, (method, path, status, got, took)
    assert await _served(inst.url, ADMIN)

    r.all = True  # now every connection: the store cannot answer at all
    for method, path, body, code in (
        ("POST", "/admin/keys", {"name": "cut-off"}, "key_store_unavailable"),
        ("GET", "/admin/audit?limit=5", None, "audit_store_unavailable"),
        ("GET", "/admin/config/versions", None, "config_store_unavailable"),
    ):
        status, got, took = await _admin(inst.url, method, path, body)
        assert status == 503 and took < BOUND_S, (method, path, status, got, took)
        assert got["error"]["code"] == code and "store" in got["error"]["message"], got

    r.heal()
    deadline = time.monotonic() + 20
    while True:  # the calls hung meanwhile come back, and so does the instance
        status, after, _ = await _admin(inst.url, "POST", "/admin/keys", {"name": "after"})
        if status == 201 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert status == 201, after
    assert await _served(inst.url, after["secret"])
    status, got, _ = await _admin(inst.url, "GET", "/admin/audit?action=key.revoked")
    assert status == 200 and [e["target"] for e in got["entries"]] == [first["id"]], got
