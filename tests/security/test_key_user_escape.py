"""A user's budget escaped through managed keys: a key bound to a user (`user: alice`, whose
spend a `scope: user` budget bounds) minted a key with no user, or another one, or changed
its own, and its requests then counted against no budget of alice's: once her budget was
spent, the new key went on spending. A key's user is kept, as its team is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import simple_config
from tests.security.governed import ROOT, USER, call
from tests.test_cost_support import cost_proxy


async def _spend_until_refused(url: str, token: str) -> None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    try:
        for _ in range(100):
            await client.chat.completions.create(model="m", messages=USER, max_tokens=5)
    except openai.RateLimitError as e:
        assert e.code == "budget_exceeded"
        return
    finally:
        await client.close()
    raise AssertionError("the budget was never spent")


async def test_a_users_key_cannot_mint_or_become_a_key_outside_its_users_budget(
    start_upstream: Any, tmp_path: Path
) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db"), "flush_interval": 0.05},
        # A few small requests spend it.
        "budgets": {"limits": [{"name": "alice", "scope": "user", "match": "alice", "limit_usd": 0.0001}]},
    }
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        keys = proxy.url + "/admin/keys"
        status, alice = await call(s, "POST", keys, ROOT, {"name": "alice", "role": "admin", "user": "alice"})
        assert status == 201, alice
        mine = alice["secret"]
        for user in (None, "alice2", "bob"):
            status, err = await call(s, "POST", keys, mine, {"name": "svc", "role": "service", "user": user})
            assert status == 403, err
            assert err["error"] == {
                "message": "The new key must keep this key's user 'alice'.",
                "type": "permission_error",
                "param": None,
                "code": "permission_denied",
            }
        status, err = await call(s, "PATCH", keys + f"/{alice['id']}", mine, {"user": None})
        assert status == 403, err
        status, child = await call(s, "POST", keys, mine, {"name": "svc", "role": "service", "user": "alice"})
        assert status == 201 and child["user"] == "alice"
        status, err = await call(s, "PATCH", keys + f"/{child['id']}", mine, {"user": "bob"})
        assert status == 403, err
        # Leaving the user out means the maker's own, as a team's key leaves out its team.
        status, unnamed = await call(s, "POST", keys, mine, {"name": "svc2", "role": "service"})
        assert status == 201 and unnamed["user"] == "alice", unnamed
        # The root (no user of its own) still gives any user.
        status, other = await call(s, "POST", keys, ROOT, {"name": "bob", "role": "service", "user": "bob"})
        assert status == 201 and other["user"] == "bob"

        # Alice's budget holds for every key she made: spent, each is refused.
        await _spend_until_refused(proxy.url, mine)
        for token in (mine, child["secret"]):
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0)
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="m", messages=USER, max_tokens=5)
            await client.close()
            assert refused.value.code == "budget_exceeded"
