"""A deployment's provider limit (`rate_limits.deployments`) with retries, fallbacks and hedges.

Admission takes the limit of the decision's first deployment, for its first attempt. Every
other attempt went out uncounted: a hedge or a failover to a deployment held to 2 requests a
minute sent it every request (6 of 6), past the limit the operator set to stay under the
provider's. Each such attempt now takes its deployment's limit before it is sent; at the
limit, the deployment is passed over (no hedge is sent; a failover goes elsewhere or fails).
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.conftest import eventually, simple_config


@pytest.mark.parametrize("how", ["hedge", "failover"])
async def test_a_deployment_limit_holds_for_hedges_and_failovers(
    start_upstream: Any, start_proxy: Any, how: str
) -> None:
    if how == "hedge":
        first = await start_upstream(latency_ms=400, record=True)  # slow: every request is hedged
    else:
        first = await start_upstream(fail_status=500, record=True)  # down: every request fails over
    limited = await start_upstream(record=True)
    cfg = simple_config({"a": first, "b": limited})
    cfg["deployments"]["d-a"]["weight"] = 1000  # d-a first in every decision
    if how == "hedge":
        cfg["models"]["m"]["hedge"] = {"delay_ms": 50, "budget_percent": 100}
    cfg["health"] = {"consecutive_failures": 1000, "min_requests": 1000, "failure_rate": 1}  # d-a stays first
    cfg["rate_limits"] = {"deployments": {"d-b": {"rpm": 2}}}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    statuses = []
    for _ in range(6):
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            statuses.append(200)
        except openai.APIStatusError as e:
            statuses.append(e.status_code)
    await client.close()
    assert len(limited.options.requests) == 2, f"d-b (2 a minute) was sent {len(limited.options.requests)}"
    if how == "hedge":
        assert statuses == [200] * 6  # the others wait for d-a
    else:
        assert statuses == [200, 200, 502, 502, 502, 502]  # d-a failed them; d-b had no room
        assert {a.deployment for a in proxy.recorder.records[-1].attempts} == {"d-a"}


async def test_shadow_mirrors_keep_to_a_deployments_limit(start_upstream: Any, start_proxy: Any) -> None:
    """No client limit counts a mirror, but its deployment's provider limit does: mirrors of
    every request took the deployment's provider quota from its own traffic, uncounted."""
    primary = await start_upstream(record=True)
    candidate = await start_upstream(record=True)
    cfg = simple_config({"a": primary, "s": candidate})
    cfg["models"] = {
        "m": {"deployments": ["d-a"], "shadow": {"model": "s", "percent": 100}},
        "s": {"deployments": ["d-s"]},
    }
    cfg["rate_limits"] = {"deployments": {"d-s": {"rpm": 2}}}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(5):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    await client.close()

    async def mirrors_done() -> bool:
        return sum(1 for r in proxy.recorder.records if r.outcome == "shadow") == 5

    await eventually(mirrors_done, "five mirrors recorded (sent or passed over)")
    assert len(primary.options.requests) == 5
    assert len(candidate.options.requests) == 2, f"d-s (2 a minute) was sent {len(candidate.options.requests)}"


async def test_shadow_mirrors_without_max_tokens_keep_to_a_deployments_tpm(
    start_upstream: Any, start_proxy: Any
) -> None:
    """A mirror naming no output bound takes its output from a deployment's TPM as a client's
    request does (as much as the bucket holds, given back at its end): mirrors sent together
    took their prompts alone, and their answers passed the candidate's TPM by their output."""
    primary = await start_upstream(record=True, latency_ms=300)
    candidate = await start_upstream(record=True, latency_ms=300)
    cfg = simple_config({"a": primary, "s": candidate})
    cfg["models"] = {
        "m": {"deployments": ["d-a"], "shadow": {"model": "s", "percent": 100}},
        "s": {"deployments": ["d-s"]},
    }
    cfg["rate_limits"] = {"deployments": {"d-s": {"tpm": 2000}}}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    ask = [{"role": "user", "content": "hi"}]
    await asyncio.gather(*(client.chat.completions.create(model="m", messages=ask) for _ in range(5)))
    await client.close()

    async def mirrors_done() -> bool:
        return sum(1 for r in proxy.recorder.records if r.outcome == "shadow") == 5

    await eventually(mirrors_done, "five mirrors recorded (sent or passed over)")
    assert len(primary.options.requests) == 5
    # The first mirror took what the bucket held beyond its prompt (up to the 4,096 reserved):
    # the four beside it found it drained.
    assert len(candidate.options.requests) == 1, f"d-s was sent {len(candidate.options.requests)}"
