"""A managed key's change committed, then the database connection lost before the instance
read it back: the change was made (and audited), but the answer was a 500, so the secret it
shows once was lost with it. A rotation without a grace period left the key with no secret
anyone knew: its old one refused, its new one never seen.

The connection is cut by a TCP relay between `edgeroute serve` and the real PostgreSQL, right
after it relays the server's COMMIT of a transaction that wrote a key (as a database restart
or a network fault at that moment would)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest

from tests.conftest import simple_config
from tests.scale.support import Spawn
from tests.security.test_audit_with_key_changes import _chat
from tests.test_cost_support import require_postgres

ADMIN = "tok-admin"
_COMMITTED = b"C\x00\x00\x00\x0bCOMMIT\x00"  # CommandComplete("COMMIT") in the wire protocol


class CuttingRelay:
    """Relays connections to PostgreSQL; once armed, closes the first connection that wrote a
    managed key right after relaying its COMMIT's completion to the client."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.armed = False
        self.cuts = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        wrote_key = False

        async def upstream() -> None:
            nonlocal wrote_key
            while data := await client_r.read(65536):
                wrote_key = wrote_key or b"INTO gov_keys" in data
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            nonlocal wrote_key
            while data := await server_r.read(65536):
                client_w.write(data)
                await client_w.drain()
                if self.armed and wrote_key and _COMMITTED in data:
                    self.armed, wrote_key = False, False
                    self.cuts += 1
                    return  # the commit is the client's; the connection is gone
                if _COMMITTED in data:
                    wrote_key = False

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (client_w, server_w):
            w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def relayed_pg() -> AsyncIterator[tuple[str, CuttingRelay]]:
    """A DSN through a `CuttingRelay` to a schema of the test's own, dropped afterwards (asked
    for before `spawn`, so after the server has stopped)."""
    dsn = require_postgres()
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    parts = urlsplit(dsn)
    relay = CuttingRelay(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await relay.start()
    netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
    query = f"sslmode=disable&options=-csearch_path%3D{schema}"
    yield urlunsplit((parts.scheme, netloc, parts.path, query, "")), relay
    await relay.close()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"DROP SCHEMA {schema} CASCADE")


async def _admin(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s,
        s.request(method, url + path, json=body) as r,
    ):
        return r.status, await r.json()


async def _served_within(url: str, token: str, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not await _chat(url, token):
        if loop.time() > end:
            return False
        await asyncio.sleep(0.1)
    return True


async def test_a_key_change_committed_as_the_connection_drops_still_answers_its_secret(
    start_upstream: Any, relayed_pg: tuple[str, CuttingRelay], spawn: Spawn
) -> None:
    up = await start_upstream()
    dsn, relay = relayed_pg
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
    cfg["ledger"] = {"backend": "postgres", "dsn": dsn, "flush_interval": 0.1}
    inst = await spawn(cfg)

    relay.armed = True
    status, made = await _admin(inst.url, "POST", "/admin/keys", {"name": "k"})
    assert relay.cuts == 1
    assert status == 201 and made["secret"].startswith("er-"), made
    assert await _served_within(inst.url, made["secret"], 5.0)

    relay.armed = True
    status, rotated = await _admin(inst.url, "POST", f"/admin/keys/{made['id']}/rotate", {})
    assert relay.cuts == 2
    assert status == 200 and rotated["secret"] != made["secret"], rotated
    assert await _served_within(inst.url, rotated["secret"], 5.0)
    assert not await _chat(inst.url, made["secret"])

    status, audit = await _admin(inst.url, "GET", "/admin/audit?action=key")
    assert status == 200
    assert [e["action"] for e in audit["entries"] if e["target"] == made["id"]] == ["key.rotated", "key.created"]
