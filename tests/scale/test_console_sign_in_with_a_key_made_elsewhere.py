"""A managed key made through one instance signs in to another instance's console at once.

Two instances share the keys in PostgreSQL. The API (`/v1/*`, `/admin/*`) read the store
before refusing a well-formed managed key it did not know (a key made elsewhere a moment
ago), but the console's sign-in (`GET /ui/session`) judged the key on the view as it was:
`signed_in: false, reason: invalid_key` until the instance's next poll (here 1 s).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import simple_config
from tests.scale.support import Spawn
from tests.test_cost_support import RedisServer

ADMIN = "tok-admin"


async def _call(url: str, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s,
        s.request(method, url + path, json=body) as r,
    ):
        return r.status, await r.json()


async def test_a_key_made_on_one_instance_signs_in_to_another_s_console_at_once(
    pg_schema_dsn: str, spawn: Spawn, start_upstream: Any, redis_server: RedisServer
) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 1.0}
    cfg["ledger"] = {"backend": "postgres", "dsn": pg_schema_dsn, "flush_interval": 0.1}
    cfg["shared_state"] = {"redis_url": redis_server.url, "prefix": "consoleelsewhere"}  # two servers, one ledger
    one = await spawn(cfg, name="one")
    two = await spawn(cfg, name="two")
    for n, role in enumerate(("viewer", "operator", "admin")):  # made on one, signed in on two with no pause
        status, made = await _call(one.url, "POST", "/admin/keys", ADMIN, {"name": f"console{n}", "role": role})
        assert status == 201, made
        status, session = await _call(two.url, "GET", "/ui/session", made["secret"])
        assert status == 200, session
        assert session["signed_in"] is True, (n, session)
        assert session["key"] == made["id"] and session["role"] == role, session
        assert "GET /admin/config" in session["routes"], session
    # A key nobody made is still refused, and the sign-in still answers 200.
    token = made["secret"]
    at = token.index(".") + 1
    wrong = token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1 :]
    status, session = await _call(two.url, "GET", "/ui/session", wrong)
    assert status == 200 and session == {"reason": "invalid_key", "signed_in": False}, session
