"""A budget's `notify` webhook may be a reference (`env:`, `file:`, `exec:`), as alert webhooks are.

A Slack incoming webhook's URL is its credential. A budget's `webhook` had to be written
literally, so every stored config version held it as written (views mask it, the store
cannot). A reference is resolved when the event is sent, checked when the config loads, and
shown as the reference in every view.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute.governance import versions
from tests.conftest import start_routes
from tests.test_cost_support import cost_proxy, one_deployment


def _notify_budget(webhook: str) -> dict[str, Any]:
    notify = {"at_percent": 1, "action": "notify", "webhook": webhook}
    return {"limits": [{"name": "day", "scope": "global", "limit_usd": 1.0, "period": "day", "actions": [notify]}]}


async def test_a_budget_webhook_by_file_reference_receives_the_event(start_upstream: Any, tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=204)

    receiver = await start_routes(web.post("/services/T0/B0/secret-part", hook))
    ref = tmp_path / "budget-hook.url"
    ref.write_text(receiver.url + "/services/T0/B0/secret-part\n")
    up = await start_upstream(reply_words=10)
    cfg = one_deployment(up.base_url, budgets=_notify_budget(f"file:{ref}"))
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.02}
    try:
        async with cost_proxy(cfg) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
            await client.close()
            for _ in range(100):  # sent in the background
                if got:
                    break
                await asyncio.sleep(0.05)
    finally:
        await receiver.close()
    assert len(got) == 1
    assert got[0]["event"] == "budget_threshold" and got[0]["budget"] == "day"


def test_a_budget_webhook_reference_that_does_not_resolve_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEROUTE_TEST_NO_SUCH_HOOK", raising=False)
    cfg = one_deployment("http://127.0.0.1:9/v1", budgets=_notify_budget("env:EDGEROUTE_TEST_NO_SUCH_HOOK"))
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse(cfg, "test.yaml")
    assert "budgets.limits[0].actions[0].webhook" in str(e.value)
    assert "EDGEROUTE_TEST_NO_SUCH_HOOK" in str(e.value)


def test_a_reference_that_is_not_a_url_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEROUTE_TEST_HOOK", "not-a-url")
    cfg = one_deployment("http://127.0.0.1:9/v1", budgets=_notify_budget("env:EDGEROUTE_TEST_HOOK"))
    with pytest.raises(config_mod.ConfigError, match=r"webhook.*http://"):
        config_mod.parse(cfg, "test.yaml")


def test_views_show_a_reference_and_mask_a_literal_url() -> None:
    data = {
        "budgets": {
            "limits": [
                {"name": "a", "scope": "global", "limit_usd": 1, "actions": [{"at_percent": 1, "action": "notify",
                                                                             "webhook": "env:BUDGET_HOOK"}]},
                {"name": "b", "scope": "global", "limit_usd": 1, "actions": [{"at_percent": 1, "action": "notify",
                                                                             "webhook": "https://hooks.example/T/B/x"}]},
            ]
        }
    }  # fmt: skip
    shown = versions.mask(data)
    assert shown["budgets"]["limits"][0]["actions"][0]["webhook"] == "env:BUDGET_HOOK"
    assert "hooks.example" not in str(shown)
