"""An instance cut off from the PostgreSQL that holds the managed keys stops serving them.

Two instances share the keys in PostgreSQL; the second reaches it through a forwarder that
stops passing bytes without closing anything, as a partition that drops packets does. A key
revoked and an admin downgraded through the first meanwhile went on working on the second
for as long as the partition lasted: its poll hung (no error, no log line) and `/readyz`
said ready. Past `governance.keys_stale_after_s` without a good read, the second refuses
managed keys with a 503 in each API's own error format and is not ready; the config's own
key still works; once the partition heals it reads the changes and refuses the revoked key.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anthropic
import openai

from tests.conftest import eventually, simple_config
from tests.scale.support import Spawn
from tests.scale.test_ledger_lock_partition import Forwarder, _through
from tests.test_cost_support import RedisServer

ADMIN = "tok-admin"
STALE_AFTER = 2.0


class Stall:
    """Holds the bytes of every connection through a `Forwarder` (new ones too) while cleared
    (made before the forwarder starts, which serves its connections with `_pipe`):
    nothing is closed, so neither side sees an error, as in a partition that drops packets."""

    def __init__(self, fwd: Forwarder) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        pipe = fwd._pipe

        async def held(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await pipe(_Gate(r, self.flowing), w)  # type: ignore[arg-type]

        fwd._pipe = held  # type: ignore[method-assign]


class _Gate:
    """A reader that delivers nothing while the gate is shut (the client's side of a partition:
    its queries never reach PostgreSQL, so no answer ever comes back)."""

    def __init__(self, r: asyncio.StreamReader, flowing: asyncio.Event) -> None:
        self.r, self.flowing = r, flowing

    async def read(self, n: int) -> bytes:
        data = await self.r.read(n)
        await self.flowing.wait()
        return data


def _pg_address(dsn: str) -> tuple[str, int]:
    pg = urlsplit(dsn)
    return pg.hostname or "127.0.0.1", pg.port or 5432


async def _admin(url: str, method: str, path: str, token: str = ADMIN, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s,
        s.request(method, url + path, json=body) as r,
    ):
        return r.status, await r.json()


async def _chat(url: str, token: str) -> openai.APIStatusError | None:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0) as client:
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        except openai.APIStatusError as e:
            return e
    return None


async def _chat_status(url: str, token: str, status: int) -> openai.APIStatusError | None:
    """The chat's error when it has `status`, else None."""
    e = await _chat(url, token)
    return e if e is not None and e.status_code == status else None


async def _message(url: str, token: str) -> anthropic.APIStatusError | None:
    async with anthropic.AsyncAnthropic(base_url=url, api_key=token, max_retries=0) as client:
        try:
            await client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        except anthropic.APIStatusError as e:
            return e
    return None


async def _readyz(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
        return r.status, await r.json()


async def test_a_cut_off_instance_refuses_managed_keys_past_the_bound_then_applies_the_revocation(
    pg_schema_dsn: str, spawn: Spawn, start_upstream: Any, redis_server: RedisServer
) -> None:
    fwd = Forwarder(_pg_address(pg_schema_dsn))
    stall = Stall(fwd)
    await fwd.start()
    up = await start_upstream()

    def config(dsn: str) -> dict[str, Any]:
        cfg = simple_config({"a": up})
        cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
        cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2, "keys_stale_after_s": STALE_AFTER}
        cfg["ledger"] = {"backend": "postgres", "dsn": dsn, "flush_interval": 0.1}
        cfg["shared_state"] = {"redis_url": redis_server.url, "prefix": "cutoff"}
        return cfg

    one = await spawn(config(pg_schema_dsn), name="one")
    two = await spawn(config(_through(pg_schema_dsn, fwd.port)), name="two")
    try:
        keys = {}
        for name, role in (("revoked", "service"), ("kept", "service"), ("demoted", "admin")):
            status, made = await _admin(one.url, "POST", "/admin/keys", body={"name": name, "role": role})
            assert status == 201, made
            keys[name] = made
        for made in keys.values():
            await eventually(partial(_served, two.url, made["secret"]), "a new key served by the second instance")

        stall.flowing.clear()  # the partition
        status, _ = await _admin(one.url, "DELETE", f"/admin/keys/{keys['revoked']['id']}")
        assert status == 200
        status, _ = await _admin(one.url, "PATCH", f"/admin/keys/{keys['demoted']['id']}", body={"role": "viewer"})
        assert status == 200

        refused = partial(_chat_status, two.url, keys["revoked"]["secret"], 503)
        e = await eventually(refused, "the revoked key refused while the key store is cut off", within=10, every=0.2)
        assert e is not None
        assert e.code == "key_store_unavailable", e.body
        assert "cannot read its key store" in e.message
        assert e.response.headers["Retry-After"].isdigit()
        for name in ("kept", "demoted"):  # every managed key: none can be checked
            e2 = await _chat(two.url, keys[name]["secret"])
            assert e2 is not None and e2.status_code == 503 and e2.code == "key_store_unavailable", (name, e2)
        status, body = await _admin(two.url, "GET", "/admin/keys", token=keys["demoted"]["secret"])
        assert status == 503 and body["error"]["code"] == "key_store_unavailable", body
        claude = await _message(two.url, keys["kept"]["secret"])
        assert claude is not None and claude.status_code == 503, claude
        assert claude.body["error"]["type"] == "overloaded_error", claude.body  # type: ignore[index]
        assert "cannot read its key store" in claude.message
        assert await _chat(two.url, ADMIN) is None  # the config's own key is no managed key
        status, ready = await _readyz(two.url)
        assert status == 503 and ready["key_store"]["reachable"] is False, ready
        assert ready["key_store"]["last_read_s_ago"] > STALE_AFTER

        async def said() -> bool:
            return "refusing managed keys (503)" in two.output()

        await eventually(said, "the refusal logged", within=10, every=0.2)
        assert two.output().count("managed keys: cannot read the key store") == 1  # once an outage
        async with (
            aiohttp.ClientSession() as s,
            s.get(two.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}) as r,
        ):
            failures = re.search(r"^edgeroute_key_store_poll_failures_total (\S+)$", await r.text(), re.M)
            assert failures is not None and float(failures.group(1)) >= 1  # the hung read, counted
        assert (await _readyz(one.url))[0] == 200  # the first reads its store: unaffected

        stall.flowing.set()  # healed

        revoked = partial(_chat_status, two.url, keys["revoked"]["secret"], 401)
        e = await eventually(revoked, "the revocation applied after the partition", within=20, every=0.2)
        assert e is not None
        assert e.code == "key_revoked", e.body
        assert await _chat(two.url, keys["kept"]["secret"]) is None
        status, body = await _admin(two.url, "GET", "/admin/keys", token=keys["demoted"]["secret"])
        assert status == 403 and body["error"]["code"] == "permission_denied", body  # a viewer now
        status, body = await _admin(two.url, "GET", "/admin/audit?limit=1", token=keys["demoted"]["secret"])
        assert status == 200, body  # which a viewer may do
        assert (await _readyz(two.url))[0] == 200
        assert "the key store answers again" in two.output()
    finally:
        stall.flowing.set()
        with contextlib.suppress(Exception):
            await fwd.cut()


async def _served(url: str, token: str) -> bool:
    return await _chat(url, token) is None
