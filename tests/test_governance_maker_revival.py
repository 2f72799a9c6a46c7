"""Re-extending an expired key that made keys does not bring back the keys it made.

A maker's expiry ends every key below it. Giving the maker a later `expires_at` made them all
live again, silently, and the team's cap (`governance.max_keys_per_team`) counted the maker alone:
a team at its cap revived a maker with two children and held four live keys. The keys it made
keep the end they had: each records it in its own `expires_at` in the same write (the answer
counts them, `kept_ended`), and is brought back on its own, each counted against the cap.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import eventually
from tests.governance_support import call
from tests.test_governance_key_cap_races import ADMIN, _cfg, _proxy


async def _status(url: str, key_id: str) -> dict[str, Any]:
    status, body = await call("GET", url + f"/admin/keys/{key_id}", ADMIN)
    assert status == 200, body
    return body


async def test_a_maker_given_a_later_expiry_does_not_revive_the_keys_it_made(
    start_upstream: Any, tmp_path: Path
) -> None:
    cfg = _cfg(await start_upstream(), {"path": str(tmp_path / "gov.db")})
    cfg["governance"]["key_poll_interval"] = 0.1
    async with _proxy(cfg) as url:
        status, maker = await call("POST", url + "/admin/keys", ADMIN, json={"team": "t1", "role": "admin"})
        assert status == 201, maker
        children = []
        for _ in range(2):  # made while the maker had no expiry: neither has one of its own
            status, child = await call("POST", url + "/admin/keys", maker["secret"], json={})
            assert status == 201, child
            children.append(child)
        status, body = await call(
            "PATCH", url + f"/admin/keys/{maker['id']}", ADMIN, json={"expires_at": time.time() + 1}
        )
        assert status == 200, body

        async def ended() -> bool:
            return all([(await _status(url, c["id"]))["status"] == "expired" for c in children])

        await eventually(ended, "the maker's keys ended with it")
        # The team is at its cap of 3 live keys again with the maker and its keys ended.
        others: list[str] = []

        async def made() -> bool:  # 409 until this instance's poll has seen them expire
            status, body = await call("POST", url + "/admin/keys", ADMIN, json={"team": "t1"})
            if status == 201:
                others.append(body["id"])
            return len(others) == 2

        await eventually(made, "two keys made in their place")
        status, body = await call(
            "PATCH", url + f"/admin/keys/{maker['id']}", ADMIN, json={"expires_at": time.time() + 3600}
        )
        assert status == 200, body
        assert body["status"] == "active", body
        answer = body
        for child in children:
            shown = await _status(url, child["id"])
            assert shown["status"] == "expired" and shown["expires_at"] is not None, shown
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=child["secret"], max_retries=0)
            with pytest.raises(openai.AuthenticationError) as refused:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert refused.value.code == "key_expired", refused.value.body
        assert answer["kept_ended"] == 2, answer
        status, _ = await call("GET", url + "/admin/keys", maker["secret"])
        assert status == 200  # the maker itself works again
        # Bringing a child back is a key made live: the team holds 3 live keys, so a 409.
        later = {"expires_at": time.time() + 3600}
        status, body = await call("PATCH", url + f"/admin/keys/{children[0]['id']}", ADMIN, json=later)
        assert status == 409 and body["error"]["code"] == "key_limit_reached", body
        status, body = await call("GET", url + "/admin/keys", ADMIN)
        assert sum(1 for k in body["keys"] if k.get("team") == "t1" and k["status"] == "active") == 3, body
        # Room made (another key revoked), the child comes back on its own.
        assert (await call("DELETE", url + f"/admin/keys/{others[0]}", ADMIN))[0] == 200
        status, body = await call("PATCH", url + f"/admin/keys/{children[0]['id']}", ADMIN, json=later)
        assert status == 200 and body["status"] == "active", body
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=children[0]["secret"], max_retries=0)
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
