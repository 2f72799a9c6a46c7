"""A careless upstream's huge non-streamed answer: counting its tokens (it reports no usage)
must not hold the event loop every other client shares, and past a size bound it is the
upstream's failure, not a gigabyte of the proxy's memory."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgeroute.dispatch import attempt
from tests.security.conftest import chat_upstream, loop_lag

MIB = 1 << 20


def _answer(mib: int, usage: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A chat answer of `mib` MiB of content (with or without its usage), sent in pieces."""

    async def big(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"id":"x","object":"chat.completion","created":1,"model":"x",')
        await resp.write(b'"choices":[{"index":0,"message":{"role":"assistant","content":"')
        word = b"a" * MIB  # no spaces: the slowest text to count (~0.3 s a MiB here)
        for _ in range(mib):
            await resp.write(word)
        tail = b'"},"finish_reason":"stop"}]'
        tail += b',"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}' if usage else b"}"
        await resp.write(tail)
        return resp

    return big


async def _config(mib: int, usage: bool) -> tuple[TestServer, dict[str, Any]]:
    up = await chat_upstream(_answer(mib, usage))
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    cfg = {
        "providers": {"p": {"base_url": f"http://127.0.0.1:{up.port}/v1"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": price}},
        "models": {"m": {"deployments": ["d"]}},
    }
    return up, cfg


async def test_counting_a_huge_answer_without_usage_leaves_the_loop_free(
    serve: Callable[..., Awaitable[Any]],
) -> None:
    up, cfg = await _config(6, usage=False)
    proxy = await serve(cfg)
    try:
        with loop_lag() as lag:
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=120)
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
            answer = raw.parse()
            await client.close()
    finally:
        await up.close()
    assert len(answer.choices[0].message.content or "") == 6 * MIB
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and rec.usage.estimated and rec.usage.completion_tokens > 500_000  # counted
    # Counted in a worker thread (the core releases the GIL): the loop woke on time meanwhile,
    # where counting on the loop held it for seconds. The bound leaves room for a busy machine.
    assert lag.max_s < 0.75, f"the event loop stalled {lag.max_s:.2f} s"


async def test_an_answer_over_the_bound_is_the_upstreams_failure(
    serve: Callable[..., Awaitable[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attempt, "MAX_ANSWER_BYTES", 2 * MIB)
    up, cfg = await _config(4, usage=True)
    proxy = await serve(cfg)
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
                status, got = r.status, await r.json()
    finally:
        await up.close()
    assert status == 502 and "larger than 2 MiB" in str(got["error"])
    # The upstream billed the prompt and what it sent (it was $0 in the ledger and every budget):
    # estimated (its usage, at the body's end, never arrived) by the bytes received, at four a
    # token, up to what the request could have produced (no max_tokens: what budgets reserve,
    # 4096). Asked once: the deployment would send the same again.
    rec = proxy.recorder.records[-1]
    assert len(rec.attempts) == 1 and rec.usage is not None and rec.usage.estimated
    (a,) = rec.attempts
    assert a.usage is not None and a.usage.estimated and a.usage.completion_tokens == 4096
    assert a.cost_usd == pytest.approx((a.usage.prompt_tokens * 1 + a.usage.completion_tokens * 2) / 1e6)
    assert rec.cost_usd == pytest.approx(a.cost_usd)
