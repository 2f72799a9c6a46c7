"""Prompt caching is priced: cache reads at the cached-input price, cache writes at the
cache-write price, through the proxy from providers that report them."""

from __future__ import annotations

import anthropic
import openai
import pytest

from edgeroute.accounting import Usage, cost_of
from edgeroute.config import Price
from edgeroute.config.prices import catalogue_entry
from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

PRICE = {"input_per_mtok": 3.0, "cached_input_per_mtok": 0.3, "cache_write_per_mtok": 3.75, "output_per_mtok": 15.0}


def test_cost_of_prices_each_kind_of_prompt_token() -> None:
    p = Price(**PRICE)
    u = Usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=600, cache_write_tokens=300)
    assert cost_of(p, u) == pytest.approx((100 * 3.0 + 600 * 0.3 + 300 * 3.75 + 100 * 15.0) / 1e6)
    # Without a cache-write price, writes cost the input price.
    plain = Price(input_per_mtok=3.0, output_per_mtok=15.0)
    assert cost_of(plain, u) == pytest.approx((1000 * 3.0 + 100 * 15.0) / 1e6)


def test_usage_reads_cache_writes_and_refuses_nonsense() -> None:
    u = Usage.from_openai(
        {
            "prompt_tokens": 10,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 50},
        }
    )
    assert u is not None and (u.cached_tokens, u.cache_write_tokens) == (4, 6)  # clamped to what is left
    bad = Usage.from_openai({"prompt_tokens": 10, "cache_creation_input_tokens": "x"})
    assert bad is not None and bad.cache_write_tokens == 0


def test_catalogue_has_cache_write_prices_for_anthropic() -> None:
    e = catalogue_entry("claude-sonnet-4-20250514")
    assert e["cache_write_per_mtok"] == pytest.approx(1.25 * e["input_per_mtok"])


@pytest.mark.parametrize("kind", ["anthropic", "bedrock"])
async def test_cache_reads_and_writes_priced_end_to_end(start_mock, start_proxy, kind) -> None:
    up = await start_mock(kind, cached_tokens=3, cache_write_tokens=4)
    cfg = provider_config({"c": up})
    cfg["deployments"]["d-c"]["price"] = PRICE
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "Say hello to the cache please"}]
    )
    r = raw.parse()
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 3
    assert r.usage.prompt_tokens_details.cache_write_tokens == 4
    fresh = r.usage.prompt_tokens - 3 - 4
    want = (fresh * 3.0 + 3 * 0.3 + 4 * 3.75 + r.usage.completion_tokens * 15.0) / 1e6
    assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(want)
    rec = proxy.recorder.records[-1]
    assert rec.cost_usd == pytest.approx(want) and rec.usage is not None and rec.usage.cache_write_tokens == 4


async def test_anthropic_clients_see_the_cache_counts(start_mock, start_proxy) -> None:
    up = await start_mock("anthropic", cached_tokens=2, cache_write_tokens=5)
    proxy = await start_proxy(provider_config({"c": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x")
    msg = await client.messages.create(
        model="m", max_tokens=50, messages=[{"role": "user", "content": "Say hello to the cache please"}]
    )
    assert msg.usage.cache_read_input_tokens == 2 and msg.usage.cache_creation_input_tokens == 5
    assert msg.usage.input_tokens > 0
