"""Revoking a managed key (or its expiry) ends the keys it made, at any depth.

A key made by a managed key spends against its maker's budget and takes from its rate
limits, but lived on alone: whoever held a leaked admin key minted keys with it, and when the
operator revoked the leaked key, the keys it had made went on being served (and, their maker
revoked, could be rotated by nobody but a global admin). Now a key whose maker (or the
maker's maker) is revoked or expired gets the 401 of a revoked or expired key, naming the
maker, and the key views say so (`status`, `ended_by`).
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import openai

from tests.conftest import eventually
from tests.security.governed import ROOT, USER, call


async def _refused(url: str, secret: str) -> openai.AuthenticationError | None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
    try:
        await client.chat.completions.create(model="m", messages=USER, max_tokens=5)
    except openai.AuthenticationError as e:
        return e
    finally:
        await client.close()
    return None


async def test_revoking_a_key_ends_the_keys_it_made(governed: Any) -> None:
    keys = governed.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        status, leaked = await call(s, "POST", keys, ROOT, {"name": "ops-laptop", "role": "admin"})
        assert status == 201
        status, backdoor = await call(s, "POST", keys, leaked["secret"], {"name": "svc", "role": "admin"})
        assert status == 201
        status, deeper = await call(s, "POST", keys, backdoor["secret"], {"name": "svc2", "role": "service"})
        assert status == 201
        assert await _refused(governed.url, deeper["secret"]) is None  # served while its makers are
        status, _ = await call(s, "DELETE", keys + f"/{leaked['id']}", ROOT)
        assert status == 200
        for made in (backdoor, deeper):
            e = await _refused(governed.url, made["secret"])
            assert e is not None and e.status_code == 401, made["name"]
            assert e.code == "key_revoked"
            assert f"was made by key {leaked['id']}, which has been revoked" in e.message
            status, shown = await call(s, "GET", keys + f"/{made['id']}", ROOT)
            assert status == 200 and shown["status"] == "revoked" and shown["ended_by"] == leaked["id"]
        # Nor can the revoked key's keys make more keys.
        status, err = await call(s, "POST", keys, backdoor["secret"], {"name": "svc3", "role": "service"})
        assert status == 401 and err["error"]["code"] == "key_revoked"
        status, listed = await call(s, "GET", keys, ROOT)
        by_id = {k["id"]: k for k in listed["keys"]}
        assert [by_id[k["id"]]["status"] for k in (leaked, backdoor, deeper)] == ["revoked"] * 3


async def test_a_makers_expiry_ends_the_keys_it_made(governed: Any) -> None:
    keys = governed.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        later = time.time() + 7200
        status, lead = await call(s, "POST", keys, ROOT, {"name": "lead", "role": "admin", "expires_at": later})
        assert status == 201
        body = {"name": "svc", "role": "service", "expires_at": later - 60}
        status, made = await call(s, "POST", keys, lead["secret"], body)
        assert status == 201
        # The operator brings the lead's expiry forward: the key it made ends with it.
        status, _ = await call(s, "PATCH", keys + f"/{lead['id']}", ROOT, {"expires_at": time.time() + 1.0})
        assert status == 200

        async def lead_expired() -> bool:
            e = await _refused(governed.url, lead["secret"])
            return e is not None and e.code == "key_expired"

        await eventually(lead_expired, "the lead's key expiring")
        e = await _refused(governed.url, made["secret"])
        assert e is not None and e.status_code == 401 and e.code == "key_expired"
        assert f"was made by key {lead['id']}, which has expired" in e.message
        status, shown = await call(s, "GET", keys + f"/{made['id']}", ROOT)
        assert shown["status"] == "expired" and shown["ended_by"] == lead["id"]


async def test_a_key_from_the_config_is_no_maker(governed: Any) -> None:
    """Keys a config key made have no managed maker: revoking another key leaves them alone."""
    keys = governed.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        status, one = await call(s, "POST", keys, ROOT, {"name": "one", "role": "admin"})
        status2, two = await call(s, "POST", keys, ROOT, {"name": "two", "role": "service"})
        assert status == status2 == 201
        assert (await call(s, "DELETE", keys + f"/{one['id']}", ROOT))[0] == 200
        assert await _refused(governed.url, two["secret"]) is None
        status, shown = await call(s, "GET", keys + f"/{two['id']}", ROOT)
        assert shown["status"] == "active" and "ended_by" not in shown
