"""A rule on `users` sees the caller's key's user, never the body's `user` a keyed client
chose: team A's key without a user must not take a route (or class) kept for team B's bob,
through the OpenAI `user` field or Anthropic's `metadata.user_id`. A keyless caller (a
sidecar's app, no keys configured) still routes by the body's user."""

from __future__ import annotations

from typing import Any

import anthropic
import openai

from tests.conftest import simple_config
from tests.governance_support import call
from tests.test_governance_keys import ADMIN, _cfg, _proxy

RULE = {"name": "bob-gets-premium", "when": {"users": ["bob"]}, "then": {"route": "bobs"}}


def _with_bobs_route(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg["models"]["bobs"] = {"deployments": ["d-b"]}
    cfg["models"]["m"]["deployments"] = ["d-a"]
    cfg["rules"] = [RULE]
    return cfg


async def _openai(url: str, token: str, user: str | None) -> tuple[str, str | None]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], extra_body={"user": user} if user else None
    )
    await client.close()
    return raw.headers["x-edgeroute-deployment"], raw.headers.get("x-edgeroute-rule")


async def _anthropic(url: str, token: str, user: str) -> tuple[str, str | None]:
    client = anthropic.AsyncAnthropic(base_url=url, api_key=token, max_retries=0)
    raw = await client.messages.with_raw_response.create(
        model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}], metadata={"user_id": user}
    )
    await client.close()
    return raw.headers["x-edgeroute-deployment"], raw.headers.get("x-edgeroute-rule")


async def test_a_key_without_a_user_cannot_claim_another_users_rule(start_upstream: Any) -> None:
    a, b = await start_upstream(), await start_upstream()
    cfg = _with_bobs_route(_cfg(a))
    both = simple_config({"a": a, "b": b})
    cfg["providers"], cfg["deployments"] = both["providers"], both["deployments"]
    async with _proxy(cfg) as url:
        _, team_a = await call("POST", url + "/admin/keys", ADMIN, json={"team": "a"})
        _, bob = await call("POST", url + "/admin/keys", ADMIN, json={"team": "b", "user": "bob"})
        assert await _openai(url, team_a["secret"], "bob") == ("d-a", None)
        assert await _anthropic(url, team_a["secret"], "bob") == ("d-a", None)
        assert await _openai(url, bob["secret"], None) == ("d-b", "bob-gets-premium")
        assert await _openai(url, ADMIN, "bob") == ("d-a", None)  # a config key without a user too


async def test_a_keyless_caller_routes_by_the_bodys_user(start_upstream: Any) -> None:
    a, b = await start_upstream(), await start_upstream()
    cfg = _with_bobs_route(simple_config({"a": a, "b": b}))
    async with _proxy(cfg) as url:
        assert await _openai(url, "x", "bob") == ("d-b", "bob-gets-premium")
        assert await _openai(url, "x", "alice") == ("d-a", None)
