"""A server that forbids unknown fields still streams: edgeroute drops the `stream_options` it
added when the server refuses it, and remembers.

edgeroute asks every stream upstream for its usage (`stream_options.include_usage`), so that it
is priced by the provider's count. Servers that validate strictly refuse the field: Mistral's
API answers 422 `extra_forbidden`, an Azure API version older than the field a 400. Every
stream from a client that had not asked for usage (the SDKs' default) failed there. Now the
attempt is made again at once without the field, and the provider's next streams go without it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.security.conftest import chat_upstream, openai_answer, priced_config


@pytest.fixture
async def strict() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        extra = [k for k in body if k not in ("model", "messages", "stream", "max_tokens")]
        if extra:  # as Mistral's API answers a field it does not know
            detail = [
                {"type": "extra_forbidden", "loc": ["body", k], "msg": "Extra inputs are not permitted"} for k in extra
            ]
            return web.Response(status=422, body=orjson.dumps({"detail": detail}), content_type="application/json")
        return await openai_answer(request, body, "hello there", {"prompt_tokens": 5, "completion_tokens": 2})

    server = await chat_upstream(chat)
    yield f"http://127.0.0.1:{server.port}/v1", seen
    await server.close()


async def test_a_stream_refused_for_stream_options_is_sent_again_without_it(strict: Any, start_proxy: Any) -> None:
    url, seen = strict
    proxy = await start_proxy(priced_config(url))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    async def stream() -> str:
        got = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in got if c.choices])

    assert await stream() == "hello there"
    assert [("stream_options" in b) for b in seen] == [True, False]  # refused, then sent without it
    first = proxy.recorder.records[-1]
    assert first.status == 200 and [a.outcome for a in first.attempts][-1] == "success"
    assert await stream() == "hello there"
    assert [("stream_options" in b) for b in seen] == [True, False, False]  # remembered
    assert proxy.recorder.records[-1].cost_usd > 0  # counted from its text
    # A client that asks for usage itself is refused, now by edgeroute, saying why.
    with pytest.raises(openai.BadRequestError, match="`stream_options` is not supported"):
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
        )
    await client.close()
