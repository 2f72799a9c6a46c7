"""The request path under upstream faults: one answer, every cost settled, the core's counts right.

Upstreams are small aiohttp servers that misbehave on purpose (slow, malformed usage,
a stream that breaks or stalls, an absurd Retry-After, refused credentials); the
proxy is the real one; clients are the official SDKs or raw HTTP where the wire matters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.state import STATE
from tests.conftest import eventually
from tests.dispatch_support import HELLO, StartProxy, answer, chunk, in_flight, ok, recorded, sse_response
from tests.dispatch_support import upstreams as upstreams  # a fixture

FAR_DATE = "Mon, 01 Jan 99999999999 00:00:00 GMT"  # an HTTP date past any calendar


async def test_client_leaving_during_the_hedge_delay_cancels_and_costs_the_attempt(
    upstreams: Any, start_proxy: StartProxy
) -> None:
    cancelled = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return answer()

    cfg = await upstreams(slow, slow)
    cfg["models"]["m"]["hedge"] = {"delay_ms": 2000}
    proxy = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(
                proxy.url + "/v1/chat/completions",
                json={"model": "m", "messages": HELLO},
                timeout=aiohttp.ClientTimeout(total=0.3),
            ) as r:
                await r.read()
    await asyncio.wait_for(cancelled.wait(), 2)  # the upstream call ended with the client
    rec = await recorded(proxy)
    assert rec.outcome == "client_gone"
    assert [a.outcome for a in rec.attempts] == ["cancelled"]
    assert rec.cost_usd > 0  # the prompt the upstream saw is paid for
    assert set(in_flight(proxy).values()) == {0}


async def test_unreadable_usage_is_counted_not_trusted(upstreams: Any, start_proxy: StartProxy) -> None:
    async def bad_usage(request: web.Request) -> web.Response:
        await request.read()
        return answer({"prompt_tokens": "n/a", "completion_tokens": float("1e30")})

    proxy = await start_proxy(await upstreams(bad_usage))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    r = await client.chat.completions.create(model="m", messages=HELLO)
    assert r.choices[0].message.content == "hi there"
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and rec.usage.estimated
    assert rec.usage.prompt_tokens > 0 and rec.usage.completion_tokens == 2  # "hi there"
    assert rec.cost_usd > 0 and set(in_flight(proxy).values()) == {0}


@pytest.mark.parametrize("retry_after", ["inf", "nan", "1e30", "-5", FAR_DATE])
async def test_absurd_retry_after_fails_over(upstreams: Any, start_proxy: StartProxy, retry_after: str) -> None:
    async def limited(request: web.Request) -> web.Response:
        await request.read()
        err = {"error": {"message": "slow down", "type": "rate_limit_error"}}
        return web.json_response(err, status=429, headers={"Retry-After": retry_after})

    proxy = await start_proxy(await upstreams(limited, ok))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=HELLO)
    assert raw.headers["x-edgeroute-deployment"] == "d-b"
    assert set(in_flight(proxy).values()) == {0}


@pytest.mark.parametrize("retry_after", ["1e30", FAR_DATE])
async def test_a_429_with_an_absurd_retry_after_is_the_upstreams_rate_limit(
    upstreams: Any, start_proxy: StartProxy, retry_after: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream's 429 is its rate limit whatever its `Retry-After` says: an HTTP date past any
    calendar made reading the answer raise, so it was a server error logged with a traceback,
    retried at once against the limited upstream and a 502 for the client."""

    async def limited(request: web.Request) -> web.Response:
        await request.read()
        err = {"error": {"message": "slow down", "type": "rate_limit_error"}}
        return web.json_response(err, status=429, headers={"Retry-After": retry_after})

    proxy = await start_proxy(await upstreams(limited))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="m", messages=HELLO)
    assert err.value.code == "upstream_rate_limited"
    assert [a.outcome for a in proxy.recorder.records[-1].attempts] == ["rate_limited"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("retry_after", ["31536000", FAR_DATE])
async def test_a_429_promises_a_client_no_longer_wait_than_the_deployments_cool_down(
    upstreams: Any, start_proxy: StartProxy, retry_after: str
) -> None:
    """A careless upstream's `Retry-After` of a year was passed on to the client capped at a
    day, though the deployment is tried again after at most `health.max_ejection_ms`: a client
    that honours the header stopped for a day over a five-minute cool-down."""

    async def limited(request: web.Request) -> web.Response:
        await request.read()
        err = {"error": {"message": "slow down", "type": "rate_limit_error"}}
        return web.json_response(err, status=429, headers={"Retry-After": retry_after})

    cfg = await upstreams(limited)
    cfg["health"] = {"base_ejection_ms": 1_000, "max_ejection_ms": 2_000}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="m", messages=HELLO)
    assert err.value.response.headers["Retry-After"] == "2"


async def test_refused_provider_credentials_fail_over(upstreams: Any, start_proxy: StartProxy) -> None:
    async def refused(request: web.Request) -> web.Response:
        await request.read()
        err = {"error": {"message": "Incorrect API key provided: sk-****p-42.", "type": "invalid_request_error"}}
        return web.json_response(err, status=401)

    proxy = await start_proxy(await upstreams(refused, ok))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=HELLO)
    assert raw.headers["x-edgeroute-deployment"] == "d-b"
    assert [a.outcome for a in proxy.recorder.records[-1].attempts] == ["auth_error", "success"]


