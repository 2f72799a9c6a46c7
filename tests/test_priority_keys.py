"""Priority classes on managed keys, end to end through the governance key API and the OpenAI
SDK: a key's own class and the classes it may ask for, checked against the configured classes
(400 naming the field), audited like its other fields, and kept across a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.governance_support import call
from tests.test_governance_keys import ADMIN, _cfg, _proxy

RULES = [{"name": f"{c}-rule", "when": {"priority": c}, "then": {}} for c in ("interactive", "default", "batch")]


async def _rule(url: str, token: str, priority: str | None = None) -> str:
    """The rule that matched: each class has its own, so it tells the request's class."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    headers = {"x-edgeroute-priority": priority} if priority else None
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], extra_headers=headers
    )
    return str(raw.headers["x-edgeroute-rule"])


async def test_a_managed_keys_classes_hold_are_audited_and_survive_a_restart(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    cfg: dict[str, Any] = _cfg(up, rules=RULES)
    cfg["ledger"] = {"backend": "sqlite", "path": str(tmp_path / "ledger.db")}
    async with _proxy(cfg) as url:
        status, key = await call(
            "POST", url + "/admin/keys", ADMIN, json={"priority": "batch", "priorities": ["default"]}
        )
        assert status == 201, key
        assert (key["priority"], key["priorities"]) == ("batch", ["default"])
        token = key["secret"]
        assert await _rule(url, token) == "batch-rule"  # its own class
        assert await _rule(url, token, "default") == "default-rule"  # one it may ask for
        with pytest.raises(openai.PermissionDeniedError, match="priority class 'interactive'"):
            await _rule(url, token, "interactive")
        status, err = await call("PATCH", url + f"/admin/keys/{key['id']}", ADMIN, json={"priorities": ["interactive"]})
        assert status == 200, err
        assert await _rule(url, token, "interactive") == "interactive-rule"
        status, audit = await call("GET", url + "/admin/audit?action=key.updated", ADMIN)
        entry = audit["entries"][0]
        assert (entry["before"]["priorities"], entry["after"]["priorities"]) == (["default"], ["interactive"])
    async with _proxy(cfg) as url:  # a restart on the same database
        status, again = await call("GET", url + f"/admin/keys/{key['id']}", ADMIN)
        assert (again["priority"], again["priorities"]) == ("batch", ["interactive"])
        assert await _rule(url, token) == "batch-rule"
        assert await _rule(url, token, "interactive") == "interactive-rule"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"priority": "gold"}, "priority: unknown priority class 'gold'"),
        ({"priorities": ["batch", "urgent"]}, "priorities[1]: unknown priority class 'urgent'"),
        ({"priority": 3}, "priority"),
        ({"priorities": "batch"}, "priorities"),
    ],
)
async def test_a_class_no_config_defines_is_refused_naming_the_field(
    start_upstream, fields: dict[str, Any], needle: str
) -> None:
    up = await start_upstream()
    async with _proxy(_cfg(up)) as url:
        status, err = await call("POST", url + "/admin/keys", ADMIN, json=fields)
        assert status == 400 and err["error"]["code"] == "invalid_key", err
        assert needle in err["error"]["message"]
        status, key = await call("POST", url + "/admin/keys", ADMIN, json={})
        status, err = await call("PATCH", url + f"/admin/keys/{key['id']}", ADMIN, json=fields)
        assert status == 400 and needle in err["error"]["message"], err
