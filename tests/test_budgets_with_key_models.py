"""A budget's downgrade with a managed key held to some models (`models`).

A key's `models` bound what its holder may ask for. A downgrade is the operator's budget
action, not the client's choice: the key asked for a model it may use, so it is served by
the downgrade's model, not refused because that model is not on its list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.test_cost_support import cost_proxy, downgrade_at_half

ROOT = "tok-root-downgrade-0123456789"
MAX_TOKENS = 5
COST = MAX_TOKENS * 2.0 / 1e6  # output-only prices: each request on `smart` costs exactly this


async def test_a_downgrade_serves_a_key_that_may_not_name_the_cheaper_model(
    start_upstream: Any, tmp_path: Path
) -> None:
    big = await start_upstream(reply_words=40, record=True)
    small = await start_upstream(reply_words=40, record=True)
    cfg: dict[str, Any] = {
        "providers": {"big": {"base_url": big.base_url}, "small": {"base_url": small.base_url}},
        "deployments": {
            "d-big": {"provider": "big", "model": "gpt-4o", "price": {"input_per_mtok": 0, "output_per_mtok": 2}},
            "d-small": {
                "provider": "small",
                "model": "gpt-4o-mini",
                "price": {"input_per_mtok": 0, "output_per_mtok": 0.2},
            },
        },
        "models": {"smart": {"deployments": ["d-big"]}, "cheap": {"deployments": ["d-small"]}},
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        "budgets": downgrade_at_half(COST * 4, "cheap"),
    }
    async with cost_proxy(cfg) as proxy:
        async with aiohttp.ClientSession() as s:
            headers = {"Authorization": f"Bearer {ROOT}"}
            body = {"name": "app", "role": "service", "models": ["smart"]}
            async with s.post(proxy.url + "/admin/keys", json=body, headers=headers) as r:
                assert r.status == 201, await r.text()
                secret = (await r.json())["secret"]
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=secret, max_retries=0)
        with pytest.raises(openai.NotFoundError):  # the key's list holds, for what it asks (as an unknown model)
            await client.chat.completions.create(
                model="cheap", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
            )
        routes = []
        for _ in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model="smart", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
            )
            routes.append(raw.headers["x-edgeroute-route"])
        await client.close()
    assert routes == ["smart", "smart", "cheap", "cheap"]
    assert len(small.options.requests) == 2
