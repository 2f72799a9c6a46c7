"""A managed key made (or rotated) through one instance works on another at once.

Two instances share the keys in PostgreSQL. A client that created a key through one and used
it at once behind a load balancer was refused (401 invalid key) by the other until its next
poll (`governance.key_poll_interval`, here its longest, 1 s). An instance that does not know a
well-formed managed token now reads the store before refusing it. Random well-formed tokens
are still refused, and cost a bounded number of reads (one in flight at a time, at most
`MISS_READS_PER_S` a second beyond the poll), counted by `edgeroute_key_store_refreshes_total`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any

import aiohttp
import openai

from edgeroute.governance import keys as K
from tests.conftest import simple_config
from tests.scale.support import Spawn, metric
from tests.test_cost_support import RedisServer

ADMIN = "tok-admin"
BURST = 120


async def _admin(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s,
        s.request(method, url + path, json=body) as r,
    ):
        return r.status, await r.json()


async def _chat(client: openai.AsyncOpenAI, token: str) -> openai.APIStatusError | None:
    try:
        await client.with_options(api_key=token).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    except openai.APIStatusError as e:
        return e
    return None


def _random_token() -> str:
    secret = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    return f"{K.PREFIX}k{os.urandom(6).hex()}.{secret}"


async def test_a_key_made_on_one_instance_is_served_by_another_at_once(
    pg_schema_dsn: str, spawn: Spawn, start_upstream: Any, redis_server: RedisServer
) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 1.0}
    cfg["ledger"] = {"backend": "postgres", "dsn": pg_schema_dsn, "flush_interval": 0.1}
    cfg["shared_state"] = {"redis_url": redis_server.url, "prefix": "madeelsewhere"}
    cfg.setdefault("server", {})["metrics_public"] = True
    one = await spawn(cfg, name="one")
    two = await spawn(cfg, name="two")
    async with openai.AsyncOpenAI(base_url=two.url + "/v1", api_key="unset", max_retries=0) as client:
        for n in range(3):  # made on one, used on two with no pause
            status, made = await _admin(one.url, "POST", "/admin/keys", {"name": f"k{n}"})
            assert status == 201, made
            assert await _chat(client, made["secret"]) is None, f"key {n} refused by the second instance"

        status, rotated = await _admin(one.url, "POST", f"/admin/keys/{made['id']}/rotate", {})
        assert status == 200, rotated
        assert await _chat(client, rotated["secret"]) is None, "the rotated key's new secret refused"

        before = await metric(two.url, "edgeroute_key_store_refreshes_total")
        assert before is not None
        started = time.monotonic()
        refused = await asyncio.gather(*(_chat(client, _random_token()) for _ in range(BURST)))
        took = time.monotonic() - started
        after = await metric(two.url, "edgeroute_key_store_refreshes_total")
        assert after is not None
    for e in refused:
        assert e is not None and e.status_code == 401 and e.code == "invalid_api_key", e
    reads = after - before
    # One read in flight at a time, at most MISS_READS_PER_S a second: never one per token.
    assert reads <= K.MISS_READS_PER_S * took + 2, (reads, took)
    assert reads < BURST / 10, (reads, took)
    assert took < BURST * K.MISS_WAIT_S / 4, took  # each waits for a shared read, at most ~1 s
