"""Capacity on every endpoint, through the official SDKs: `/v1/embeddings`, `/v1/completions`,
`/v1/responses` and `/v1/messages` spill over a full deployment and say so in
`x-edgeroute-explain`, and answer 429 in their own API's format when everything is full."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest

from edgeroute.state import STATE
from tests.conftest import Proxy, simple_config

Send = Callable[[Proxy], Awaitable[Any]]


def _oa(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)


async def _embeddings(proxy: Proxy) -> Any:
    return await _oa(proxy).embeddings.with_raw_response.create(model="m", input="hello")


async def _completions(proxy: Proxy) -> Any:
    return await _oa(proxy).completions.with_raw_response.create(model="m", prompt="hello", max_tokens=5)


async def _responses(proxy: Proxy) -> Any:
    return await _oa(proxy).responses.with_raw_response.create(model="m", input="hello")


async def _messages(proxy: Proxy) -> Any:
    c = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    return await c.messages.with_raw_response.create(
        model="m", max_tokens=16, messages=[{"role": "user", "content": "hello"}]
    )


ENDPOINTS = pytest.mark.parametrize(
    "send", [_embeddings, _completions, _responses, _messages], ids=lambda f: f.__name__
)


async def _proxy(start_upstream: Any, start_proxy: Any) -> Proxy:
    ups = {"a": await start_upstream(), "b": await start_upstream()}
    cfg = simple_config(ups)
    cfg["deployments"]["d-a"].update(weight=1000, max_concurrency=1)
    cfg["deployments"]["d-b"]["max_concurrency"] = 1
    return await start_proxy(cfg)


@ENDPOINTS
async def test_a_full_deployment_spills_over_with_the_note(start_upstream: Any, start_proxy: Any, send: Send) -> None:
    proxy = await _proxy(start_upstream, start_proxy)
    live = proxy.app[STATE].live
    assert (await send(proxy)).headers["x-edgeroute-deployment"] == "d-a"  # the heavier weight, with room
    live.router.acquire(live.index_of["d-a"])  # d-a full
    raw = await send(proxy)
    assert raw.headers["x-edgeroute-deployment"] == "d-b"
    assert "spillover: d-a at capacity for class default" in raw.headers["x-edgeroute-explain"]
    assert proxy.recorder.records[-1].priority == "default"
    assert [live.capacity.active(i) for i in (0, 1)] == [1, 0]  # d-b's slot given back


@ENDPOINTS
async def test_everything_full_is_429_in_the_api_format(start_upstream: Any, start_proxy: Any, send: Send) -> None:
    proxy = await _proxy(start_upstream, start_proxy)
    live = proxy.app[STATE].live
    live.router.acquire(0)
    live.router.acquire(1)
    expected = anthropic.RateLimitError if send is _messages else openai.RateLimitError
    with pytest.raises(expected) as e:
        await send(proxy)
    assert e.value.response.headers["retry-after"] == "1"
    assert "at capacity" in str(e.value)
    body = e.value.response.json()
    if send is _messages:
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    else:
        assert body["error"]["code"] == "capacity_exhausted"
