"""A client may not ask a provider for a tier billed above the price edgeroute charges:
`service_tier: "priority"` was passed on to OpenAI (billed at a premium) while budgets and the
ledger counted the standard price. Outside `server.service_tiers` it is a 400 naming the field,
on chat and Responses; the default tiers pass, and an operator may allow `priority`."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from aiohttp import web

from tests.conftest import ServeRoutes


class Echo:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        return web.json_response(
            {"id": "c", "object": "chat.completion", "created": 1, "model": "x", "choices": [choice], "usage": usage}
        )


async def _client(start_proxy: Any, serve_routes: ServeRoutes, echo: Echo, **server: Any) -> Any:
    up = await serve_routes(web.post("/v1/chat/completions", echo.chat))
    proxy = await start_proxy(
        {
            "server": server,
            "providers": {"p": {"base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("tier", ["priority", "scale"])
async def test_a_tier_billed_at_a_premium_is_refused(start_proxy: Any, serve_routes: ServeRoutes, tier: str) -> None:
    echo = Echo()
    client = await _client(start_proxy, serve_routes, echo)
    try:
        with pytest.raises(openai.BadRequestError) as chat:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], service_tier=tier
            )
        with pytest.raises(openai.BadRequestError) as responses:
            await client.responses.create(model="m", input="hi", service_tier=tier)
    finally:
        await client.close()
    for refused in (chat.value, responses.value):
        assert refused.code == "service_tier_not_allowed" and refused.param == "service_tier"
    assert echo.bodies == []  # nothing reached the provider


async def test_the_default_tiers_pass_and_an_operator_may_allow_priority(
    start_proxy: Any, serve_routes: ServeRoutes
) -> None:
    echo = Echo()
    client = await _client(start_proxy, serve_routes, echo, service_tiers=["auto", "default", "flex", "priority"])
    try:
        for tier in ("auto", "flex", "priority"):
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], service_tier=tier
            )
    finally:
        await client.close()
    assert [b["service_tier"] for b in echo.bodies] == ["auto", "flex", "priority"]


@pytest.mark.parametrize("tier", [b"1e400", b'"\\ud800"', b"[1e400]", b'{"a": "\\udfff"}'])
async def test_a_tier_that_is_not_json_python_reads_is_refused(
    start_proxy: Any, serve_routes: ServeRoutes, tier: bytes
) -> None:
    """The core hands the check the field's text without decoding it: a number past a double or a
    lone surrogate was a 500 (and a provider reading it leniently would pick a tier unchecked)."""
    echo = Echo()
    client = await _client(start_proxy, serve_routes, echo)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "service_tier": ' + tier + b"}"
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.post("/chat/completions", content=body, cast_to=object, options={"headers": _JSON})
    finally:
        await client.close()
    assert refused.value.code == "invalid_request" and "not valid JSON" in refused.value.message
    assert echo.bodies == []


_JSON = {"Content-Type": "application/json"}
