"""What a hit saves is what its answer cost: the attempt that answered, not those that failed first.

An entry was stored with the request's whole cost, its failed attempts included (one that timed
out is priced at its prompt; a hedge's loser too), and every hit of it recorded that sum as
`saved_usd`: the spend report's savings grew by the failed attempts' cost at each hit, though a
hit saves only one answer's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import ServeRoutes
from tests.test_cache import MSG, stored

_ANSWER = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010},
}  # fmt: skip


def _chunks() -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    events = [
        base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Paris."}, "finish_reason": None}]},
        base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        base | {"choices": [], "usage": _ANSWER["usage"]},
    ]
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


async def _upstream(serve_routes: ServeRoutes) -> str:
    """An upstream whose first answer comes too late (the attempt times out, priced at its
    prompt), then answers every request at once."""
    calls = [0]

    async def chat(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        if calls[0] == 1:
            await asyncio.sleep(3)
        if (await request.json()).get("stream"):
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            await out.write(_chunks())
            await out.write_eof()
            return out
        return web.json_response(_ANSWER)

    return (await serve_routes(web.post("/v1/chat/completions", chat))).url + "/v1"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_hit_saves_what_the_answering_attempt_cost(
    serve_routes: ServeRoutes, start_proxy: Any, stream: bool
) -> None:
    price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    cfg = {
        "providers": {"a": {"base_url": await _upstream(serve_routes), "api_key": "k"}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": price}},
        "models": {"m": {"deployments": ["d-a"], "cache": {"ttl": 60}, "timeouts": {"first_byte": 0.5}}},
    }
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    if stream:
        async for _ in await client.chat.completions.create(model="m", messages=MSG, temperature=0, stream=True):
            pass
    else:
        await client.chat.completions.create(model="m", messages=MSG, temperature=0)
    await stored(proxy)
    hit = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert hit.headers["x-edgeroute-cache"] == "hit"
    await asyncio.sleep(0.05)  # (the hit's record is written as its answer ends)
    miss, hit_rec = list(proxy.recorder.records)[-2:]
    timed_out, answered = miss.attempts
    assert timed_out.outcome == "timeout" and timed_out.cost_usd > 0, "priced at its prompt"
    assert answered.outcome == "success"
    assert miss.cost_usd == pytest.approx(timed_out.cost_usd + answered.cost_usd), "the miss pays for both"
    assert hit_rec.saved_usd == pytest.approx(answered.cost_usd), "a hit saves one answer, not the failed attempt"
    await client.close()
