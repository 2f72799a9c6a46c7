"""The response cache with a deployment's provider rate limit (`rate_limits.deployments`).

A provider limit bounds what the provider sees. A cache hit never reaches it: hits must
neither spend the deployment's requests nor make the proxy cool it down as rate-limited.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from edgeroute.state import STATE
from tests.conftest import simple_config

MSG: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


async def test_cache_hits_do_not_spend_the_providers_requests(start_upstream: Any, start_proxy: Any) -> None:
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up}, rate_limits={"deployments": {"d-a": {"rpm": 3}}})
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    labels = []
    for _ in range(6):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
        labels.append(raw.headers["x-edgeroute-cache"])
    assert labels == ["miss"] + ["hit"] * 5
    assert len(up.options.requests) == 1, "the provider saw one request"
    # The provider has seen one request of its three a minute: a new question goes through.
    other = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "And of Spain?"}], temperature=0
    )
    assert other.choices[0].message.content
    assert len(up.options.requests) == 2


async def test_cache_hits_take_no_tokens_from_token_limits(start_upstream: Any, start_proxy: Any) -> None:
    """A hit counts against a key's or a model's RPM, as a request, but sends no token
    anywhere: it takes none from their TPM (the ledger records it with none, which is what a
    restart reads the window back from). Before, a hit held its worst case (prompt +
    `max_tokens`) for the minute, more than the miss it repeats had used: with a 1,000 TPM
    limit, the third hit of a question answered in ~30 tokens was refused (429)."""
    up = await start_upstream(record=True)
    limits = {"per_key": {"rpm": 100, "tpm": 1000}, "models": {"m": {"rpm": 100, "tpm": 1000}}}
    cfg = simple_config({"a": up}, rate_limits=limits, keys={"k": {"token": "sk-k"}})
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-k", max_retries=0)
    labels = []
    for _ in range(8):
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, temperature=0, max_tokens=300
        )
        labels.append(raw.headers["x-edgeroute-cache"])
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 0
    assert labels == ["miss"] + ["hit"] * 7
    used = proxy.recorder.records[0].usage
    assert used is not None and used.prompt_tokens + used.completion_tokens < 100
    # Every hit took a request; the tokens left are what the one miss left (its worst case then).
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "And of Spain?"}], temperature=0, max_tokens=300
    )
    assert raw.headers["x-edgeroute-cache"] == "miss"
    assert len(up.options.requests) == 2
    await client.close()


async def test_a_deployment_at_its_provider_limit_still_lets_its_cached_answers_through(
    start_upstream: Any, start_proxy: Any
) -> None:
    """A hit reaches no provider, so a deployment at its provider limit does not refuse it (a
    new question is refused, 429, as it should be). Before, the limit was checked at admission,
    ahead of the cache: with 1 request a minute, the second ask of a cached question was a 429."""
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up}, rate_limits={"deployments": {"d-a": {"rpm": 1}}})
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    first = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert first.headers["x-edgeroute-cache"] == "miss"
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "And of Spain?"}], temperature=0
        )
    assert refused.value.code == "upstream_rate_limited"
    for _ in range(3):
        again = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
        assert again.headers["x-edgeroute-cache"] == "hit"
        assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert len(up.options.requests) == 1
    await client.close()


async def test_a_cached_answer_is_served_while_its_deployment_is_at_its_limit_and_another_serves(
    start_upstream: Any, start_proxy: Any
) -> None:
    """With a second deployment, a request whose first deployment is at its provider limit goes
    to the other; its answer from the first, cached, is still served (it reaches no provider)."""
    a, b = await start_upstream(record=True), await start_upstream(record=True)
    cfg = simple_config({"a": a, "b": b}, rate_limits={"deployments": {"d-a": {"rpm": 1}, "d-b": {"rpm": 100}}})
    cfg["deployments"]["d-a"]["weight"] = 1000  # d-a first while it has room
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    first = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert first.headers["x-edgeroute-cache"] == "miss" and first.headers["x-edgeroute-deployment"] == "d-a"
    other = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "And of Spain?"}], temperature=0
    )
    assert other.headers["x-edgeroute-deployment"] == "d-b"  # d-a is at its limit
    again = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert again.headers["x-edgeroute-cache"] == "hit" and again.headers["x-edgeroute-deployment"] == "d-a"
    assert len(a.options.requests) == 1 and len(b.options.requests) == 1
    await client.close()


async def test_a_hit_that_took_the_last_provider_request_does_not_keep_selection_away(
    start_upstream: Any, start_proxy: Any
) -> None:
    """d-a (the cheaper, chosen first) has two requests a minute; a hit took its second at
    admission, then gave it back, but d-a stayed cooled down in the core for half a minute with a
    failure: the next question went to d-b, though d-a's provider had seen one request."""
    a, b = await start_upstream(record=True), await start_upstream(record=True)
    cfg = simple_config({"a": a, "b": b}, rate_limits={"deployments": {"d-a": {"rpm": 2}}})
    cfg["deployments"]["d-b"]["price"] = {"input_per_mtok": 10.0, "output_per_mtok": 20.0}
    cfg["models"]["m"].update(cache={"ttl": 60}, strategy="lowest_cost")
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    labels = []
    for messages in (MSG, MSG, [{"role": "user", "content": "And of Spain?"}]):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=messages, temperature=0)
        labels.append((raw.headers["x-edgeroute-cache"], raw.headers["x-edgeroute-deployment"]))
    assert labels == [("miss", "d-a"), ("hit", "d-a"), ("miss", "d-a")]
    assert len(a.options.requests) == 2 and b.options.requests == []
    live = proxy.app[STATE].live
    assert live.router.health(live.index_of["d-a"])["failures"] == 0
