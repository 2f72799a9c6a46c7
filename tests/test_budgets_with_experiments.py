"""A budget's downgrade of a request that an A/B experiment first assigned to a variant.

The downgraded request is served by the budget's model, not by the variant: its record in
the request log (what `/admin/requests` and the stats by variant read) must say so, not
carry the first decision's variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.test_cost_support import cost_proxy, downgrade_at_half
from tests.test_requestlog import _wait_for

MAX_TOKENS = 5
COST = MAX_TOKENS * 2.0 / 1e6  # output-only prices: each request on the variant costs exactly this


async def test_a_downgraded_request_is_logged_without_the_variant_it_left(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(reply_words=40)
    price, cheaper = {"input_per_mtok": 0, "output_per_mtok": 2}, {"input_per_mtok": 0, "output_per_mtok": 0.2}
    cfg: dict[str, Any] = {
        "providers": {"p": {"base_url": up.base_url}},
        "deployments": {
            "d-big": {"provider": "p", "model": "gpt-4o", "price": price},
            "d-small": {"provider": "p", "model": "gpt-4o-mini", "price": cheaper},
        },
        "models": {
            "smart-a": {"deployments": ["d-big"]},
            "smart": {"experiment": {"sticky": "user", "variants": [{"route": "smart-a", "percent": 100}]}},
            "cheap": {"deployments": ["d-small"]},
        },
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": downgrade_at_half(COST * 4, "cheap"),
    }
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        served = {}
        for n in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model="smart", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, user=f"u{n}"
            )
            served[raw.headers["x-request-id"]] = raw.headers["x-edgeroute-route"]
        await client.close()
        assert sorted(served.values()) == ["cheap", "cheap", "smart-a", "smart-a"]
        logged = {}
        async with aiohttp.ClientSession() as s:
            await _wait_for(s, proxy.url + "/admin/requests?limit=10", 4)
            for rid in served:
                async with s.get(proxy.url + f"/admin/requests/{rid}") as r:
                    one = await r.json()
                logged[rid] = (one["route"], one["variant"])
    assert logged == {rid: (route, "smart-a" if route == "smart-a" else None) for rid, route in served.items()}
