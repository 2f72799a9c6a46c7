"""`request_log.content_models` with the features that choose a route for the client: an A/B
experiment's variant, a budget's downgrade.

`content_models` is per public model: a model the operator marked `none` (or `redacted`)
keeps its prompts out of the request log whichever route serves it. The setting was looked up
by the serving route alone, so a request to a private model that an experiment or a downgrade
sent to another route was stored in full (the default), its prompt readable by every admin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.test_cost_support import cost_proxy, downgrade_at_half
from tests.test_requestlog import _wait_for

PROMPT = "my diagnosis is confidential"
MAX_TOKENS = 5
COST = MAX_TOKENS * 2.0 / 1e6  # output-only prices: each request on the big deployment costs this


def _config(up_url: str, tmp_path: Path) -> dict[str, Any]:
    price, cheaper = {"input_per_mtok": 0, "output_per_mtok": 2}, {"input_per_mtok": 0, "output_per_mtok": 0.2}
    return {
        "providers": {"p": {"base_url": up_url}},
        "deployments": {
            "d-big": {"provider": "p", "model": "gpt-4o", "price": price},
            "d-small": {"provider": "p", "model": "gpt-4o-mini", "price": cheaper},
        },
        "models": {
            "clinic-a": {"deployments": ["d-big"]},
            "clinic": {"experiment": {"sticky": "user", "variants": [{"route": "clinic-a", "percent": 100}]}},
            "notes": {"deployments": ["d-big"]},
            "cheap": {"deployments": ["d-small"]},
        },
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "request_log": {"log_content": "full", "content_models": {"clinic": "none", "notes": "redacted"}},
    }


async def _stored(url: str, rids: dict[str, str]) -> dict[str, Any]:
    """Each request's stored content mode (None: nothing stored), by what the test calls it."""
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        await _wait_for(s, url + "/admin/requests?limit=20", len(rids))
        for name, rid in rids.items():
            async with s.get(url + f"/admin/requests/{rid}") as r:
                one = await r.json()
            out[name] = (one["route"], one["content"] and one["content"]["mode"])
    return out


async def test_a_private_models_prompts_stay_out_of_the_log_whichever_route_serves_it(
    start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream(reply_words=40)  # every answer as long as its limit
    cfg = _config(up.base_url, tmp_path)
    # `notes` has a budget of 2 x COST, half spent by its first request: the next is downgraded.
    budgets = downgrade_at_half(COST * 2, "cheap")
    budgets["limits"][0].update(scope="model", match="notes")
    cfg["budgets"] = budgets
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        rids = {}
        raw = await client.chat.completions.with_raw_response.create(
            model="clinic", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS
        )
        rids["variant"] = raw.headers["x-request-id"]
        raw = await client.responses.with_raw_response.create(model="clinic", input=PROMPT, max_output_tokens=16)
        rids["responses"] = raw.headers["x-request-id"]
        for name in ("notes", "downgraded"):  # `notes` is downgraded once the budget is half spent
            raw = await client.chat.completions.with_raw_response.create(
                model="notes", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS
            )
            rids[name] = raw.headers["x-request-id"]
        await client.close()
        stored = await _stored(proxy.url, rids)
    assert stored == {
        "variant": ("clinic-a", None),
        "notes": ("notes", "redacted"),
        "downgraded": ("cheap", "redacted"),
        "responses": ("clinic-a", None),
    }
