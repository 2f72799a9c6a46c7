"""`/admin/budgets` shows the running config's budgets as soon as a reload swaps it in. The
admission applied a new generation's budgets at its next request, and the view read what the
admission held: after a reload that lowered a team's budget from $10 to $3 and added a global
one, it showed $7 left of $10 (and no new budget) while the next request was refused."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import yaml

from edgeroute import config as config_mod
from edgeroute.reload import apply_config
from tests.conftest import eventually, simple_config


def _budgets(team_limit: float, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    te = {"name": "te-budget", "scope": "team", "match": "te", "limit_usd": team_limit, "period": "day",
          "actions": [{"at_percent": 100, "action": "block"}]}  # fmt: skip
    return {"limits": [*(extra or []), te]}


ROOT = "root-secret-0123456789"


async def _view(url: str) -> dict[str, float]:
    auth = {"Authorization": f"Bearer {ROOT}"}
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/budgets", headers=auth) as r:
        assert r.status == 200
        return {b["name"]: b["limit_usd"] for b in (await r.json())["budgets"]}


async def test_the_budgets_view_follows_a_reload_before_any_request(start_upstream: Any, start_proxy: Any) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}, "e": {"token": "keye-secret-0123456789", "team": "te"}}
    cfg["budgets"] = _budgets(10.0)
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="keye-secret-0123456789", max_retries=0)
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert await _view(proxy.url) == {"te-budget": 10.0}

    new = {"name": "new-budget", "scope": "global", "limit_usd": 50.0, "period": "day", "actions": []}
    cfg["budgets"] = _budgets(3.0, [new])
    text = yaml.safe_dump(cfg)
    await apply_config(proxy.app, config_mod.loads(text, "test.yaml"), text, "api", None)

    async def shown() -> bool:
        return await _view(proxy.url) == {"new-budget": 50.0, "te-budget": 3.0}

    # No request since the reload: the view alone must take the new generation.
    await eventually(shown, "the reloaded budgets in /admin/budgets", within=3)
