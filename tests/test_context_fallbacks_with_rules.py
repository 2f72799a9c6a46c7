"""Context-window fallbacks with rules that keep some requests to some deployments.

A prompt too long for every deployment of its route goes to the first of the route's
`context_window_fallbacks` with a deployment it fits, chosen before the matched rule's
constraints are applied: when that fallback has no deployment the rule allows, the request
is refused (503) though a later fallback fits it and is allowed.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import simple_config


@pytest.mark.xfail(
    strict=True,
    reason="rust/edgeroute-core/src/router.rs (being split by another helper): `resolve_route` "
    "takes the first `context_window_fallbacks` route with a member that `fits`, whatever the "
    "matched rule's action allows. Fix there: require a member that fits and that `action` does "
    "not bar (`barred(a, spec).is_none()`), as `apply_policy`'s `allowed` does.",
)
async def test_a_long_prompt_goes_to_the_context_fallback_the_rule_allows(
    start_upstream: Any, start_proxy: Any
) -> None:
    small, big, big_private = await start_upstream(), await start_upstream(), await start_upstream(record=True)
    cfg = simple_config({"small": small, "big": big, "private": big_private})
    cfg["deployments"]["d-small"] |= {"context_window": 100, "tags": ["privacy:high"]}
    cfg["deployments"]["d-big"] |= {"context_window": 100_000}
    cfg["deployments"]["d-private"] |= {"context_window": 100_000, "tags": ["privacy:high"]}
    cfg["models"] = {
        "m": {"deployments": ["d-small"], "context_window_fallbacks": ["big", "big-private"]},
        "big": {"deployments": ["d-big"]},
        "big-private": {"deployments": ["d-private"]},
    }
    cfg["rules"] = [{"name": "secret", "when": {"tags": ["secret"]}, "then": {"require_tags": ["privacy:high"]}}]
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m",
        messages=[{"role": "user", "content": "hello world " * 200}],
        extra_headers={"x-edgeroute-tags": "secret"},
    )
    assert raw.headers["x-edgeroute-deployment"] == "d-private"
    assert len(big_private.options.requests) == 1
    await client.close()
