"""A stale answer is given only while it is within `stale_if_error` when it is given.

The stale entry was chosen when the request was looked up, and served when every deployment
had failed, however long that took: an entry a second from the end of its window, standing in
for a call that failed after its retries and timeouts (a minute, or `timeouts.total`), was
served past `stale_if_error` (and past the client's `max-stale`), though the window promises
no older answer. Now its age is judged again when it is served.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.conftest import ServeRoutes
from tests.test_cache import MSG, stored

_TTL, _STALE = 1.0, 1.0
_ANSWER = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
}  # fmt: skip


@pytest.mark.parametrize("headers", [{}, {"Cache-Control": "max-stale=1"}])
async def test_a_stale_answer_past_its_window_when_served_is_not_served(
    serve_routes: ServeRoutes, start_proxy: Any, headers: dict[str, str]
) -> None:
    answered_at: list[float] = []

    async def chat(request: web.Request) -> web.Response:
        if not answered_at:
            answered_at.append(time.time())
            return web.json_response(_ANSWER)
        # The outage: the answer's window ends while this call is failing (its retries, timeouts).
        await asyncio.sleep(max(0.0, answered_at[0] + _TTL + _STALE + 0.3 - time.time()))
        return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)

    up = await serve_routes(web.post("/v1/chat/completions", chat))
    price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    cfg = {
        "providers": {"a": {"base_url": up.url + "/v1", "api_key": "k"}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": price}},
        "models": {"m": {"deployments": ["d-a"], "max_attempts": 1, "cache": {"ttl": _TTL, "stale_if_error": _STALE}}},
    }
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=MSG, temperature=0)
    await stored(proxy)
    # Past its ttl, inside its stale window when looked up (time passing, not work to wait for).
    await asyncio.sleep(max(0.0, answered_at[0] + _TTL + 0.2 - time.time()))
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model="m", messages=MSG, temperature=0, extra_headers=headers)
    assert e.value.status_code == 502, "every deployment failed"
    assert e.value.response.headers["x-edgeroute-cache"] == "miss", "not served an answer older than its window"
    await client.close()
