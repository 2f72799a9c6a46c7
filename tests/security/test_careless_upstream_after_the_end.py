"""What an upstream sends after its stream's end is not relayed.

A careless upstream that goes on after its terminal event (Responses' `response.completed`,
Anthropic's `message_stop`, chat's `[DONE]`) in the same read had those events relayed: an
OpenAI Responses or Anthropic client (whose SDKs read to the connection's end) saw text after
the answer had completed, that its final response or message did not hold. Every stream is
now cut after its end, whatever its API.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import openai
import orjson

from tests.security import test_careless_upstream_native_events as messages_events
from tests.security import test_careless_upstream_responses_events as responses_events
from tests.security.conftest import ScriptedStreams, Served, failover_config

USER: Any = [{"role": "user", "content": "hi"}]


async def test_responses_events_after_completed_are_not_relayed(serve: Any) -> None:
    ups = ScriptedStreams("/v1/responses")
    after = responses_events._ev(
        {"type": "response.output_text.delta", "sequence_number": 10, **responses_events.AT, "delta": " MORE"}
    )
    e = responses_events
    up = await ups(e.HEAD + e.DELTA + e.END + after)
    proxy: Served = await serve(failover_config(up))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    kinds, text = [], ""
    async with client.responses.stream(model="m", input="hi") as s:
        async for ev in s:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
        final = await s.get_final_response()
    await ups.close()
    assert (text, final.output_text) == ("partial", "partial")
    assert kinds[-1] == "response.completed"


async def test_anthropic_events_after_message_stop_are_not_relayed(serve: Any) -> None:
    ups = ScriptedStreams("/v1/messages")
    e = messages_events
    more = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " MORE"}}
    up = await ups(e.START + e.BLOCK + e.DELTA + e.END + e._sse("content_block_delta", more))
    proxy: Served = await serve(failover_config(up, kind="anthropic"))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    kinds, text = [], ""
    # top_k: only Anthropic understands it, so the request and its events go through unchanged
    async with client.messages.stream(model="m", max_tokens=10, messages=USER, extra_body={"top_k": 3}) as s:
        async for ev in s:
            kinds.append(ev.type)
            if ev.type == "content_block_delta" and ev.delta.type == "text_delta":
                text += ev.delta.text
        final = await s.get_final_message()
    await ups.close()
    assert text == "partial" and [b.text for b in final.content if b.type == "text"] == ["partial"]
    assert kinds[-1] == "message_stop"


async def test_chat_bytes_after_done_are_not_relayed(serve: Any) -> None:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x"}
    events = b"".join(
        b"data: " + orjson.dumps({**chunk, "choices": [c]}) + b"\n\n"
        for c in (
            {"index": 0, "delta": {"role": "assistant", "content": "partial"}, "finish_reason": None},
            {"index": 0, "delta": {}, "finish_reason": "stop"},
        )
    )
    late = b"data: " + orjson.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": " MORE"}}]}) + b"\n\n"
    ups = ScriptedStreams("/v1/chat/completions")
    up = await ups(events + b"data: [DONE]\n\n" + late + b"data: [DONE]\n\n")
    proxy: Served = await serve(failover_config(up))
    # What any SSE client reads (the OpenAI SDK stops at the first [DONE] by itself).
    async with aiohttp.ClientSession() as http:
        body = {"model": "m", "messages": USER, "stream": True}
        async with http.post(proxy.url + "/v1/chat/completions", json=body) as resp:
            raw = await resp.read()
    await ups.close()
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1 and b"MORE" not in raw
