"""An answer with nothing in it (no text, no tool call) is passed on, not stored.

Gemini ends a generation that went wrong with a reason OpenAI's format has no word for
(`MALFORMED_FUNCTION_CALL`: the model wrote a function call that does not parse, and the
candidate holds no part); its translation says `stop`, and the cache stored the empty answer
as a finished one: every later caller of the tenant was served nothing, from the cache, for
the entry's ttl, where asking again usually gets the answer.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import ServeRoutes
from tests.test_cache import MSG, stored

_TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]


def _malformed(n: int) -> dict[str, Any]:
    """Gemini's answer: the first is a malformed function call (no content), then a text."""
    usage = {"promptTokenCount": 5, "candidatesTokenCount": 3, "totalTokenCount": 8}
    if n == 1:
        cand: dict[str, Any] = {"content": {}, "finishReason": "MALFORMED_FUNCTION_CALL", "index": 0}
    else:
        cand = {"content": {"role": "model", "parts": [{"text": "Paris."}]}, "finishReason": "STOP", "index": 0}
    return {"candidates": [cand], "usageMetadata": usage, "modelVersion": "gemini-x"}


async def _gemini(serve_routes: ServeRoutes) -> tuple[str, list[int]]:
    calls = [0]

    async def generate(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        answer = orjson.dumps(_malformed(calls[0]))
        if request.match_info["target"].endswith(":streamGenerateContent"):
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            await out.write(b"data: " + answer + b"\r\n\r\n")
            await out.write_eof()
            return out
        return web.Response(body=answer, content_type="application/json")

    up = await serve_routes(web.post("/v1beta/models/{target}", generate))
    return up.url + "/v1beta", calls


@pytest.mark.parametrize("stream", [False, True])
async def test_an_empty_answer_is_asked_again(serve_routes: ServeRoutes, start_proxy: Any, stream: bool) -> None:
    base_url, calls = await _gemini(serve_routes)
    price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    cfg = {
        "providers": {"g": {"kind": "gemini", "base_url": base_url, "api_key": "k"}},
        "deployments": {"d-g": {"provider": "g", "model": "gemini-x", "price": price}},
        "models": {"m": {"deployments": ["d-g"], "cache": {"ttl": 60}}},
    }
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    async def ask() -> tuple[str, str | None, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, temperature=0, tools=_TOOLS, stream=stream
        )
        if not stream:
            message = raw.parse().choices[0].message
            return raw.headers["x-edgeroute-cache"], message.content, raw.parse().choices[0].finish_reason or ""
        text, finish = "", ""
        async for chunk in raw.parse():
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return raw.headers["x-edgeroute-cache"], text, finish

    label, content, _ = await ask()
    assert label == "miss" and not content, "the malformed call reaches its caller as it came: nothing"
    await stored(proxy)
    label, content, finish = await ask()
    assert (label, content, finish) == ("miss", "Paris.", "stop"), "asked again, not served the empty answer"
    assert calls[0] == 2
    await stored(proxy)
    assert (await ask())[:2] == ("hit", "Paris."), "an answer with text is stored as ever"
    await client.close()
