"""Scope escape through managed keys: an admin key that may not send a request tag, or that
belongs to a team, must not mint (or edit) a key free of that tag or charged to another team
(or to none): the new key would send what its maker may not, or spend outside its team's
budget (into another team's, which it could exhaust)."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import simple_config
from tests.security.governed import ROOT, USER, call
from tests.test_cost_support import cost_proxy


async def test_key_scope_escape_denied_tags_are_inherited(governed: Any) -> None:
    keys = governed.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        status, limited = await call(s, "POST", keys, ROOT, {"name": "ops", "role": "admin", "deny_tags": ["pii"]})
        assert status == 201
        mine = limited["secret"]
        for deny in ([], ["other"]):
            status, err = await call(s, "POST", keys, mine, {"name": "svc", "role": "service", "deny_tags": deny})
            assert status == 403, err
            assert err["error"]["message"] == "The new key's deny_tags must include this key's (pii)."
        status, child = await call(s, "POST", keys, mine, {"name": "svc", "role": "service", "deny_tags": ["pii", "x"]})
        assert status == 201
        status, err = await call(s, "PATCH", keys + f"/{child['id']}", mine, {"deny_tags": []})
        assert status == 403, err
    # The child is held as its maker is: the tag is refused to it.
    client = openai.AsyncOpenAI(base_url=governed.url + "/v1", api_key=child["secret"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.chat.completions.create(model="m", messages=USER, extra_headers={"x-edgeroute-tags": "pii"})
    assert "may not use the tag 'pii'" in str(refused.value)
    await client.close()


async def test_key_scope_escape_team_is_kept(governed: Any) -> None:
    keys = governed.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        status, lead = await call(s, "POST", keys, ROOT, {"name": "team-a-admin", "role": "admin", "team": "a"})
        assert status == 201
        mine = lead["secret"]
        for team in ("b", None):
            status, err = await call(s, "POST", keys, mine, {"name": "svc", "role": "service", "team": team})
            assert status == 403, err
            assert err["error"]["message"] == "The new key must keep this key's team 'a'."
        status, child = await call(s, "POST", keys, mine, {"name": "svc", "role": "service", "team": "a"})
        assert status == 201 and child["team"] == "a"
        status, err = await call(s, "PATCH", keys + f"/{child['id']}", mine, {"team": "b"})
        assert status == 403, err
        status, shown = await call(s, "GET", keys + f"/{child['id']}", ROOT)
        assert status == 200 and shown["team"] == "a"
        # A key without a team (the root here) still assigns any.
        status, other = await call(s, "POST", keys, ROOT, {"name": "svc-b", "role": "service", "team": "b"})
        assert status == 201 and other["team"] == "b"


async def test_key_scope_escape_priority_classes_are_inherited(start_upstream: Any, tmp_path: Any) -> None:
    """A managed key cannot mint a key with a priority class it may not use itself (the class
    reaches capacity held back for it)."""
    cfg = simple_config({"a": await start_upstream()})
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db")},
        "priority": {"classes": ["interactive", "default", "batch"]},
    }
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        keys = proxy.url + "/admin/keys"
        status, ops = await call(s, "POST", keys, ROOT, {"name": "ops", "role": "admin", "priority": "batch"})
        assert status == 201  # the operator's own key (from the config) may give any class
        mine = ops["secret"]
        for fields in ({"priority": "interactive"}, {"priority": "batch", "priorities": ["interactive"]}):
            status, err = await call(s, "POST", keys, mine, {"name": "svc", "role": "service", **fields})
            assert status == 403, err
            assert err["error"]["message"] == "The new key's priority classes must be among this key's (batch)."
        status, child = await call(s, "POST", keys, mine, {"name": "svc", "role": "service", "priority": "batch"})
        assert status == 201
        status, err = await call(s, "PATCH", keys + f"/{child['id']}", mine, {"priorities": ["interactive"]})
        assert status == 403, err


async def test_key_scope_escape_a_key_outlives_no_expiry_of_its_maker(governed: Any) -> None:
    """A key given for a while (`--expires 1d`: a contractor, a demo) minted a key that never
    expires, or extended its own expiry, and so kept its access after it expired."""
    keys = governed.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        soon = time.time() + 3600
        status, temp = await call(s, "POST", keys, ROOT, {"name": "contractor", "role": "admin", "expires_at": soon})
        assert status == 201
        mine = temp["secret"]
        for expires in (None, soon + 86400):
            status, err = await call(s, "POST", keys, mine, {"name": "svc", "role": "service", "expires_at": expires})
            assert status == 403, err
            assert err["error"]["code"] == "permission_denied"
            assert err["error"]["message"].startswith("The new key's expires_at must be set and at most this key's (")
        status, err = await call(s, "PATCH", keys + f"/{temp['id']}", mine, {"expires_at": None})
        assert status == 403, err
        status, child = await call(s, "POST", keys, mine, {"name": "svc", "role": "service", "expires_at": soon - 60})
        assert status == 201, child
        status, err = await call(s, "PATCH", keys + f"/{child['id']}", mine, {"expires_at": soon + 60})
        assert status == 403, err
        # A key from the config (the operator's) gives any expiry, and may take it away.
        status, shown = await call(s, "PATCH", keys + f"/{child['id']}", ROOT, {"expires_at": None})
        assert status == 200 and shown["expires_at"] is None
    client = openai.AsyncOpenAI(base_url=governed.url + "/v1", api_key=child["secret"], max_retries=0)
    await client.chat.completions.create(model="m", messages=USER, max_tokens=5)
    await client.close()
