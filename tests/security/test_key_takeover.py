"""Privilege escalation through managed keys: an admin key held to a budget, a rate limit and
one model must not take over a broader key by rotating it (a rotation answers with the new
secret), nor revoke it; within its scope it still rotates and revokes keys."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai

from tests.conftest import simple_config
from tests.test_cost_support import cost_proxy

ROOT = "tok-root-0123456789"


async def _call(s: aiohttp.ClientSession, method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    async with s.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


async def test_a_limited_admin_key_cannot_take_over_a_broader_key(start_upstream: Any, tmp_path: Any) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg["models"]["other"] = {"deployments": ["d-a"]}
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db")},
    }
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        keys = proxy.url + "/admin/keys"
        status, limited = await _call(
            s, "POST", keys, ROOT, {"name": "team-admin", "role": "admin", "budget_usd": 10, "rpm": 5, "models": ["m"]}
        )
        assert status == 201
        status, broad = await _call(s, "POST", keys, ROOT, {"name": "org-admin", "role": "admin"})
        assert status == 201
        mine = limited["secret"]
        for method, path in (("POST", f"/{broad['id']}/rotate"), ("DELETE", f"/{broad['id']}")):
            status, err = await _call(s, method, keys + path, mine, {} if method == "POST" else None)
            assert status == 403, err
            assert "could not have created" in err["error"]["message"] and "secret" not in err
        # The broad key is untouched: its secret still works on a model the limited key cannot use.
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=broad["secret"], max_retries=0)
        await client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
        await client.close()
        status, shown = await _call(s, "GET", keys + f"/{broad['id']}", ROOT)
        assert status == 200 and shown["status"] == "active" and shown["rotated_at"] is None
        # Within its scope the limited key still manages keys: one it made, and itself.
        status, child = await _call(
            s, "POST", keys, mine, {"name": "svc", "role": "service", "budget_usd": 5, "rpm": 5, "models": ["m"]}
        )
        assert status == 201
        status, rotated = await _call(s, "POST", keys + f"/{child['id']}/rotate", mine, {})
        assert status == 200 and rotated["secret"] != child["secret"]
        assert (await _call(s, "DELETE", keys + f"/{child['id']}", mine))[0] == 200
        status, own = await _call(s, "POST", keys + f"/{limited['id']}/rotate", mine, {"grace_seconds": 60})
        assert status == 200 and own["secret"]
        # The root (a config key, no limits) still rotates anything.
        assert (await _call(s, "POST", keys + f"/{broad['id']}/rotate", ROOT, {}))[0] == 200
