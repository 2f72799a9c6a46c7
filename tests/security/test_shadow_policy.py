"""Policy bypass through shadow traffic: the mirror of a request was decided without its tags.

A shadow request is decided for the client's key as the primary is (team, role, residency),
but without the request's `x-edgeroute-tags`: a rule on a tag (`confidential` kept to the
private deployments) held for the answer and not for its mirror, which went to the
candidate's public deployment. The mirror is now decided with the request's tags.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]


async def test_a_tagged_request_is_mirrored_only_where_its_tag_may_go(start_mock: Any, start_proxy: Any) -> None:
    public = await start_mock("openai", record=True)
    private = await start_mock("openai", record=True)
    cfg = provider_config({"pub": public, "priv": private})
    cfg["deployments"]["d-priv"]["tags"] = ["privacy:high"]
    cfg["deployments"]["d-priv"]["price"] = {"input_per_mtok": 10.0, "output_per_mtok": 20.0}
    cfg["models"] = {
        "m": {"deployments": ["d-priv"], "shadow": {"model": "cand", "percent": 100}},
        "cand": {"deployments": ["d-pub", "d-priv"], "strategy": "lowest_cost"},
    }
    cfg["rules"] = [
        {"name": "confidential", "when": {"tags": ["confidential"]}, "then": {"require_tags": ["privacy:high"]}}
    ]
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    msgs: Any = [{"role": "user", "content": "the merger terms"}]
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=msgs, extra_headers={"x-edgeroute-tags": "confidential"}
    )
    assert raw.headers["x-edgeroute-deployment"] == "d-priv"
    for _ in range(200):  # the mirror runs in the background
        shadows = [r for r in proxy.recorder.records if r.outcome == "shadow"]
        if shadows:
            break
        await asyncio.sleep(0.02)
    (mirror,) = shadows
    assert mirror.deployment == "d-priv", mirror
    assert not public.options.requests, "the mirror of a confidential request went to the public deployment"
    # Untagged, the candidate's cheaper public deployment takes the mirror: the shadow is on.
    await client.chat.completions.create(model="m", messages=msgs)
    for _ in range(200):
        if public.options.requests:
            break
        await asyncio.sleep(0.02)
    assert len(public.options.requests) == 1
