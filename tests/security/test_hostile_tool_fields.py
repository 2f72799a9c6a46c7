"""Hostile bodies on the endpoints served through a translating adapter (Anthropic, Gemini):
`tools` that is not a list (`true`, a number) was a TypeError inside the adapter, answered as
edgeroute's 500 "Internal error"; it is the client's 400, naming the field, and nothing is sent
upstream. (A fuzz of every chat field with odd values, listed in the report, found no other.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import routes_upstream
from tests.security.conftest import Served


@pytest.fixture
async def counting_upstream() -> AsyncIterator[tuple[TestServer, list[str]]]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"error": {"message": "not expected"}}, status=500)

    async with routes_upstream(web.post("/{tail:.*}", handle)) as server:
        yield server, seen


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
@pytest.mark.parametrize("tools", [True, -1, 1.5])
async def test_hostile_tool_fields_tools_not_a_list_is_a_400(
    counting_upstream: tuple[TestServer, list[str]], serve: Any, kind: str, tools: Any
) -> None:
    up, seen = counting_upstream
    cfg = {
        "providers": {"p": {"kind": kind, "base_url": f"http://127.0.0.1:{up.port}/v1", "api_key": "k-0123456789"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
        "models": {"m": {"deployments": ["d"]}},
    }
    proxy: Served = await serve(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], extra_body={"tools": tools}
            )
    finally:
        await client.close()
    assert err.value.status_code == 400
    assert err.value.body == {
        "message": "`tools` must be a list of tools.",
        "type": "invalid_request_error",
        "param": "tools",
        "code": err.value.code,
    }
    assert seen == []
