"""The console's `/ui/session` judged a key against the config's keys only: a managed key (one
made with `POST /admin/keys`, which every admin route accepts) was "invalid_key", so the console
refused operators whose keys are managed. It now identifies a key as the admin routes do; a
revoked managed key (or a service key) is still refused, and the answer stays a 200."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import simple_config
from tests.test_cost_support import cost_proxy

ROOT = "tok-root-0123456789"


async def _call(
    s: aiohttp.ClientSession, method: str, url: str, token: str | None, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with s.request(method, url, json=body, headers=headers) as r:
        return r.status, await r.json()


async def test_console_managed_keys_sign_in_as_the_admin_routes_judge_them(start_upstream: Any, tmp_path: Any) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db")},
    }
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        keys, session = proxy.url + "/admin/keys", proxy.url + "/ui/session"
        status, viewer = await _call(s, "POST", keys, ROOT, {"name": "dash", "role": "viewer"})
        assert status == 201
        status, service = await _call(s, "POST", keys, ROOT, {"name": "app", "role": "service"})
        assert status == 201
        # The admin routes take the managed viewer key; so does the console.
        assert (await _call(s, "GET", proxy.url + "/admin/audit", viewer["secret"]))[0] == 200
        status, got = await _call(s, "GET", session, viewer["secret"])
        assert status == 200 and got["signed_in"] is True, got
        assert got["role"] == "viewer" and got["key"] == viewer["id"]
        assert "GET /admin/audit" in got["routes"] and "POST /admin/keys" not in got["routes"]
        status, got = await _call(s, "GET", session, service["secret"])
        assert status == 200 and got["signed_in"] is False and got["reason"] == "role"
        assert (await _call(s, "DELETE", keys + f"/{viewer['id']}", ROOT))[0] == 200
        status, got = await _call(s, "GET", session, viewer["secret"])
        assert status == 200 and got == {"reason": "invalid_key", "signed_in": False}
        status, got = await _call(s, "GET", session, ROOT)
        assert status == 200 and got["signed_in"] is True and got["role"] == "admin"
