"""`serve --workers 2`: with `ledger.backend: memory` and managed keys, a key made, or revoked,
through whichever worker takes the admin request holds on every worker, and outlives a
worker's restart. Each worker kept the keys in its own memory: a new key was refused (401)
by the other worker, its revocation was a 404 there, and the revoked key was served on. And
`/admin/deployments` names the worker whose view it is."""

from __future__ import annotations

import os
import signal
from typing import Any

import aiohttp

from tests.conftest import eventually
from tests.governance_support import call
from tests.scale.support import Spawn, children

ADMIN = "tok-admin"


async def _statuses(url: str, secret: str, n: int = 12) -> list[int]:
    """`n` chat requests, each on a new connection (so the kernel spreads them over the workers)."""
    out = []
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(n):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
            s.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}) as r,
        ):
            await r.read()
            out.append(r.status)
    return out


async def test_managed_keys_hold_on_every_worker_with_a_memory_ledger(start_upstream: Any, spawn: Spawn) -> None:
    up = await start_upstream()
    cfg = {
        "providers": {"a": {"base_url": up.base_url}},
        "deployments": {
            "d-a": {"provider": "a", "model": "x", "price": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}
        },
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"backend": "memory"},
        "keys": {"root": {"token": ADMIN, "role": "admin"}},
        "governance": {"managed_keys": True, "key_poll_interval": 0.1},
    }
    inst = await spawn(cfg, "--workers", "2")
    status, key = await call("POST", inst.url + "/admin/keys", ADMIN, json={})
    assert status == 201, key

    async def served_everywhere() -> list[int] | None:
        got = await _statuses(inst.url, key["secret"])
        return got if got == [200] * 12 else None

    await eventually(served_everywhere, "the new key served by every worker", within=10)

    # A worker killed and restarted by the supervisor knows the key too.
    os.kill(children(inst.proc.pid)[0], signal.SIGKILL)

    async def served_after_restart() -> bool:
        try:
            return await _statuses(inst.url, key["secret"]) == [200] * 12 and len(children(inst.proc.pid)) == 2
        except aiohttp.ClientConnectionError:  # a connection queued to the killed worker
            return False

    await eventually(served_after_restart, "the key served after a worker's restart", within=20)

    statuses = set()
    for _ in range(4):  # each on its own connection: whichever worker takes it, one key list
        status, listed = await call("GET", inst.url + "/admin/keys", ADMIN)
        assert status == 200
        statuses.add(tuple(sorted(k["id"] for k in listed["keys"])))
    assert len(statuses) == 1 and key["id"] in next(iter(statuses))

    status, _ = await call("DELETE", inst.url + f"/admin/keys/{key['id']}", ADMIN)
    assert status == 200

    async def refused_everywhere() -> bool:
        return await _statuses(inst.url, key["secret"]) == [401] * 12

    await eventually(refused_everywhere, "the revoked key refused by every worker", within=10)


async def test_admin_deployments_names_the_worker_that_answers(start_upstream: Any, spawn: Spawn) -> None:
    """Each worker's `/admin/deployments` is its own (latency, counts, in flight): the answer says
    whose, where it changed with each connection for no visible reason."""
    up = await start_upstream()
    cfg = {
        "providers": {"a": {"base_url": up.base_url}},
        "deployments": {"d-a": {"provider": "a", "model": "x"}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"backend": "memory"},
    }
    inst = await spawn(cfg, "--workers", "2")
    seen: set[int] = set()

    async def both_answered() -> bool:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
            s.get(inst.url + "/admin/deployments") as r,
        ):
            body = await r.json()
        assert r.status == 200 and body["workers"] == 2 and [d["name"] for d in body["deployments"]] == ["d-a"]
        seen.add(body["worker"])
        return seen == {0, 1}

    await eventually(both_answered, "both workers answering /admin/deployments", within=10, every=0)