async def test_a_stream_that_cannot_be_translated_ends_with_one_error_event(
    upstreams: Any, start_proxy: StartProxy
) -> None:
    async def anthropic_then_garbage(request: web.Request) -> web.StreamResponse:
        r = await sse_response(request)
        start = {"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 8}}}
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}
        bad = {"type": "content_block_delta", "index": "zero", "delta": {"type": "text_delta", "text": "!"}}
        for ev in (start, block, delta, bad):
            await r.write(f"event: {ev['type']}\ndata: ".encode() + orjson.dumps(ev) + b"\n\n")
            await asyncio.sleep(0.01)
        await asyncio.sleep(5)
        return r

    proxy = await start_proxy(await upstreams(anthropic_then_garbage, kinds=("anthropic",)))
    async with aiohttp.ClientSession() as s:
        body = {"model": "m", "messages": HELLO, "stream": True}
        async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            raw = await asyncio.wait_for(r.read(), 3)
    assert b"HTTP/1.1" not in raw  # no second response spliced into the stream
    assert b'"Hello"' in raw and raw.count(b'"error"') == 1 and b"stream_interrupted" in raw
    assert proxy.recorder.records[-1].outcome == "stream_interrupted"
    assert set(in_flight(proxy).values()) == {0}


async def test_a_stream_cut_before_its_usage_chunk_is_costed_for_its_text(
    upstreams: Any, start_proxy: StartProxy
) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        r = await sse_response(request)
        for _ in range(50):
            await r.write(chunk("word "))
        assert request.transport is not None
        request.transport.close()  # gone before the usage chunk and [DONE]
        return r

    proxy = await start_proxy(await upstreams(cut))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="m",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    rec = await recorded(proxy)
    assert rec.usage is not None and rec.usage.completion_tokens >= 50
    assert rec.cost_usd > 0


async def test_a_broken_stream_leaves_other_requests_in_flight(upstreams: Any, start_proxy: StartProxy) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            await release.wait()
            return answer()
        r = await sse_response(request)
        await r.write(chunk("partial"))
        return r  # ends without [DONE]

    proxy = await start_proxy(await upstreams(handler))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    slow = asyncio.ensure_future(client.chat.completions.create(model="m", messages=HELLO))
    await eventually(lambda: asyncio.sleep(0, in_flight(proxy) == {"d-a": 1}), "the slow request out", within=10)
    stream = await client.chat.completions.create(model="m", messages=HELLO, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await recorded(proxy)  # the broken stream's end is counted
    assert in_flight(proxy) == {"d-a": 1}  # the slow request is still out
    health = proxy.app[STATE].live.router.health(0)
    assert (health["requests"], health["failures"]) == (1, 1)  # the broken stream, counted once, as failed
    release.set()
    await slow
    assert in_flight(proxy) == {"d-a": 0}


async def test_the_total_timeout_bounds_a_committed_stream(upstreams: Any, start_proxy: StartProxy) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        r = await sse_response(request)
        for _ in range(100):
            await r.write(chunk("tick "))
            await asyncio.sleep(0.1)
        return r

    cfg = await upstreams(endless)
    cfg["providers"]["a"]["timeouts"] = {"total": 1.0, "idle": 5.0}
    proxy = await start_proxy(cfg)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/v1/chat/completions", json={"model": "m", "messages": HELLO, "stream": True}
        ) as r:
            raw = await asyncio.wait_for(r.read(), 8)
    assert time.perf_counter() - t0 < 6.0  # the total timeout's 1 s, not the upstream's 10 s (room for a slow host)
    assert raw.rstrip().endswith(b"}") and b"stream_timeout" in raw and b"total timeout" in raw


async def test_a_hedge_that_cannot_take_the_request_does_not_fail_it(upstreams: Any, start_proxy: StartProxy) -> None:
    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.4)
        return answer()

    cfg = await upstreams(slow, slow, kinds=("openai", "anthropic"))
    cfg["deployments"]["d-a"]["weight"] = 1000
    cfg["deployments"]["d-b"]["weight"] = 1
    cfg["models"]["m"]["hedge"] = {"delay_ms": 100, "budget_percent": 100}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    # Anthropic takes temperatures up to 1 only: the hedge to d-b cannot be sent.
    raw = await client.chat.completions.with_raw_response.create(
        model="m",
        messages=HELLO,
        temperature=1.5,
    )
    assert raw.headers["x-edgeroute-deployment"] == "d-a"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"metadata": "user-1"}, "metadata"),
        ({"output_config": "json"}, "output_config"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": "http://x/y.png"}]}]}, None),
    ],
)
async def test_anthropic_fields_of_the_wrong_type_are_400(
    upstreams: Any, start_proxy: StartProxy, extra: dict[str, Any], param: str | None
) -> None:
    proxy = await start_proxy(await upstreams(ok))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    body: dict[str, Any] = {"model": "m", "max_tokens": 10, "messages": HELLO, **extra}
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(**body)
    err = e.value.body
    assert isinstance(err, dict) and err["type"] == "error" and err["error"]["type"] == "invalid_request_error"


async def test_refused_provider_credentials_are_not_tried_again(upstreams: Any, start_proxy: StartProxy) -> None:
    """With no other deployment to fail over to, a 401 from the provider was tried three more
    times on the same deployment with the same key (four calls, four refusals, one 502)."""
    calls = 0

    async def refused(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await request.read()
        return web.json_response({"error": {"message": "Incorrect API key provided.", "type": "x"}}, status=401)

    proxy = await start_proxy(await upstreams(refused))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(model="m", messages=HELLO)
    assert failed.value.status_code == 502
    body: Any = failed.value.body
    assert [a["error"] for a in body["attempts"]] == ["auth_error"], body
    assert calls == 1
    assert [a.outcome for a in proxy.recorder.records[-1].attempts] == ["auth_error"]
