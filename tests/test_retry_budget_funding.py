"""What funds the retry budget (`retry_budget.ratio`): requests sent upstream, not decisions.
Every decision funded it, a request refused at admission or answered from the cache too, so a
burst of refused or cached requests bought retries that then hammered a failing upstream (the
hedge budget had the same flaw: tests/test_hedge_budget_funding.py)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import yaml

from edgeroute import config as config_mod
from edgeroute.reload import apply_config
from tests.conftest import simple_config
from tests.test_hedge_budget_funding import free_decisions

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
RATIO = 0.1


@pytest.mark.parametrize("free", ["refused", "cache_hits"])
async def test_refusals_and_cache_hits_fund_no_retries(free: str, start_upstream: Any, start_proxy: Any) -> None:
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up}, rate_limits={"models": {"m": {"rpm": 100_000, "tpm": 9_000}}})
    cfg["models"]["m"] |= {"max_attempts": 3, "cache": {"ttl": 60}}
    cfg["retry_budget"] = {"ratio": RATIO, "min_per_sec": 0, "ttl_ms": 60_000}
    cfg["retry"] = {"base_ms": 0, "max_ms": 0}
    cfg["health"] = {"consecutive_failures": 1000, "min_requests": 1000, "failure_rate": 1}  # never ejected
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    await free_decisions(free, proxy, client)
    # The upstream fails: 20 requests, each its own prompt (no cache hit), may retry only on
    # what they themselves fund.
    up.options.fail_status = 503
    up.options.requests.clear()
    for i in range(20):
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(**BODY | {"messages": [{"role": "user", "content": f"q {i}"}]})
        assert e.value.status_code == 502
    sent = len(up.options.requests)
    # 20 first attempts and 10 % of them as retries (one more: the cached answer's own request).
    assert sent <= 20 + int(21 * RATIO), f"{sent} upstream calls for 20 requests at a {RATIO:.0%} retry budget"


async def test_a_reload_applies_a_new_retry_budget(start_upstream: Any, start_proxy: Any) -> None:
    """A reload's `retry_budget` was accepted and never applied (the budget was kept whole over
    a reload, its settings too): an operator who tightened retries during an outage changed
    nothing, without a word, until a restart."""
    up = await start_upstream(record=True, fail_status=503)
    cfg = simple_config({"a": up}, retry_budget={"ratio": 1, "min_per_sec": 100})
    cfg["models"]["m"]["max_attempts"] = 3
    cfg["retry"] = {"base_ms": 0, "max_ms": 0}
    cfg["health"] = {"consecutive_failures": 1000, "min_requests": 1000, "failure_rate": 1}  # never ejected
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    async def calls_for_five() -> int:
        up.options.requests.clear()
        for i in range(5):
            with pytest.raises(openai.APIStatusError):
                await client.chat.completions.create(**BODY | {"messages": [{"role": "user", "content": f"r {i}"}]})
        return len(up.options.requests)

    assert await calls_for_five() == 15  # each retried twice
    cfg["retry_budget"] = {"ratio": 0, "min_per_sec": 0}  # no retries at all
    text = yaml.safe_dump(cfg)
    await apply_config(proxy.app, config_mod.loads(text, "test.yaml"), text, "api", None)
    assert await calls_for_five() == 5


async def test_a_busy_healthy_route_funds_no_retries_of_a_quiet_failing_one(
    start_upstream: Any, start_proxy: Any
) -> None:
    """One retry budget for every route: model `a`'s healthy traffic funded a retry of every
    request of model `b`, whose provider was down (each of its requests sent three times, the
    retry storm the budget exists to prevent). Each route now retries on its own requests."""
    up_a = await start_upstream(record=True)
    up_b = await start_upstream(record=True, fail_status=503)
    cfg = simple_config({"a": up_a, "b": up_b})
    cfg["models"] = {
        "a": {"deployments": ["d-a"], "max_attempts": 3},
        "b": {"deployments": ["d-b"], "max_attempts": 3},
    }
    cfg["retry_budget"] = {"ratio": RATIO, "min_per_sec": 0, "ttl_ms": 60_000}
    cfg["retry"] = {"base_ms": 0, "max_ms": 0}
    cfg["health"] = {"consecutive_failures": 1000, "min_requests": 1000, "failure_rate": 1}  # never ejected
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for i in range(100):  # the busy route: served, first try
        await client.chat.completions.create(
            **BODY | {"model": "a", "messages": [{"role": "user", "content": f"a {i}"}]}
        )
    for i in range(20):
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(
                **BODY | {"model": "b", "messages": [{"role": "user", "content": f"b {i}"}]}
            )
        assert e.value.status_code == 502
    sent = len(up_b.options.requests)
    assert sent <= 20 + int(20 * RATIO), f"{sent} upstream calls for 20 requests of `b` at a {RATIO:.0%} retry budget"
    # The busy route's own budget is whole: its failures retry on what it funded.
    up_a.options.fail_status = 503
    up_a.options.requests.clear()
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(**BODY | {"model": "a"})
    assert len(up_a.options.requests) == 3
