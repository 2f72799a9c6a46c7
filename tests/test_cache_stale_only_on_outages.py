"""What a stale answer stands in for, and what a fallback model's answer is kept as.

Stale-if-error answered an upstream 400 (the request's own fault) and a 401 (the provider
refused edgeroute's key) with yesterday's answer and a 200: the client never learnt that the
request will not succeed, nor the operator's clients that a key broke, for the whole window.
Now a stale answer is given only when the deployments could not answer (5xx, timeouts, 429,
none to call), and says which error it stands in for (`x-edgeroute-stale-reason`).

A fallback model's answer given while the route's own deployments failed was stored under the
route and served as a fresh hit for the whole ttl once they were back: the client asked for the
route's model and kept getting the fallback's. Now it is kept only as a stale answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.conftest import simple_config

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


async def _stale_soon(start_upstream: Any, start_proxy: Any) -> tuple[Any, openai.AsyncOpenAI, str]:
    """Model `m` on one upstream, its answer to MSG cached and past its ttl (0.2 s), within
    stale-if-error: (the upstream, a client, that answer)."""
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["models"]["m"]["cache"] = {"ttl": 0.2, "stale_if_error": 600}
    proxy = await start_proxy(cfg)
    client = _client(proxy.url)
    fresh = await client.chat.completions.create(model="m", messages=MSG, temperature=0)
    await asyncio.sleep(0.4)
    return up, client, fresh.choices[0].message.content or ""


@pytest.mark.parametrize(("status", "client_sees"), [(400, 400), (401, 502), (403, 502), (404, 404), (422, 422)])
async def test_a_refusal_of_the_request_or_of_our_key_is_not_answered_stale(
    start_upstream: Any, start_proxy: Any, status: int, client_sees: int
) -> None:
    up, client, _ = await _stale_soon(start_upstream, start_proxy)
    up.options.fail_status = status
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model="m", messages=MSG, temperature=0)
    assert e.value.status_code == client_sees, "a stale 200 hid the upstream's refusal"
    assert e.value.response.headers["x-edgeroute-cache"] == "miss"
    await client.close()


@pytest.mark.parametrize(
    ("status", "reason"), [(500, "upstream_failed"), (503, "upstream_failed"), (429, "upstream_rate_limited")]
)
async def test_an_outage_is_answered_stale_and_says_why(
    start_upstream: Any, start_proxy: Any, status: int, reason: str
) -> None:
    up, client, fresh = await _stale_soon(start_upstream, start_proxy)
    up.options.fail_status = status
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert raw.headers["x-edgeroute-cache"] == "stale"
    assert raw.headers["x-edgeroute-stale-reason"] == reason
    assert raw.parse().choices[0].message.content == fresh
    await client.close()


def _with_fallback(primary: Any, fallback: Any, **cache: Any) -> dict[str, Any]:
    cfg = simple_config({"a": primary, "b": fallback})
    cfg["models"] = {
        "m": {"deployments": ["d-a"], "fallbacks": ["mb"], "cache": {"ttl": 600} | cache},
        "mb": {"deployments": ["d-b"]},
    }
    return cfg


async def test_a_fallbacks_answer_is_not_a_hit_once_the_route_is_back(start_upstream: Any, start_proxy: Any) -> None:
    primary, fallback = await start_upstream(record=True), await start_upstream(record=True)
    proxy = await start_proxy(_with_fallback(primary, fallback, stale_if_error=600))
    client = _client(proxy.url)

    async def ask() -> tuple[str, str, str]:
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
        text = raw.parse().choices[0].message.content or ""
        return raw.headers["x-edgeroute-cache"], raw.headers["x-edgeroute-deployment"], text

    primary.options.fail_status = 503  # a blip of the route's own deployment
    assert (await ask())[:2] == ("miss", "d-b")
    # While everything fails, the fallback's answer is what stale-if-error has.
    fallback.options.fail_status = 503
    label, deployment, _ = await ask()
    assert (label, deployment) == ("stale", "d-b")
    # The route is back: its own model answers (and that answer is then a hit).
    primary.options.fail_status = fallback.options.fail_status = None
    assert (await ask())[:2] == ("miss", "d-a"), "the fallback model's answer was served as the route's, fresh"
    assert (await ask())[:2] == ("hit", "d-a")
    await client.close()


async def test_a_fallbacks_answer_is_not_kept_without_stale_if_error(start_upstream: Any, start_proxy: Any) -> None:
    primary, fallback = await start_upstream(record=True), await start_upstream(record=True)
    proxy = await start_proxy(_with_fallback(primary, fallback))
    client = _client(proxy.url)
    primary.options.fail_status = 503
    first = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert first.headers["x-edgeroute-deployment"] == "d-b"
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(
            model="m", messages=MSG, temperature=0, extra_headers={"x-edgeroute-cache": "only-if-cached"}
        )
    assert e.value.status_code == 504
    await client.close()


async def test_a_fallbacks_answer_the_route_could_never_give_is_kept(start_upstream: Any, start_proxy: Any) -> None:
    """A prompt too long for every deployment of the route goes to the fallback: its answer is
    the only one the request can get, not a blip's, and is a hit next time."""
    primary, fallback = await start_upstream(record=True), await start_upstream(record=True)
    cfg = _with_fallback(primary, fallback)
    cfg["deployments"]["d-a"]["context_window"] = 64
    proxy = await start_proxy(cfg)
    client = _client(proxy.url)
    long = [{"role": "user", "content": "Summarise this: " + "the quick brown fox jumps over the lazy dog " * 20}]
    labels = []
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=long, temperature=0)
        labels.append((raw.headers["x-edgeroute-cache"], raw.headers["x-edgeroute-deployment"]))
    assert labels == [("miss", "d-b"), ("hit", "d-b")]
    assert not primary.options.requests
    await client.close()
