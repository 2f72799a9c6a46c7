"""A model's refusal is not kept in the response cache.

An OpenAI answer whose message is a `refusal` (finish `stop`) was stored and replayed to the
tenant for the ttl (and under `scope: team` to the whole team), while an Anthropic refusal
(`content_filter`) never was: a refusal is a verdict that may not hold next time, as a
content filter's. Now neither is stored, JSON or streamed; an ordinary answer still is.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
from aiohttp import web

from tests.conftest import ServeRoutes, simple_config

REFUSAL = "I'm sorry, I can't help with that."
MSG = [{"role": "user", "content": "Describe the schema of the vault."}]


def _completion(refused: bool) -> dict[str, Any]:
    message = {"role": "assistant", "content": None, "refusal": REFUSAL} if refused else {
        "role": "assistant", "content": "It has three tables.", "refusal": None,
    }  # fmt: skip
    return {
        "id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17},
    }  # fmt: skip


def _chunks(refused: bool) -> bytes:
    base = {"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    field, text = ("refusal", REFUSAL) if refused else ("content", "It has three tables.")
    deltas = [({"role": "assistant", "content": ""}, None), ({field: text}, None), ({}, "stop")]
    events = [base | {"choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": f}]} for d, f in deltas]
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


async def _upstream(serve_routes: ServeRoutes, calls: list[bool]) -> str:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        refused = "vault" in body["messages"][-1]["content"]
        calls.append(refused)
        if not body.get("stream"):
            return web.json_response(_completion(refused))
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(_chunks(refused))
        return out

    up = await serve_routes(web.post("/v1/chat/completions", chat))
    return up.url + "/v1"


def _config(base_url: str) -> dict[str, Any]:
    cfg = simple_config({})
    cfg["providers"] = {"a": {"base_url": base_url, "api_key": "key-a"}}
    cfg["deployments"] = {
        "d-a": {"provider": "a", "model": "gpt-4o-mini", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}
    }
    cfg["models"] = {"m": {"deployments": ["d-a"], "cache": {"ttl": 600}}}
    return cfg


async def test_a_refusal_is_asked_again_not_replayed(serve_routes: ServeRoutes, start_proxy: Any) -> None:
    calls: list[bool] = []
    proxy = await start_proxy(_config(await _upstream(serve_routes, calls)))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
        assert raw.parse().choices[0].message.refusal == REFUSAL
        assert raw.headers["x-edgeroute-cache"] == "miss", "a refusal was served from the cache"
    for _ in range(2):
        stream = await client.chat.completions.create(model="m", messages=MSG, temperature=0, stream=True)
        refusal = "".join([c.choices[0].delta.refusal or "" async for c in stream if c.choices])
        assert refusal == REFUSAL
    assert calls == [True] * 4, "a refusal was replayed from the cache"
    # An ordinary answer is still kept (the premise: the route caches).
    other = [{"role": "user", "content": "Describe the schema of the shop."}]
    labels = []
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=other, temperature=0)
        labels.append(raw.headers["x-edgeroute-cache"])
    assert labels == ["miss", "hit"]
    await client.close()
