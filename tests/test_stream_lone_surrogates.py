"""A chat stream whose server detokenizes per token may split an emoji over two deltas as UTF-16
surrogate escapes (`"\\ud83c"`, then `"\\udf0d"`). Python's JSON reader, and so the OpenAI SDK,
takes them; edgeroute's refused the event and cut the answer ("not JSON in UTF-8"). Each lone
surrogate now reaches the client as U+FFFD, and the answer goes on to its end."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes
from tests.test_stream_hold_usage_and_format import _streaming
from tests.test_translated_stream_ends import _record
from tests.test_translated_tool_calls import _chunk

HALVES = [
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"x","choices":[{"index":0,'
    + b'"delta":{"content":"\\ud83c"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"x","choices":[{"index":0,'
    + b'"delta":{"content":"\\udf0d"},"finish_reason":null}]}\n\n',
]
EVENTS = [_chunk({"role": "assistant", "content": "A"}), *HALVES, _chunk({"content": "B"}), _chunk({}, "stop")]


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_an_emoji_split_over_two_deltas_does_not_cut_the_answer(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, sdk: str
) -> None:
    up = await serve_routes(web.post("/v1/chat/completions", _streaming([*EVENTS, b"data: [DONE]\n\n"])))
    proxy = await start_proxy(
        {
            "providers": {"p": {"kind": "openai_compatible", "base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    hi: Any = [{"role": "user", "content": "hi"}]
    if sdk == "openai":
        oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        try:
            stream: Any = await oai.chat.completions.create(model="m", messages=hi, stream=True)
            text = "".join([ch.delta.content or "" async for c in stream for ch in c.choices])
        finally:
            await oai.close()
    else:
        ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        try:
            async with ant.messages.stream(model="m", max_tokens=50, messages=hi) as s:
                text = (await s.get_final_message()).content[0].text  # type: ignore[union-attr]
        finally:
            await ant.close()
    assert text == "A\ufffd\ufffdB"
    assert (await _record(proxy)).outcome == "ok"
