"""A 429 that says the request is too large for a deployment's limit (OpenAI's "Request too
large for gpt-4o … on tokens per min") is about that request: it fails over, and the
deployment is not cooled down for everyone by its Retry-After. One such request with
`Retry-After: 300` took the deployment out of service for five minutes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes

TOO_LARGE = (
    "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, Requested 50000."
    " The input or output tokens must be reduced in order to run successfully."
)
BUSY = "Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 30000, Requested 100."


def _ok() -> web.Response:
    choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "x", "choices": [choice], "usage": usage}
    return web.json_response(answer)


def _refusing(message: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        if "BIG" in body["messages"][-1]["content"]:
            error = {"error": {"message": message, "type": "tokens", "code": "rate_limit_exceeded"}}
            return web.json_response(error, status=429, headers={"Retry-After": "300"})
        return _ok()

    return handle


async def _ok_handler(request: web.Request) -> web.Response:
    await request.read()
    return _ok()


async def _cooldowns(proxy: Proxy) -> dict[str, int]:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
        return {d["name"]: int(d["cooldown_ms"]) for d in (await r.json())["deployments"]}


@pytest.mark.parametrize(("message", "cooled"), [(TOO_LARGE, False), (BUSY, True)], ids=["too-large", "busy"])
async def test_a_request_too_large_for_a_limit_does_not_cool_the_deployment_down(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, message: str, cooled: bool
) -> None:
    a = await serve_routes(web.post("/v1/chat/completions", _refusing(message)))
    b = await serve_routes(web.post("/v1/chat/completions", _ok_handler))
    proxy = await start_proxy(
        {
            "providers": {"a": {"base_url": a.url + "/v1"}, "b": {"base_url": b.url + "/v1"}},
            "deployments": {  # d-a first (the cheaper), d-b its failover
                "d-a": {"provider": "a", "model": "x", "price": {"input_per_mtok": 1, "output_per_mtok": 1}},
                "d-b": {"provider": "b", "model": "x", "price": {"input_per_mtok": 2, "output_per_mtok": 2}},
            },
            "models": {"m": {"deployments": ["d-a", "d-b"], "strategy": "lowest_cost"}},
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "BIG " * 10}]
        )
        assert raw.headers["x-edgeroute-deployment"] == "d-b"  # failed over, answered
        cooldowns = await _cooldowns(proxy)
        # The next ordinary request goes where it went before (d-a), unless d-a is cooling down.
        nxt = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        await client.close()
    if cooled:  # the limit is in use: everyone waits, as the upstream says
        assert cooldowns["d-a"] > 200_000 and nxt.headers["x-edgeroute-deployment"] == "d-b"
    else:
        assert cooldowns["d-a"] == 0 and nxt.headers["x-edgeroute-deployment"] == "d-a"
